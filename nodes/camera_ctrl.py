"""Load CameraCtrl -> Apply CameraCtrl Poses: a camera path (RealEstate10K-style poses) for an AnimateDiff v3 clip."""
import os

import folder_paths

from ..model_patcher import folders
from ..model_patcher.camera_ctrl import MAX_STRENGTH, apply_camera_ctrl, load_camera_ctrl_patcher
from ..motion_modules.camera_ctrl import DEFAULT_POSE_SIZE, parse_poses, read_pose_file
from .load_video import _within
from .motion import CATEGORY

CAMERA_CTRL = "ADM_CAMERA_CTRL"
NO_FILE = "none (use pose_text)"
POSE_SUFFIX = ".txt"


class LoadCameraCtrl:
    DESCRIPTION = ("Loads CameraCtrl (CameraCtrl_pruned.safetensors or CameraCtrl.ckpt) from models/animatediff_models: "
                   "a pose encoder that makes an AnimateDiff v3 clip follow a camera path.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (CAMERA_CTRL,)
    RETURN_NAMES = ("camera_ctrl",)
    OUTPUT_TOOLTIPS = ("The CameraCtrl model, for Apply CameraCtrl Poses.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"camera_ctrl_name": (folders.names(folders.MOTION_MODULES), {
            "tooltip": "A CameraCtrl file in models/animatediff_models (where AnimateDiff-Evolved reads it from too)."})}}

    def load(self, camera_ctrl_name):
        return (load_camera_ctrl_patcher(folders.full_path(folders.MOTION_MODULES, camera_ctrl_name)),)


class ApplyCameraCtrlPoses:
    DESCRIPTION = ("Makes the clip follow a camera path: one pose per frame (RealEstate10K / CameraCtrl pose lines: "
                   "timestamp fx fy cx cy 0 0 and a 3x4 world-to-camera matrix), turned into per-pixel ray "
                   "embeddings and fed to the motion module. Use with AnimateDiff v3 (v3_sd15_mm.ckpt), at most 16 "
                   "frames at once (longer clips: Context Windows of 16), width and height multiples of 64.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, moving its camera along the poses: feed it to KSampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL output of Apply Motion Module (AnimateDiff v3). The MODEL you "
                                           "pass in stays unchanged."}),
            "camera_ctrl": (CAMERA_CTRL, {"tooltip": "From Load CameraCtrl."}),
            "pose_file": ([NO_FILE] + _pose_files(), {"tooltip":
                          "A pose file (.txt) in ComfyUI's input folder, e.g. one of CameraCtrl's assets/pose_files. "
                          "Frame k of the clip takes line k; past the last line the last pose holds."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_STRENGTH, "step": 0.05, "tooltip":
                                   "How strongly the poses steer: 1 = as trained, 0 = not at all (plain AnimateDiff)."}),
            "pose_width": ("INT", {"default": DEFAULT_POSE_SIZE[0], "min": 1, "max": 16384, "tooltip":
                                   "Width of the video the poses were taken from (RealEstate10K: 1280): the focal "
                                   "lengths are rescaled to the clip's aspect ratio."}),
            "pose_height": ("INT", {"default": DEFAULT_POSE_SIZE[1], "min": 1, "max": 16384, "tooltip":
                                    "Height of the video the poses were taken from (RealEstate10K: 720)."}),
        }, "optional": {
            "pose_text": ("STRING", {"default": "", "multiline": True, "tooltip":
                                     "Pose lines typed or pasted here, used instead of pose_file when not empty."}),
        }}

    def apply(self, model, camera_ctrl, pose_file, strength, pose_width, pose_height, pose_text=""):
        if pose_text.strip():
            poses = parse_poses(pose_text, "pose_text")
        elif pose_file and pose_file != NO_FILE:
            poses = read_pose_file(_pose_path(pose_file))
        else:
            raise ValueError("Apply CameraCtrl Poses: no poses. Choose a pose_file (a .txt in ComfyUI's input "
                             "folder) or paste pose lines into pose_text.")
        return (apply_camera_ctrl(model, camera_ctrl, poses, strength, (pose_width, pose_height)),)


def _pose_files() -> list[str]:
    folder = folder_paths.get_input_directory()
    try:
        return sorted(n for n in os.listdir(folder) if n.lower().endswith(POSE_SUFFIX)
                      and os.path.isfile(os.path.join(folder, n)) and _within(os.path.join(folder, n), [folder]))
    except OSError:
        return []


def _pose_path(name: str) -> str:
    folder = folder_paths.get_input_directory()
    full = os.path.join(folder, name)
    if not name.lower().endswith(POSE_SUFFIX) or not _within(full, [folder]):
        raise ValueError(f"Apply CameraCtrl Poses: pose_file {name!r} is not a {POSE_SUFFIX} file inside ComfyUI's "
                         "input folder; choose one from the list or paste the poses into pose_text.")
    return full


NODE_CLASS_MAPPINGS = {"ADM_LoadCameraCtrl": LoadCameraCtrl, "ADM_ApplyCameraCtrlPoses": ApplyCameraCtrlPoses}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_LoadCameraCtrl": "Load CameraCtrl (AnimateDiff)",
                              "ADM_ApplyCameraCtrlPoses": "Apply CameraCtrl Poses (AnimateDiff)"}

"""Load SparseCtrl -> Apply SparseCtrl: keyframe images steer chosen frames of an AnimateDiff v3 clip."""
import folder_paths
import torch

import comfy.latent_formats

from ..model_patcher.sparse_ctrl import (apply_sparse_ctrl, keyframe_hint, load_sparse_ctrl, parse_keyframes,
                                         scribble_condition)
from ..motion_modules.sparse_ctrl import RGB
from .motion import CATEGORY

SPARSE_CTRL = "ADM_SPARSE_CTRL"


class LoadSparseCtrl:
    DESCRIPTION = ("Loads a SparseCtrl model (v3_sd15_sparsectrl_rgb.ckpt or v3_sd15_sparsectrl_scribble.ckpt) from "
                   "models/controlnet: a ControlNet for AnimateDiff v3 that is given images on a few frames only.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (SPARSE_CTRL,)
    RETURN_NAMES = ("sparse_ctrl",)
    OUTPUT_TOOLTIPS = ("The SparseCtrl model (rgb or scribble, read from the file), for Apply SparseCtrl.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sparsectrl_name": (folder_paths.get_filename_list("controlnet"), {
            "tooltip": "A SparseCtrl file in models/controlnet (rgb or scribble; use it with the v3 motion module)."})}}

    def load(self, sparsectrl_name):
        return (load_sparse_ctrl(folder_paths.get_full_path_or_raise("controlnet", sparsectrl_name)),)


class ApplySparseCtrl:
    DESCRIPTION = ("Conditions chosen frames of the clip on images: each image is given at its keyframe, the other "
                   "frames get no condition (SparseCtrl's mask) and follow through the motion. rgb takes pictures "
                   "(encoded with the VAE), scribble takes line art. Chains with other ControlNets and works inside "
                   "context windows.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("positive with SparseCtrl attached", "negative with SparseCtrl attached")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "The prompt's conditioning (other ControlNets may be attached)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt's conditioning."}),
            "sparse_ctrl": (SPARSE_CTRL, {"tooltip": "From Load SparseCtrl."}),
            "images": ("IMAGE", {"tooltip": "One image per keyframe, in the order of 'keyframes' (rgb: pictures, "
                                            "ideally at the clip's size; scribble: line art, white lines on black)."}),
            "keyframes": ("STRING", {"default": "0", "tooltip":
                          "The frame index of each image, comma separated, e.g. '0, 8, 15' for three images."}),
            "frames": ("INT", {"default": 16, "min": 1, "max": 4096, "tooltip":
                       "The clip's length: Empty Latent Image's batch_size (the whole clip, also with context "
                       "windows)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                         "How strongly the keyframes steer: 1 = as trained, 0 = not at all (the clip is unchanged)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                              "Where in the sampling SparseCtrl starts to act (0 = the first step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                            "Where in the sampling it stops acting (1 = the last step)."}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "Needed for rgb SparseCtrl: the images are encoded to latents with it."}),
        }}

    def apply(self, positive, negative, sparse_ctrl, images, keyframes, frames, strength, start_percent,
              end_percent, vae=None):
        indices = parse_keyframes(keyframes, images.shape[0], frames)
        if not bool(torch.isfinite(images).all()):
            raise ValueError("Apply SparseCtrl: the images hold NaN/inf values; check the node that made them.")
        if sparse_ctrl.config.kind == RGB:
            if vae is None:
                raise ValueError("rgb SparseCtrl needs the VAE: connect the checkpoint's VAE to Apply SparseCtrl.")
            # AnimateDiff: vae.encode(images * 2 - 1) * 0.18215; the host's encode takes 0..1 images
            condition = comfy.latent_formats.SD15().process_in(vae.encode(images[..., :3]))
        else:
            condition = scribble_condition(images)
        hint = keyframe_hint(condition, indices, frames)
        return apply_sparse_ctrl(positive, negative, sparse_ctrl, hint, strength, start_percent, end_percent)


NODE_CLASS_MAPPINGS = {"ADM_LoadSparseCtrl": LoadSparseCtrl, "ADM_ApplySparseCtrl": ApplySparseCtrl}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_LoadSparseCtrl": "Load SparseCtrl (AnimateDiff)",
                              "ADM_ApplySparseCtrl": "Apply SparseCtrl (AnimateDiff)"}

"""Load Video: a video file, GIF, animated WebP or image folder as an IMAGE batch (plus its rate and sound), for
video-to-video. Frames are streamed: only the selected ones are converted, resized and kept."""
import hashlib
import logging
import os

import folder_paths
import numpy as np
import torch

from ..video import FOLDER_FPS, image_folder_files, iter_frames, probe, read_audio
from ..video.decode import is_folder

log = logging.getLogger(__name__)

RESIZE_MODES = ("shortest side", "width x height", "none")
ANIMATION_EXTENSIONS = (".gif", ".webp")
MAX_FRAMES = 100_000
MAX_SIDE = 8192
VIDEO_FOLDERS_ENV = "ADM_VIDEO_FOLDERS"
"""Folders (os.pathsep separated) that ``path`` may read besides ComfyUI's input, output and temp folders."""


class LoadVideo:
    DESCRIPTION = ("Loads a video (mp4, webm, mov, mkv, ... anything FFmpeg reads), an animated GIF or WebP, or a "
                   "folder of numbered images (frame2 before frame10) as a batch of frames for video-to-video: pick "
                   "the range, the frame rate and the size. Frames are decoded one at a time and only the selected "
                   "ones are kept, so long files load in little memory. Outputs the frames, their count, their "
                   "frame rate and the matching part of the sound track for Save Video.")
    CATEGORY = "AnimateDiff Motion/video"
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT", "AUDIO")
    RETURN_NAMES = ("images", "frame_count", "frame_rate", "audio")
    OUTPUT_TOOLTIPS = (
        "The selected frames, [frames, height, width, 3], values 0..1 (feed VAE Encode for video-to-video).",
        "How many frames were loaded: the batch size.",
        "The rate of the loaded frames (target_fps or the source rate, divided by every_nth): connect it to Save "
        "Video's frame_rate so the result plays at the source's speed.",
        "The sound track cut to the loaded frames (host AUDIO), or None when the file has none (GIF, WebP and image "
        "folders never do). Connect it to Save Video's audio.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video": (_input_videos(), {"video_upload": True, "tooltip":
                      "A video in ComfyUI's input folder; upload one with the button. Ignored when path is set."}),
            "path": ("STRING", {"default": "", "tooltip":
                     "Optional: a video file or a folder of numbered images in ComfyUI's input, output or temp "
                     f"folder, or in a folder listed in the server's {VIDEO_FOLDERS_ENV} environment variable "
                     "(relative paths start in the input folder). When set, it is used instead of video."}),
            "start_frame": ("INT", {"default": 0, "min": 0, "max": 10_000_000, "tooltip":
                            "The first frame to load, counted in the file's own frames (0 = the first)."}),
            "frame_count": ("INT", {"default": 16, "min": 0, "max": MAX_FRAMES, "tooltip":
                            "How many frames to load at most; 0 = all to the end. Every frame is one latent: "
                            "AnimateDiff v1/v2/v3 handle 16-32 at once."}),
            "every_nth": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip":
                          "Keep every n-th frame (after target_fps): 2 halves the frame rate and doubles the time "
                          "the frames cover."}),
            "target_fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.01, "tooltip":
                           "0 = the source's rate. Otherwise resample to this rate by timestamp: each frame is the "
                           "source frame on screen at that moment (frames repeat or drop). AnimateDiff likes ~8. "
                           f"Image folders count as {FOLDER_FPS:g} fps."}),
            "resize": (list(RESIZE_MODES), {"default": "shortest side", "tooltip":
                       "shortest side: scale so the shorter side is shortest_side, keeping the aspect ratio. "
                       "width x height: scale to cover width x height and crop the centre. Both give multiples of 8, "
                       "as the VAE needs. none: the source size (VAE Encode then crops to a multiple of 8)."}),
            "shortest_side": ("INT", {"default": 512, "min": 8, "max": MAX_SIDE, "step": 8, "tooltip":
                              "For resize = shortest side: the length of the shorter side (512 for SD1.5)."}),
            "width": ("INT", {"default": 512, "min": 8, "max": MAX_SIDE, "step": 8, "tooltip":
                      "For resize = width x height: the output width."}),
            "height": ("INT", {"default": 512, "min": 8, "max": MAX_SIDE, "step": 8, "tooltip":
                       "For resize = width x height: the output height."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, video, path):
        # Taking `video` here also stops the host from refusing a name that is not (yet) in the combo's list, so
        # resolve_source does the host's other job: keeping the name inside its folder.
        try:
            source = resolve_source(video, path)
            if not os.path.exists(source):
                return f"Video not found: {source!r}" + ("" if (path or "").strip() else
                                                         " (upload it or put it in ComfyUI's input folder)")
            is_folder(source)  # a FIFO or device would block or never end: refused by os.stat, not opened
        except ValueError as ex:
            return str(ex)
        return True

    @classmethod
    def IS_CHANGED(cls, video, path, **kwargs):
        try:
            return _fingerprint(resolve_source(video, path))
        except (ValueError, OSError):
            return "missing"

    def load(self, video, path, start_frame, frame_count, every_nth, target_fps, resize, shortest_side, width,
             height):
        import comfy.model_management
        import comfy.utils

        source = resolve_source(video, path)
        frames = iter_frames(source, start=start_frame, count=frame_count or None, every_nth=every_nth,
                             target_fps=target_fps or None)
        short = None
        progress = comfy.utils.ProgressBar(frame_count) if frame_count else None
        kept = []
        with frames:
            for rgb in frames:
                comfy.model_management.throw_exception_if_processing_interrupted()
                frame = resize_frame(rgb, resize, shortest_side, width, height)
                if kept and frame.shape != kept[0].shape:  # a stream that changes size midway: keep the first
                    frame = resize_frame(frame, "width x height", 0, kept[0].shape[1], kept[0].shape[0], exact=True)
                kept.append(frame)
                if progress is not None:
                    progress.update(1)
            if frames.truncated:
                short = (f"{source!r} is cut short: only {frames.frames_read} of the {frames.frames_declared} "
                         f"frames its container declares could be read (an interrupted download or copy?)")
        if not kept:
            if short:
                raise ValueError(f"No frames to load: {short}, and start_frame {start_frame} is past them. Lower "
                                 "start_frame, or replace the file with a complete copy.")
            total = _frame_total(source)
            raise ValueError(f"No frames to load from {source!r}: start_frame {start_frame} is past its last frame "
                             f"({total} frames). Lower start_frame.")
        images = torch.empty((len(kept), *kept[0].shape), dtype=torch.float32)
        pixels = images.numpy()  # the same memory
        for i in range(len(kept)):  # convert one at a time, freeing the uint8 copy as we go
            pixels[i] = kept[i]
            kept[i] = None
        images.div_(255)
        audio = read_audio(source, start=frames.start_time, end=frames.end_time)
        if audio is not None:
            audio = {"waveform": torch.from_numpy(audio[0]).unsqueeze(0), "sample_rate": audio[1]}
        # A stream that stores no rate (rare) plays at AnimateDiff's usual 8 fps rather than breaking Save Video.
        result = images, len(images), float(frames.fps or FOLDER_FPS), audio
        if short:  # loaded, but say so: in the log and in the node's UI text (also in /history for API clients)
            note = f"{short}; loaded {len(images)} frames. Replace the file with a complete copy to get them all."
            log.warning("Load Video: %s", note)
            return {"ui": {"text": [note]}, "result": result}
        return result


def _input_videos() -> list[str]:
    folder = folder_paths.get_input_directory()
    try:
        names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
                 and _within(os.path.join(folder, n), [folder])]  # not symlinks leading out: they are refused
    except OSError:
        return []
    videos = set(folder_paths.filter_files_content_types(names, ["video"]))
    videos.update(n for n in names if n.lower().endswith(ANIMATION_EXTENSIONS))
    return sorted(videos)


def resolve_source(video: str, path: str) -> str:
    """The real path (symlinks resolved) of the file or folder to read: ``path`` when set (quotes stripped, ~
    expanded, relative to the input folder), else the ``video`` chosen in the input folder (annotated names like
    "clip.mp4 [output]" work too, as the host reads them). Nothing is opened or tested for existence here: a
    ``video`` outside its folder, or a ``path`` outside allowed_folders(), is refused with a message that is the
    same whether the file exists or not, so API clients cannot probe the server's disk with it."""
    path = (path or "").strip()
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        path = path[1:-1].strip()
    if path:
        full = os.path.join(folder_paths.get_input_directory(), os.path.expanduser(path))  # absolute ones stay
        if not _within(full, allowed_folders()):
            raise ValueError(
                f"path {path!r} is outside the folders Load Video may read (ComfyUI's input, output and temp "
                f"folders and those listed in {VIDEO_FOLDERS_ENV}). Move the file into ComfyUI's input folder, or "
                f"add its folder to the environment variable {VIDEO_FOLDERS_ENV} (several separated by "
                f"{os.pathsep!r}) and restart ComfyUI.")
        return os.path.realpath(full)
    if not video:
        raise ValueError("No video chosen: upload one, put one in ComfyUI's input folder, or set path.")
    # The host's annotated-path rules: "name [output]" / "name [temp]" is a file in that folder, else in input.
    base = folder_paths.annotated_filepath(video)[1] or folder_paths.get_input_directory()
    full = folder_paths.get_annotated_filepath(video)
    if not _within(full, [base]):  # "../x", "/etc/x", or a symlink that leads out
        which = next((w for w in ("output", "temp") if video.endswith(f"[{w}]")), "input")
        raise ValueError(f"video {video!r} is not a file inside ComfyUI's {which} folder: choose one from the "
                         "list or upload it (to read a file elsewhere, use path).")
    return os.path.realpath(full)


def allowed_folders() -> list[str]:
    """The folders ``path`` may read: the host's input, output and temp folders, and the folders listed in the
    ADM_VIDEO_FOLDERS environment variable (read when called; set it before starting ComfyUI)."""
    folders = [folder_paths.get_input_directory(), folder_paths.get_output_directory(),
               folder_paths.get_temp_directory()]
    folders += [f.strip() for f in os.environ.get(VIDEO_FOLDERS_ENV, "").split(os.pathsep) if f.strip()]
    return [os.path.expanduser(f) for f in folders]


def _within(path: str, folders: list[str]) -> bool:
    """Whether ``path`` lies in one of ``folders``, both as written (".." collapsed, nothing on disk looked at) and
    after resolving symlinks: the second alone would let a client learn which paths outside are symlinks, the
    first alone would let a symlink inside lead out."""
    plain = os.path.abspath(path)
    if not any(_inside(plain, os.path.abspath(folder)) for folder in folders):
        return False
    real = os.path.realpath(path)
    return any(_inside(real, os.path.realpath(folder)) for folder in folders)


def _inside(path: str, folder: str) -> bool:
    """Whether the absolute path ``path`` is ``folder`` or below it."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives on Windows
        return False


def _fingerprint(source: str) -> str:
    if os.path.isdir(source):
        digest = hashlib.sha256(source.encode())
        for file in image_folder_files(source):
            stat = os.stat(file)
            digest.update(f"{os.path.basename(file)}:{stat.st_mtime_ns}:{stat.st_size}".encode())
        return digest.hexdigest()
    stat = os.stat(source)
    return f"{source}:{stat.st_mtime_ns}:{stat.st_size}"


def _frame_total(source: str) -> str:
    try:
        return str(probe(source)["frames"])
    except ValueError:
        return "?"


def _multiple_of_8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def target_size(width: int, height: int, resize: str, shortest_side: int, out_width: int, out_height: int):
    """(width, height) after resizing a width x height frame, and the centred crop box in the source
    (left, top, right, bottom) or None for the whole frame."""
    if resize == "none":
        return (width, height), None
    if resize == "shortest side":
        side = _multiple_of_8(shortest_side)
        if width <= height:
            return (side, _multiple_of_8(height * side / width)), None
        return (_multiple_of_8(width * side / height), side), None
    if resize == "width x height":
        return _cover(width, height, _multiple_of_8(out_width), _multiple_of_8(out_height))
    raise ValueError(f"Unknown resize mode {resize!r}: use one of {', '.join(RESIZE_MODES)}.")


def _cover(width: int, height: int, w: int, h: int):
    """Scale to cover w x h, then crop the centre of what sticks out: ((w, h), source crop box or None)."""
    if (w, h) == (width, height):
        return (w, h), None
    scale = max(w / width, h / height)
    crop_w, crop_h = w / scale, h / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (w, h), (left, top, left + crop_w, top + crop_h)


def resize_frame(rgb: np.ndarray, resize: str, shortest_side: int, out_width: int, out_height: int,
                 exact: bool = False) -> np.ndarray:
    """One uint8 RGB frame resized as the resize mode says (Lanczos, antialiased when shrinking). exact: scale and
    crop to exactly out_width x out_height, without rounding them to multiples of 8."""
    from PIL import Image

    height, width = rgb.shape[:2]
    if exact:
        size, box = _cover(width, height, out_width, out_height)
    else:
        size, box = target_size(width, height, resize, shortest_side, out_width, out_height)
    if size == (width, height) and box is None:
        return rgb
    image = Image.fromarray(rgb, "RGB")
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS, box=box))


NODE_CLASS_MAPPINGS = {"ADM_LoadVideo": LoadVideo}
# "Load Video" alone is the name of ComfyUI's own node, which gives a VIDEO object; this one gives IMAGE frames.
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_LoadVideo": "Load Video as Frames (AnimateDiff)"}

"""Save Video: writes an IMAGE batch as MP4 / GIF / WebP into the host's output folder, with the workflow embedded."""
import json
import os

import folder_paths
import torch

from ..video import EXTENSIONS, FORMATS, write_video
from ..video.encode import DEFAULT_MP4_CRF, MAX_LOOP, MP4_CRF_RANGE


class SaveVideo:
    DESCRIPTION = ("Saves the frames as an MP4 (H.264), animated GIF or animated WebP in ComfyUI's output folder and "
                   "previews it. The prompt and workflow are embedded (unless ComfyUI runs with --disable-metadata), "
                   "so the file can be dropped onto ComfyUI to load the workflow again.")
    CATEGORY = "AnimateDiff Motion/video"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)
    OUTPUT_TOOLTIPS = ("The full path of the saved file.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames to save, in order (e.g. from VAE Decode)."}),
                "frame_rate": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 1000.0, "step": 0.01, "tooltip":
                                         "Frames per second. AnimateDiff models were trained around 8 fps. GIF "
                                         "stores delays in 1/100 s and browsers cap it at 50 fps."}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": MAX_LOOP, "tooltip":
                                       "How many times a GIF/WebP plays: 0 = forever. MP4 ignores it (looping is up "
                                       "to the player)."}),
                "filename_prefix": ("STRING", {"default": "AnimateDiff", "tooltip":
                                               "File name start; may contain subfolders (videos/AnimateDiff) and "
                                               "%date:yyyy-MM-dd% style variables. A counter is appended."}),
                "format": (list(FORMATS), {"default": "mp4", "tooltip":
                                           "mp4: H.264, small, plays everywhere (slightly lossy). gif: 256 colours, "
                                           "large. webp: lossless animated WebP."}),
                "pingpong": ("BOOLEAN", {"default": False, "tooltip":
                                         "Play forward then backward (adds the frames in reverse, without repeating "
                                         "the first and last), for seamless loops."}),
                "quality": ("INT", {"default": DEFAULT_MP4_CRF, "min": MP4_CRF_RANGE[0], "max": MP4_CRF_RANGE[1],
                                    "tooltip": "MP4 only: the x264 CRF. Lower = better quality and bigger files; "
                                               "18 looks lossless, 23 is x264's default, 0 is lossless but most "
                                               "browsers can't play it. GIF and WebP ignore it (WebP is lossless)."}),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Optional sound (e.g. from Load Video). MP4 only: stored as AAC, cut "
                                               "or padded with silence to the video's length. GIF and WebP have no "
                                               "sound and ignore it."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, frame_rate, loop_count, filename_prefix, format, pingpong, quality, audio=None,
             prompt=None, extra_pnginfo=None):
        frames = (images[..., :3].clamp(0, 1) * 255).round().to(dtype=torch.uint8, device="cpu").numpy()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), images.shape[2], images.shape[1])
        file = f"{name}_{counter:05}_{EXTENSIONS[format]}"
        path = write_video(frames, os.path.join(folder, file), format, frame_rate, loop=loop_count,
                           pingpong=pingpong, quality=quality if format == "mp4" else None,
                           metadata=_metadata(prompt, extra_pnginfo),
                           audio=_audio(audio) if format == "mp4" else None)
        ui = {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}], "animated": (True,)}
        return {"ui": ui, "result": (path,)}


def _audio(audio):
    """The host's AUDIO ({"waveform": [batch, channels, samples], "sample_rate"}) as (float32 [channels, samples],
    rate) for write_video; None for no audio or an empty one. A batch of several clips uses the first."""
    if not audio or audio.get("waveform") is None:
        return None
    waveform = audio["waveform"]
    if waveform.dim() == 3:
        waveform = waveform[0]
    if waveform.shape[-1] == 0:
        return None
    return waveform.detach().to(device="cpu", dtype=torch.float32).numpy(), int(audio["sample_rate"])


def _metadata(prompt, extra_pnginfo):
    """The prompt and the extra PNG info (the workflow) as JSON text, as the host's own savers embed them."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return None
    metadata = {}
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    return metadata


NODE_CLASS_MAPPINGS = {"ADM_SaveVideo": SaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_SaveVideo": "Save Video (AnimateDiff)"}

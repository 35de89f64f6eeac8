"""Save MP4/GIF/WebP: writes an IMAGE batch as MP4 / GIF / WebP into the host's output folder, with the workflow
embedded, and previews it as an animated WebP (the editor plays those by itself: autoplay, silent, looping)."""
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
            },
            "optional": {
                # Optional so that API workflows saved when this input was called "quality" still validate: the
                # host drops inputs it does not know and refuses missing required ones (see _legacy_crf). In UI
                # workflows the value is found by position, and this is still the sixth widget.
                "mp4_crf": ("INT", {"default": DEFAULT_MP4_CRF, "min": MP4_CRF_RANGE[0], "max": MP4_CRF_RANGE[1],
                                    "tooltip": "MP4 only: x264 CRF, lower = better quality and bigger files. 18 is "
                                               "about visually lossless, 23 is x264's default, 28 is small; 0 is "
                                               "lossless but most browsers can't play it. GIF and WebP ignore it "
                                               "(WebP is lossless, GIF has 256 colours)."}),
                "audio": ("AUDIO", {"tooltip": "Optional sound (e.g. from Load Video). MP4 only: stored as AAC, cut "
                                               "or padded with silence to the video's length. GIF and WebP have no "
                                               "sound and ignore it."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    def save(self, images, frame_rate, loop_count, filename_prefix, format, pingpong, mp4_crf=None, audio=None,
             prompt=None, extra_pnginfo=None, unique_id=None):
        if mp4_crf is None:
            mp4_crf = _legacy_crf(prompt, unique_id)
        frames = (images[..., :3].clamp(0, 1) * 255).round().to(dtype=torch.uint8, device="cpu").numpy()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), images.shape[2], images.shape[1])
        file = f"{name}_{counter:05}_{EXTENSIONS[format]}"
        path = write_video(frames, os.path.join(folder, file), format, frame_rate, loop=loop_count,
                           pingpong=pingpong, quality=mp4_crf if format == "mp4" else None,
                           metadata=_metadata(prompt, extra_pnginfo),
                           audio=_audio(audio) if format == "mp4" else None)
        saved = {"filename": file, "subfolder": subfolder, "type": "output"}
        if format == "webp":
            return {"ui": {"images": [saved], "animated": (True,)}, "result": (path,)}
        # The editor shows an "animated" MP4 in a <video> element that waits paused at 0:00 (and a GIF in one that
        # cannot play it), but an animated WebP in an <img>, which plays at once, silently, in a loop. So the node
        # shows a WebP copy from the temp folder; the saved file is listed under "video", where the queue panel
        # and the headless runner find it.
        preview = _write_preview(frames, name, frame_rate, pingpong)
        return {"ui": {"images": [preview], "animated": (True,), "video": [saved]}, "result": (path,)}


PREVIEW_SUBFOLDER = "adm_previews"
PREVIEW_QUALITY = 80  # lossy WebP: a preview a few times smaller than a lossless one, encoded several times faster


def _write_preview(frames, name, frame_rate, pingpong):
    """An animated, endlessly looping WebP of the frames in the host's temp folder (emptied at every start)."""
    folder, preview_name, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{PREVIEW_SUBFOLDER}/{name}", folder_paths.get_temp_directory(), frames.shape[2], frames.shape[1])
    file = f"{preview_name}_{counter:05}_.webp"
    write_video(frames, os.path.join(folder, file), "webp", frame_rate, loop=0, pingpong=pingpong,
                quality=PREVIEW_QUALITY)
    return {"filename": file, "subfolder": subfolder, "type": "temp"}


def _legacy_crf(prompt, unique_id):
    """mp4_crf for a prompt that does not set it: the value of the input's old name, "quality", in this node's
    entry of the prompt (the host passes only declared inputs to the node, but the whole prompt as a hidden one);
    else the default (also for a value the old input's range would have refused)."""
    inputs = ((prompt or {}).get(str(unique_id)) or {}).get("inputs") or {}
    value = inputs.get("quality", DEFAULT_MP4_CRF)
    valid = isinstance(value, int) and not isinstance(value, bool) and MP4_CRF_RANGE[0] <= value <= MP4_CRF_RANGE[1]
    return value if valid else DEFAULT_MP4_CRF


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
# "Save Video" alone is the name of ComfyUI's own node (one MP4/WebM, no preview loop, no GIF/WebP).
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_SaveVideo": "Save MP4/GIF/WebP (AnimateDiff)"}

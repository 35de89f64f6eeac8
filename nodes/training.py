"""Video Dataset -> Train Motion Module: train a motion module (or a motion LoRA) on a folder of videos, with the
checkpoint's image model frozen. The work is done by training.loop; these nodes only gather the inputs."""
import functools
import hashlib
import inspect
import logging
import os
from pathlib import Path

import folder_paths
import torch

import comfy.model_management
import comfy.utils

from ..model_patcher import folders
from ..training import loop
from ..training import dataset as clips
from .motion import CATEGORY

log = logging.getLogger(__name__)

VIDEO_DATASET = "ADM_VIDEO_DATASET"
NEW = "(new)"
LAYOUTS = {"v3 (no mid block)": "v3", "v2 (mid block)": "v2"}
TRAINING_FOLDER = "animatediff_training"  # under the output folder: training states and the latent cache
PREVIEWS = 50                             # loss-curve previews shown during a run


def _resolve_folder(folder: str) -> Path:
    path = Path(os.path.expanduser(folder.strip()))
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


class VideoDataset:
    DESCRIPTION = ("A folder of videos with captions, cut into training clips the AnimateDiff way: N frames every "
                   "`stride` source frames from a random start, resized to cover the training size and "
                   "center-cropped. Captions come from a .txt beside each video or from a CSV (WebVid's "
                   "videoid,name columns, or file,caption). Unreadable files are skipped and listed in the report.")
    CATEGORY = f"{CATEGORY}/training"
    RETURN_TYPES = (VIDEO_DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = ("The clips, for Train Motion Module.",
                       "What was found: the number of videos, those without a caption, and each skipped file with "
                       "the reason.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "training_videos", "tooltip":
                       "The videos' folder, searched recursively (mp4, webm, mkv, mov, avi, gif, webp). A relative "
                       "path starts in ComfyUI's input folder."}),
            "frames": ("INT", {"default": 16, "min": 1, "max": 128, "tooltip":
                       "Frames per clip (AnimateDiff trained on 16). Memory grows with it."}),
            "stride": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                       "Source frames between two clip frames (the original used 4): larger = faster motion in the "
                       "clips. Videos shorter than (frames-1)*stride+1 frames are squeezed in."}),
            "width": ("INT", {"default": 256, "min": 64, "max": 2048, "step": 8, "tooltip":
                      "Training width in pixels (the original trained at 256x256; 512 matches SD1.5)."}),
            "height": ("INT", {"default": 256, "min": 64, "max": 2048, "step": 8, "tooltip":
                       "Training height in pixels."}),
            "caption_dropout": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                "How often a clip is trained with the empty caption (the original: 0.1), so the "
                                "module also works for the negative prompt's pass."}),
        }, "optional": {
            "captions_csv": ("STRING", {"default": "", "tooltip":
                             "A CSV with a video column (videoid, file, video, path) and a caption column (name, "
                             "caption, text, prompt). Empty: the folder's only .csv, if there is one."}),
            "random_start": ("BOOLEAN", {"default": True, "tooltip":
                             "Each clip starts at a random frame (the original). Off: always at the first frame."}),
            "horizontal_flip": ("BOOLEAN", {"default": False, "tooltip":
                                "Flip half of the clips left-right (the original did). Leave off for directional "
                                "motion (a pan right would be learnt as both directions)."}),
            "cache_latents": ("BOOLEAN", {"default": True, "tooltip":
                              f"Keep the VAE latents of every frame used in output/{TRAINING_FOLDER}/latent_cache, "
                              "so later epochs skip the VAE. Changed videos get new entries."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, **kwargs):
        """A fingerprint of the folder's files, so adding or editing a video re-scans it."""
        root = _resolve_folder(folder)
        digest = hashlib.sha1(repr(sorted(kwargs.items())).encode())
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    digest.update(f"{path}|{stat.st_mtime_ns}|{stat.st_size}".encode())
        return digest.hexdigest()

    def load(self, folder, frames, stride, width, height, caption_dropout, captions_csv="", random_start=True,
             horizontal_flip=False, cache_latents=True):
        spec = clips.ClipSpec(frames, stride, width, height, random_start, horizontal_flip, caption_dropout)
        cache = Path(folder_paths.get_output_directory()) / TRAINING_FOLDER / "latent_cache" if cache_latents else None
        dataset = clips.VideoDataset(_resolve_folder(folder), spec, captions_csv.strip() or None, latent_cache=cache)
        return (dataset, dataset.report())


class TrainMotionModule:
    DESCRIPTION = ("Trains a motion module on the dataset's clips inside MODEL's UNet, which stays frozen (its "
                   "weights never change), with AnimateDiff's recipe: noise-prediction loss, AdamW on the temporal "
                   "layers only. Starts from a new module (output layers zero) or continues an existing one; with "
                   "lora_rank > 0 it trains a motion LoRA on an existing module instead (MotionDirector-style). "
                   "Saves into models/animatediff_models (LoRAs: models/animatediff_motion_lora) in the published "
                   "layout. Long runs: `python -m headless train`, also on several GPUs with torchrun.")
    CATEGORY = f"{CATEGORY}/training"
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("file_name", "loss_curve", "summary")
    OUTPUT_TOOLTIPS = ("The saved file's name, as Load Motion Module (or Load Motion LoRA) lists it.",
                       "The loss of every step (grey) and its moving average (blue).",
                       "Steps, final loss, speed, peak memory and where the file and training states are.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The image model, frozen: a plain checkpoint (LoRAs on it are fine), "
                                           "not the output of Apply Motion Module."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder, for the captions (frozen)."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the frames (frozen)."}),
            "dataset": (VIDEO_DATASET, {"tooltip": "From Video Dataset."}),
            "init_motion_module": ([NEW, *folders.names(folders.MOTION_MODULES)], {"tooltip":
                                   f"{NEW}: a fresh module whose output layers are zero (it starts as 'no motion'). "
                                   "Or a file to continue training / to put a LoRA on."}),
            "new_module_layout": (list(LAYOUTS), {"tooltip":
                                  "For a new module: v3-style (20 temporal modules, no mid block) or v2-style (21, "
                                  "one in the mid block). Ignored when continuing a file."}),
            "lora_rank": ("INT", {"default": 0, "min": 0, "max": 512, "tooltip":
                          "0: train the whole module. Above 0: train a motion LoRA of this rank on the chosen "
                          "module's temporal attention (MotionDirector uses 32), the module itself frozen."}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000, "tooltip":
                      "Optimizer steps in all (a resumed run continues up to this)."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-8, "max": 1.0, "step": 1e-6, "round": 1e-8,
                              "tooltip": "AdamW learning rate (AnimateDiff: 1e-4; LoRAs often 5e-4)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip":
                           "Clips per step (the original: 4 per GPU). Memory grows with it."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 0xffffffff, "tooltip":
                     "Data order, clip starts, noise and timesteps, and a new module's initial weights."}),
            "save_name": ("STRING", {"default": "my_motion_module", "tooltip":
                          "File name without extension; '_2', '_3'... is added rather than overwrite a file."}),
        }, "optional": {
            "lora_scale": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 10.0, "step": 0.01, "tooltip":
                           "LoRA output scale while training; it is folded into the saved weights, so strength 1 "
                           "reproduces it."}),
            "lr_schedule": (list(loop.LR_SCHEDULES), {"default": "constant", "tooltip":
                            "constant (the original) or cosine decay to zero at the last step, after the warmup."}),
            "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                             "Steps of linear learning-rate warmup."}),
            "noise_schedule": (list(loop.NOISE_SCHEDULES), {"default": "sqrt_linear", "tooltip":
                               "sqrt_linear: AnimateDiff's training schedule (betas 0.00085 to 0.012, linear). "
                               "linear: SD's own (scaled-linear). model: whatever MODEL samples with."}),
            "precision": (list(loop.PRECISIONS), {"default": "auto", "tooltip":
                          "Mixed precision: auto = bf16 (fp16 on older GPUs) on CUDA, fp32 on CPU."}),
            "gradient_checkpointing": (list(loop.CHECKPOINTING), {"default": "off", "tooltip":
                                       "Recompute in the backward pass instead of storing: motion = the temporal "
                                       "modules; full = also the frozen UNet layers (least memory, ~30% slower)."}),
            "save_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                           f"Write a resumable training state to output/{TRAINING_FOLDER}/<save_name> every K steps "
                           "(0: only at the end and when cancelled)."}),
            "resume": ("BOOLEAN", {"default": False, "tooltip":
                       "Continue from the latest training state of this save_name. Off: start over (earlier "
                       "states of this save_name are replaced)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, model, clip, vae, dataset, init_motion_module, new_module_layout, lora_rank, steps,
              learning_rate, batch_size, seed, save_name, lora_scale=1.0, lr_schedule="constant", warmup_steps=0,
              noise_schedule="sqrt_linear", precision="auto", gradient_checkpointing="off", save_every=0,
              resume=False, unique_id=None):
        stem = _safe_stem(save_name)
        key = folders.MOTION_LORAS if lora_rank else folders.MOTION_MODULES
        out = _free_path(Path(folder_paths.get_folder_paths(key)[0]), stem)
        state_dir = Path(folder_paths.get_output_directory()) / TRAINING_FOLDER / stem
        if not resume:
            _clear_states(state_dir)
        init = None if init_motion_module == NEW else folders.full_path(folders.MOTION_MODULES, init_motion_module)
        options = loop.TrainingOptions(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                       lr_schedule=lr_schedule,
                                       warmup_steps=warmup_steps, noise_schedule=noise_schedule, precision=precision,
                                       gradient_checkpointing=gradient_checkpointing, seed=seed,
                                       save_every=save_every, state_dir=str(state_dir))
        with torch.inference_mode(False), torch.enable_grad():  # the host runs nodes in inference mode
            result, path = loop.train_motion(model, clip, vae, dataset, options, out, init, LAYOUTS[new_module_layout],
                                             lora_rank, lora_scale, _Progress(steps, unique_id),
                                             loop.latest_state(state_dir) if resume else None)
        if result.stopped:
            raise comfy.model_management.InterruptProcessingException()
        summary = (f"{path.name}: {result.steps} steps, final loss {result.losses[-1]:.4f}, "
                   f"{result.seconds_per_step:.2f} s/step, peak memory {result.peak_memory / 2 ** 20:.0f} MiB. "
                   f"Training states: {state_dir}")
        return {"ui": {"text": [summary]},
                "result": (path.name, loop.image_tensor(loop.loss_curve(result.losses)), summary)}


class _Progress:
    """The host's progress bar with the loss curve as its preview image; asks the loop to stop (saving its
    state) when the prompt is cancelled."""

    def __init__(self, steps: int, node_id):
        bar = comfy.utils.ProgressBar
        self.bar = bar(steps, node_id=node_id) if _takes_node_id(bar) else bar(steps)
        self.node_id = node_id
        self.every = max(1, steps // PREVIEWS)

    def __call__(self, step, total, loss, losses):
        if comfy.model_management.processing_interrupted():
            return True
        preview = ("PNG", loop.loss_curve(losses), 512) if step % self.every == 0 or step == total else None
        self.bar.update_absolute(step, total, preview)
        _progress_text(f"step {step}/{total}  loss {loss:.4f}", self.node_id)
        return False


@functools.lru_cache(maxsize=None)
def _takes_node_id(progress_bar_class) -> bool:
    """Whether the host's ProgressBar takes ``node_id=`` (0.3.75 does); older hosts' (December 2024) take only the
    total and report the running node themselves. Read once per class."""
    try:
        parameters = inspect.signature(progress_bar_class).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the oldest form is the safe call
        return False
    return any(p.name == "node_id" or p.kind is p.VAR_KEYWORD for p in parameters)


def _progress_text(text: str, node_id) -> None:
    try:
        from server import PromptServer
        server = PromptServer.instance
    except Exception:  # no server: tests, scripts
        return
    if node_id is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, node_id)


def _safe_stem(name: str) -> str:
    stem = Path(name.strip()).name
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or stem in (".", ".."):
        raise ValueError(f"save_name {name!r} is not a usable file name.")
    return stem


def _free_path(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.safetensors", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.safetensors"
    return path


def _clear_states(folder: Path) -> None:
    """Starting over: the training states an earlier run of this save_name left are removed."""
    old = sorted(folder.glob("step-*.pt")) if folder.is_dir() else []
    for path in old:
        path.unlink()
    if old:
        log.info("removed %d earlier training states in %s (resume is off)", len(old), folder)


NODE_CLASS_MAPPINGS = {"ADM_VideoDataset": VideoDataset, "ADM_TrainMotionModule": TrainMotionModule}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_VideoDataset": "Video Dataset (AnimateDiff training)",
                              "ADM_TrainMotionModule": "Train Motion Module (AnimateDiff)"}

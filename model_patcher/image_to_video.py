"""Image to video on a MODEL that carries a PIA or AnimateLCM-I2V motion module (Apply Motion Module's output).

**PIA** (Zhang et al., 2024, open-mmlab/PIA) widens the UNet input to 9 channels: the noisy latent (4), a mask
(1) and the start image's latent (4), in that order. The mask holds one value per frame, the "affinity" of that
frame to the image (1 = the image itself), read from a preset by the frame's distance to the image's frame. The
base model keeps its own first 4 input channels and bias, PIA adds its last 5 (as PIA with a DreamBooth model,
and diffusers' ``UNetMotionModel.from_unet2d``): since a convolution is linear in its input channels, we run the
host's own ``conv_in`` on the latent (its LoRAs, casts and offloading unchanged) and add PIA's 5-channel
convolution of [mask, image latent]. Both come in through the host: the extra channels as ``c_concat`` (an
APPLY_MODEL wrapper, per frame, per context window), the added convolution as a ``forward_timestep_embed_patch``
on the UNet's first layer, the only convolution that is a direct layer of a UNet block.

**AnimateLCM-I2V** (Wang et al., 2024, G-U-N/AnimateLCM) encodes the start image's latent into one feature map
per level (motion_modules/image_encoder.py) and adds level l's map to the input of the second motion module of
down block l (TemporalPatch reads it from ``transformer_options[ADDED_INPUT]``). The features depend on the image
and the frame's position in the window only, not on the step, so they are computed once per window length and
size, and dropped when sampling ends.

Everything hangs on a clone under one key; the MODEL passed in is untouched. Handlers kept in ``model_options``
hold no state (the host deep-copies model options on every clone); the image latent and the module live in the
wrappers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import WrappersMP

from ..motion_modules.image_encoder import DEFAULT_DRIFT
from ..motion_modules.motion_module import ANIMATELCM_I2V, PIA, MotionModule
from . import context_windows, motion_patcher

KEY = "animatediff_image_to_video"
PIA_WEIGHT = "animatediff_pia_conv_in"  # transformer_options: PIA's extra input weights for this call
LATENT_CHANNELS = 4

# PIA's affinity presets (open-mmlab/PIA animatediff/utils/util.py RANGE_LIST): the mask value of a frame at
# distance 0, 1, 2, ... from the image's frame; the last value holds for frames further away. Lower values let
# the frame drift further from the image: more motion. The loop presets come back to 1 at distance 15, so a
# 16-frame clip with the image at frame 0 ends on the image.
PIA_PRESETS = {
    "small motion": (1.0, 0.9, 0.85, 0.85, 0.85, 0.8),
    "moderate motion": (1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75),
    "large motion": (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5),
    "loop, small motion": (1.0, 0.9, 0.85, 0.85, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.85, 0.85, 0.9, 1.0),
    "loop, moderate motion": (1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75, 0.75, 0.75, 0.75, 0.75, 0.78, 0.79, 0.8, 0.8, 1.0),
    "loop, large motion": (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.8, 1.0),
    "style transfer, small motion": (0.5, 0.4, 0.4, 0.4, 0.35, 0.3),
    "style transfer, moderate motion": (0.5, 0.4, 0.4, 0.4, 0.35, 0.35, 0.3, 0.25, 0.2),
    "style transfer, large motion": (0.5, 0.2),
}


def pia_mask_values(preset: str, frame_indices, image_frame: int = 0) -> list[float]:
    """The mask value of each clip frame in ``frame_indices``: the preset's value at its distance from the image."""
    if preset not in PIA_PRESETS:
        raise ValueError(f"Unknown PIA motion intensity {preset!r}; choose one of {list(PIA_PRESETS)}.")
    values = PIA_PRESETS[preset]
    return [values[min(abs(i - image_frame), len(values) - 1)] for i in frame_indices]


def batch_frames(x: Tensor, transformer_options: dict) -> tuple[int, list[int]]:
    """(chunks, clip frame index of each frame of a chunk) for one UNet call: the batch is chunks (cond, uncond)
    x frames, chunk-major; inside a context window the frames are the window's (anchor first where there is one)."""
    chunks = len(transformer_options.get("cond_or_uncond") or [0])
    frames = x.shape[0] // chunks
    window = context_windows.window_frames(transformer_options.get("context_window"))
    return chunks, (window if window is not None and len(window) == frames else list(range(frames)))


def resized(latent: Tensor, height: int, width: int) -> Tensor:
    """The image latent at the sampled latent's size (nearest, as PIA resizes it)."""
    return latent if latent.shape[-2:] == (height, width) else F.interpolate(latent, size=(height, width))


def pia_conv_in(layer, x, emb, context, transformer_options, *unused):
    """``forward_timestep_embed_patch`` for the UNet's first convolution: with PIA's 9-channel input, the host's
    conv of the latent plus PIA's conv of [mask, image latent]; any other call runs the layer as it is."""
    extra = transformer_options.get(PIA_WEIGHT)
    channels = getattr(layer, "in_channels", None)
    if extra is None or channels is None or x.shape[1] != channels + extra.shape[1]:
        return layer(x)
    return layer(x[:, :channels]) + F.conv2d(x[:, channels:], extra.to(x), padding=layer.padding)


class PIAInput:
    """APPLY_MODEL wrapper: [mask, image latent] per frame as ``c_concat``, PIA's input weights for the conv patch."""

    def __init__(self, module: MotionModule, latent: Tensor, preset: str, image_frame: int):
        pia_mask_values(preset, [0], image_frame)  # refuse an unknown preset now
        self.module, self.latent, self.preset, self.image_frame = module, latent, preset, image_frame

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if c_concat is not None:
            raise ValueError("PIA Image Input: this model already gets extra input channels (an inpainting model, or a "
                             "second image input); PIA needs a plain 4-channel SD1.5 model.")
        chunks, indices = batch_frames(x, transformer_options)
        height, width = x.shape[-2:]
        mask = torch.tensor(pia_mask_values(self.preset, indices, self.image_frame), dtype=x.dtype, device=x.device)
        mask = mask.view(-1, 1, 1, 1).expand(-1, 1, height, width)
        image = resized(self.latent, height, width).to(x).expand(len(indices), -1, -1, -1)
        concat = torch.cat([mask, image], dim=1).repeat(chunks, 1, 1, 1)
        weight = self.module.conv_in.weight[:, LATENT_CHANNELS:]
        options = {**transformer_options, PIA_WEIGHT: weight.to(x.device, x.dtype)}
        return executor(x, t, concat, c_crossattn, control, options, **kwargs)


class I2VInput:
    """APPLY_MODEL wrapper: the image encoder's features for the second motion module of each down block."""

    def __init__(self, module: MotionModule, latent: Tensor, strength: float, drift: float):
        self.module, self.latent, self.strength, self.drift = module, latent, strength, drift
        self.targets = [block.motion_modules[1] for block in module.down_blocks]
        self.cache: dict[tuple, list[Tensor]] = {}

    def features(self, positions: int, height: int, width: int, like: Tensor) -> list[Tensor]:
        key = (positions, height, width, like.device, like.dtype)
        if key not in self.cache:
            encoder = self.module.img_encoder
            weight = encoder.conv_in.weight
            with torch.no_grad():
                maps = encoder(resized(self.latent, height, width).to(weight.device, weight.dtype), positions, self.drift)
            self.cache = {key: [(self.strength * m).to(like) for m in maps]}  # one window size at a time
        return self.cache[key]

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        chunks, indices = batch_frames(x, transformer_options)
        # positions count from 0 in each clip the motion modules see: the window, or each of several batched ones
        clip = context_windows.clip_frames(transformer_options.get("context_window"), len(indices))
        maps = self.features(clip, x.shape[-2], x.shape[-1], x)
        added = {**(transformer_options.get(motion_patcher.ADDED_INPUT) or {}),
                 **{layer: m.repeat(chunks * len(indices) // clip, 1, 1, 1) for layer, m in zip(self.targets, maps)}}
        return executor(x, t, c_concat, c_crossattn, control,
                        {**transformer_options, motion_patcher.ADDED_INPUT: added}, **kwargs)

    def forget(self, executor, *args, **kwargs):
        """OUTER_SAMPLE wrapper: drop the cached features when sampling ends (they hold device memory)."""
        try:
            return executor(*args, **kwargs)
        finally:
            self.cache = {}


def motion_module_of(model: ModelPatcher, family: str, node: str) -> MotionModule:
    """The motion module Apply Motion Module put on ``model``, refused unless it is of ``family``."""
    found = model.get_additional_models_with_key(motion_patcher.KEY)
    if not found:
        raise ValueError(f"{node}: this MODEL has no motion module. Connect the MODEL output of Apply Motion Module "
                         f"(with a {family} motion module loaded by Load Motion Module).")
    module = found[0].model
    config = module.config
    if config.family != family:
        raise ValueError(f"{node}: the motion module on this MODEL is '{config.extra.get('name')}' ({config.family}); "
                         f"this node needs a {family} module ({'pia.ckpt' if family == PIA else 'AnimateLCM-I2V.ckpt'}).")
    unet = model.model.diffusion_model
    if getattr(unet, "in_channels", LATENT_CHANNELS) != LATENT_CHANNELS:
        raise ValueError(f"{node}: this model's UNet takes {unet.in_channels} input channels (an inpainting or other "
                         f"special model); {family} needs a plain SD1.5 model with {LATENT_CHANNELS}.")
    return module


def encode_image(image, vae, model: ModelPatcher, node: str) -> Tensor:
    """One IMAGE ([1, H, W, C], 0..1) -> its latent as the sampler sees latents ([1, 4, h, w], scaled)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"{node}: image must be an IMAGE batch [frames, height, width, channels]; got "
                         f"{tuple(getattr(image, 'shape', ()))}.")
    if image.shape[0] != 1:
        raise ValueError(f"{node}: give one start image; this IMAGE holds {image.shape[0]}. Pick one with the host's "
                         "ImageFromBatch node.")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise ValueError(f"{node}: the image is {image.shape[2]}x{image.shape[1]} pixels; it needs at least 8x8 "
                         "(one latent pixel), best the clip's own size.")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{node}: the image holds NaN or infinite values.")
    latent = vae.encode(image[:, :, :, :3])
    if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"{node}: the VAE gave a latent of shape {tuple(latent.shape)}; an SD1.5 VAE gives "
                         f"[1, {LATENT_CHANNELS}, h, w].")
    return model.model.process_latent_in(latent).float()


def _finite(value, name: str, low: float, high: float, node: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{node}: {name} must be a number from {low:g} to {high:g}; got {value!r}.")
    return float(value)


def _clone_without_previous(model: ModelPatcher) -> ModelPatcher:
    """A clone of ``model`` without an earlier image input of ours, so a second one replaces it."""
    patched = model.clone()
    for wrapper_type in (WrappersMP.APPLY_MODEL, WrappersMP.OUTER_SAMPLE):
        patched.remove_wrappers_with_key(wrapper_type, KEY)
    patches = patched.model_options["transformer_options"].setdefault("patches", {})
    embed = [p for p in patches.get("forward_timestep_embed_patch", []) if p[1] is not pia_conv_in]
    patches["forward_timestep_embed_patch"] = embed  # a new list: the caller's model keeps its own
    return patched


def apply_pia(model: ModelPatcher, image, vae, preset: str, image_frame: int = 0) -> ModelPatcher:
    node = "PIA Image Input"
    module = motion_module_of(model, PIA, node)
    if not isinstance(image_frame, int) or image_frame < 0:
        raise ValueError(f"{node}: image_frame must be a frame index (0 or more); got {image_frame!r}.")
    wrapper = PIAInput(module, encode_image(image, vae, model, node), preset, image_frame)
    patched = _clone_without_previous(model)
    patches = patched.model_options["transformer_options"]["patches"]
    patches["forward_timestep_embed_patch"] = [(torch.nn.Conv2d, pia_conv_in)] + patches["forward_timestep_embed_patch"]
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, wrapper)
    return patched


def apply_animatelcm_i2v(model: ModelPatcher, image, vae, strength: float = 1.0,
                         drift: float = DEFAULT_DRIFT) -> ModelPatcher:
    node = "AnimateLCM-I2V Image Input"
    module = motion_module_of(model, ANIMATELCM_I2V, node)
    wrapper = I2VInput(module, encode_image(image, vae, model, node), _finite(strength, "strength", 0, 10, node),
                       _finite(drift, "drift", 0, 10, node))
    patched = _clone_without_previous(model)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, wrapper)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, wrapper.forget)
    return patched


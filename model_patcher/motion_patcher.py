"""A motion module inside the host: its own ModelPatcher (so the host loads, offloads and counts it like any
model), and a clone of MODEL that inserts it into the UNet at patch time and removes it at unpatch time.

Everything goes through the ModelPatcher's keyed extension points under one key; the MODEL passed in is
never modified, and nothing global is touched.
"""
from __future__ import annotations

from pathlib import Path

import comfy.model_management
import comfy.ops
from comfy.ldm.modules.attention import optimized_attention
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import PatcherInjection

from ..motion_modules import MotionModuleConfig, VanillaTemporalModule, load_motion_module
from . import placement

KEY = "animatediff_motion"


def load_motion_patcher(path: str | Path) -> ModelPatcher:
    """Read a motion-module file into a ModelPatcher, in the dtype the host runs UNets in on this device."""
    module = load_motion_module(path, ops=comfy.ops.disable_weight_init)
    params = sum(p.numel() for p in module.parameters())
    dtype = comfy.model_management.unet_dtype(model_params=params)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                        offload_device=comfy.model_management.unet_offload_device())


class TemporalPatch:
    """How the host UNet calls an inserted module (``forward_timestep_embed_patch``).

    The UNet batch is ``len(cond_or_uncond)`` chunks (cond, uncond, ...) of the same frames, chunk-major, so
    frames = batch // chunks whether the host runs cond and uncond together or apart, and inside a context
    window the batch holds just the window's frames.
    """

    def __init__(self, config: MotionModuleConfig, scale: float):
        self.config = config
        self.scale = scale

    def __call__(self, layer: VanillaTemporalModule, x, emb, context, transformer_options, *unused):
        if self.scale == 0:
            return x  # exactly the image model
        chunks = len(transformer_options.get("cond_or_uncond") or [0])
        frames = x.shape[0] // chunks
        if frames > self.config.max_frames:
            raise ValueError(
                f"{frames} frames, but motion module '{self.config.extra.get('name')}' ({self.config.family}) handles "
                f"at most {self.config.max_frames} at once (its positional encoding). Use a batch of at most "
                f"{self.config.max_frames} latents, or sample with context windows.")
        dtype = layer.temporal_transformer.proj_in.weight.dtype
        if x.dtype == dtype:
            return layer(x, frames, optimized_attention, self.config.norm_across_frames, self.scale)
        return layer(x.to(dtype), frames, optimized_attention, self.config.norm_across_frames, self.scale).to(x.dtype)


def _inject(patcher: ModelPatcher) -> None:
    module = patcher.get_additional_models_with_key(KEY)[0].model
    placement.inject(patcher.model.diffusion_model, module.config, module.in_unet_order(), module.config.extra.get("name"))


def _eject(patcher: ModelPatcher) -> None:
    placement.eject(patcher.model.diffusion_model)


def apply_motion_module(model: ModelPatcher, motion: ModelPatcher, scale: float = 1.0) -> ModelPatcher:
    """A clone of ``model`` that animates with ``motion``; a second apply on the result replaces the first."""
    config: MotionModuleConfig = motion.model.config
    placement.plan(model.model.diffusion_model, config, config.extra.get("name"))  # refuse before patching anything
    patched = model.clone()
    patched.set_additional_models(KEY, [motion.clone()])
    patched.set_injections(KEY, [PatcherInjection(inject=_inject, eject=_eject)])
    patches = patched.model_options["transformer_options"].setdefault("patches", {})
    embed_patches = [p for p in patches.get("forward_timestep_embed_patch", []) if not isinstance(p[1], TemporalPatch)]
    patches["forward_timestep_embed_patch"] = embed_patches + [(VanillaTemporalModule, TemporalPatch(config, scale))]
    return patched

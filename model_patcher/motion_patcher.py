"""A motion module inside the host: its own ModelPatcher (so the host loads, offloads and counts it like any
model), and a clone of MODEL that inserts it into the UNet at patch time and removes it at unpatch time.

Everything goes through the ModelPatcher's keyed extension points under one key (injections, additional
models, object patches, wrappers); the MODEL passed in is never modified and nothing global is touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.model_management
import comfy.ops
from comfy.ldm.modules.attention import optimized_attention
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import CallbacksMP, PatcherInjection, WrappersMP

from ..motion_modules import (MotionModuleConfig, VanillaTemporalModule, load_motion_module, read_state_dict,
                              sdpa_attention)
from ..motion_modules.motion_lora import check_fits, lora_pairs
from . import context_windows, frame_groupnorm, placement, prompt_schedule, schedules

KEY = "animatediff_motion"
MAX_SCALE = 10.0  # motion_scale's widget maximum; per-frame scales are held to the same range
# Hosts with multi-GPU sampling deep-clone the model per device and then call these callbacks (newer
# comfy/model_patcher.py, ModelPatcher.deepclone_multigpu); older hosts never call them.
ON_DEEPCLONE_MULTIGPU = getattr(CallbacksMP, "ON_DEEPCLONE_MULTIGPU", "on_deepclone_multigpu")
PLAIN_PASS = "animatediff_motion_plain_pass"  # transformer_options flag: run the UNet without the modules
# The host's fallback attentions (its CPU default) chunk long sequences at the cost of copies and many small ops;
# temporal attention runs over a few dozen frames, which torch SDPA takes in one call on q/k/v views.
TEMPORAL_ATTENTION = (sdpa_attention if getattr(optimized_attention, "__name__", "") in
                      ("attention_sub_quad", "attention_split", "attention_basic") else optimized_attention)


@dataclass(frozen=True)
class MotionOptions:
    scale: float | tuple[float, ...] = 1.0   # multiplies each module's residual; a tuple: one value per frame
    effect: float = 1.0                      # blend of the animated (1) and the unanimated (0) UNet prediction
    schedule: str = schedules.AUTOSELECT     # noise schedule: the family's own, "use existing" or a name
    frame_groupnorm: str = "autoselect"      # v1's ResNet GroupNorm across frames: autoselect / on / off
    stretch_positions: bool = False          # allow more frames than the encoding, by stretching it

    def __post_init__(self):
        # JSON NaN and inf pass the host's min/max checks (every comparison with NaN is false): refuse them here.
        scales = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        bad = [v for v in scales if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= MAX_SCALE)]
        if bad or not scales:
            raise ValueError(f"motion_scale must be a number from 0 to {MAX_SCALE:g} (per frame too); got {bad[0] if bad else '()'!r}. "
                             "1 is the module as trained, 0 turns it off.")
        if not (isinstance(self.effect, (int, float)) and math.isfinite(self.effect) and 0 <= self.effect <= 1):
            raise ValueError(f"effect must be a number from 0 to 1; got {self.effect!r}. 1 is the animated prediction, "
                             "0 the unanimated one.")


def load_motion_patcher(path: str | Path, disable_dynamic: bool = False) -> ModelPatcher:
    """Read a motion-module file into a ModelPatcher, in the dtype the host runs UNets in on this device.

    ``cached_patcher_init`` is the host's recipe for a fresh copy of a model (newer hosts read it to deep-clone
    a model and its additional models for each GPU, and pass ``disable_dynamic``; our patcher is never dynamic)."""
    module = load_motion_module(path, ops=comfy.ops.disable_weight_init)
    params = sum(p.numel() for p in module.parameters())
    dtype = comfy.model_management.unet_dtype(model_params=params)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    patcher = ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                           offload_device=comfy.model_management.unet_offload_device())
    patcher.cached_patcher_init = (load_motion_patcher, (str(path),))
    return patcher


def add_motion_lora(motion: ModelPatcher, path: str | Path, strength: float) -> ModelPatcher:
    """A clone of the motion module with a motion LoRA as host weight patches (removed exactly at unpatch)."""
    name = Path(path).name
    if not math.isfinite(strength):
        raise ValueError(f"Motion LoRA {name}: strength must be a finite number, got {strength!r}.")
    pairs = lora_pairs(read_state_dict(path), name)
    check_fits(pairs, motion.model.state_dict(), name, motion.model.config.family)
    patched = motion.clone()
    patched.add_patches({key: _lora_patch(up, down) for key, (up, down) in pairs.items()}, strength)
    return patched


def _lora_patch(up, down):
    try:  # ComfyUI 0.3.3x and newer: weight adapters
        from comfy.weight_adapter.lora import LoRAAdapter
        return LoRAAdapter(set(), (up, down, None, None, None, None))
    except ImportError:
        return ("lora", (up, down, None, None, None, None))


class TemporalPatch:
    """How the host UNet calls an inserted module (``forward_timestep_embed_patch``).

    The UNet batch is ``len(cond_or_uncond)`` chunks (cond, uncond, ...) of the same frames, chunk-major, so
    frames = batch // chunks whether the host runs cond and uncond together or apart, and inside a context
    window the batch holds just the window's frames (``transformer_options["context_window"]`` says which).
    """

    def __init__(self, config: MotionModuleConfig, scale: float | tuple[float, ...], stretch_positions: bool = False):
        self.config = config
        self.scale = scale
        self.stretch_positions = stretch_positions

    def __call__(self, layer: VanillaTemporalModule, x, emb, context, transformer_options, *unused):
        if self.scale == 0 or transformer_options.get(PLAIN_PASS):
            return x  # exactly the image model
        chunks = len(transformer_options.get("cond_or_uncond") or [0])
        frames = x.shape[0] // chunks
        if frames > self.config.max_frames and not self.stretch_positions:
            anchor = context_windows.anchor_of(transformer_options.get("context_window")) is not None
            raise ValueError(
                f"{frames} frames, but motion module '{self.config.extra.get('name')}' ({self.config.family}) handles "
                f"at most {self.config.max_frames} at once (its positional encoding). " + (
                    "The context handler adds an anchor frame to each window (causal_window_fix): turn that off, or "
                    f"use windows of at most {self.config.max_frames - 1} frames." if anchor else
                    "Sample with context windows (Context Windows node), use at most "
                    f"{self.config.max_frames} latents, or turn on stretch_positions."))
        scale = self.frame_scale(frames, chunks, transformer_options, x)
        dtype = layer.temporal_transformer.proj_in.weight.dtype
        if x.dtype == dtype:
            return layer(x, frames, TEMPORAL_ATTENTION, self.config.norm_across_frames, scale)
        return layer(x.to(dtype), frames, TEMPORAL_ATTENTION, self.config.norm_across_frames, scale).to(x.dtype)

    def frame_scale(self, frames: int, chunks: int, transformer_options: dict, x) -> float | torch.Tensor:
        if not isinstance(self.scale, tuple):
            return self.scale
        window = context_windows.window_frames(transformer_options.get("context_window"))
        indices = window if window is not None and len(window) == frames else range(frames)
        values = [self.scale[min(i, len(self.scale) - 1)] for i in indices]  # the last value holds to the end
        return torch.tensor(values, dtype=x.dtype, device=x.device).repeat(chunks).view(-1, 1, 1, 1)


def _inject(patcher: ModelPatcher) -> None:
    module = patcher.get_additional_models_with_key(KEY)[0].model
    placement.inject(patcher.model.diffusion_model, module.config, module.in_unet_order(), module.config.extra.get("name"))


def _eject(patcher: ModelPatcher) -> None:
    placement.eject(patcher.model.diffusion_model)


def _effect_wrapper(effect: float):
    """APPLY_MODEL wrapper: ``(1 - effect) * unanimated + effect * animated`` prediction (two UNet passes)."""
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        plain = executor(x, t, c_concat, c_crossattn, control, {**transformer_options, PLAIN_PASS: True}, **kwargs)
        if effect == 0:
            return plain
        animated = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        return torch.lerp(plain, animated, effect)
    return wrapper


def _remove_previous(patched: ModelPatcher) -> None:
    """Undo an earlier apply on this clone's lineage, so a second apply replaces it instead of stacking."""
    for key, obj in list(patched.object_patches.items()):
        if isinstance(obj, frame_groupnorm.FrameGroupNorm) or getattr(obj, "animatediff_motion", False):
            del patched.object_patches[key]
    for wrapper_type in (WrappersMP.DIFFUSION_MODEL, WrappersMP.APPLY_MODEL, WrappersMP.OUTER_SAMPLE):
        patched.remove_wrappers_with_key(wrapper_type, KEY)
    patched.remove_callbacks_with_key(ON_DEEPCLONE_MULTIGPU, KEY)


def _patch_frame_groupnorm(patched: ModelPatcher) -> None:
    """GroupNorm across frames for ``patched``'s own UNet (again for each GPU's copy: the norms share that
    copy's parameters, and each copy counts its own frames)."""
    frames = frame_groupnorm.FrameCount()
    for key, norm in frame_groupnorm.resnet_norm_patches(patched.model.diffusion_model, frames).items():
        patched.add_object_patch(key, norm)
    patched.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, frame_groupnorm.frame_count_wrapper(frames))


def apply_motion_module(model: ModelPatcher, motion: ModelPatcher, options: MotionOptions = MotionOptions()) -> ModelPatcher:
    """A clone of ``model`` that animates with ``motion``; a second apply on the result replaces the first."""
    config: MotionModuleConfig = motion.model.config
    name = config.extra.get("name")
    unet = model.model.diffusion_model
    placement.plan(unet, config, name)  # refuse before patching anything
    if options.frame_groupnorm not in ("autoselect", "on", "off"):
        raise ValueError(f"frame_groupnorm must be autoselect, on or off, not {options.frame_groupnorm!r}.")
    schedule = schedules.resolve(options.schedule, config.family)

    patched = model.clone()
    _remove_previous(patched)
    patched.set_additional_models(KEY, [motion.clone()])
    patched.set_injections(KEY, [PatcherInjection(inject=_inject, eject=_eject)])
    patches = patched.model_options["transformer_options"].setdefault("patches", {})
    embed_patches = [p for p in patches.get("forward_timestep_embed_patch", []) if not isinstance(p[1], TemporalPatch)]
    patches["forward_timestep_embed_patch"] = embed_patches + [(VanillaTemporalModule, TemporalPatch(config, options.scale, options.stretch_positions))]

    sampling = schedules.model_sampling(schedule, model.get_model_object("model_sampling"))
    if sampling is not None:
        patched.add_object_patch("model_sampling", sampling)
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, schedules.keep_schedules_apart(sampling))
    across_frames = {"on": True, "off": False}.get(options.frame_groupnorm, config.family in ("AnimateDiff v1", "HotshotXL"))
    if across_frames:
        _patch_frame_groupnorm(patched)
        patched.add_callback_with_key(ON_DEEPCLONE_MULTIGPU, KEY, lambda _, copy: _patch_frame_groupnorm(copy))
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, context_windows.adopt_stock_handler)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, prompt_schedule.check_frames)
    if options.effect != 1.0:
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, _effect_wrapper(options.effect))
    return patched

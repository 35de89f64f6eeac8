"""A motion module inside the host: its own ModelPatcher (so the host loads, offloads and counts it like any
model), and a clone of MODEL that inserts it into the UNet at patch time and removes it at unpatch time.

Everything goes through the ModelPatcher's keyed extension points under one key (injections, additional
models, object patches, wrappers); the MODEL passed in is never modified and nothing global is touched.
"""
from __future__ import annotations

import contextlib
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
from . import context_windows, frame_groupnorm, frame_lora, motion_slots, placement, prompt_schedule, schedules
from .block_scales import BlockScales
from .keyframes import MotionKeyframes, StepValues
from .motion_mask import MotionMask
from .motion_slots import MotionSlot

KEY = "animatediff_motion"
MAX_SCALE = 10.0  # motion_scale's widget maximum; per-frame scales are held to the same range
# Hosts with multi-GPU sampling deep-clone the model per device and then call these callbacks (newer
# comfy/model_patcher.py, ModelPatcher.deepclone_multigpu); older hosts never call them.
ON_DEEPCLONE_MULTIGPU = getattr(CallbacksMP, "ON_DEEPCLONE_MULTIGPU", "on_deepclone_multigpu")
PLAIN_PASS = "animatediff_motion_plain_pass"  # transformer_options flag: run the UNet without the modules
STEP_VALUES = "animatediff_motion_step"  # transformer_options: the keyframes' StepValues at this step
ADDED_INPUT = "animatediff_added_input"  # transformer_options: {module: tensor added to its input} (image_to_video)
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
    block_scales: BlockScales = BlockScales()  # factors per UNet block (down / mid / up, per slot)
    mask: MotionMask | None = None           # spatial motion mask (per frame or for all), multiplies the residual
    keyframes: MotionKeyframes | None = None  # scale, effect and module weights over the sampling steps
    module_weights: tuple[float, ...] | None = None  # one per motion module; None: equal weights summing to 1

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
        for name, value, kind in (("block_scales", self.block_scales, BlockScales), ("motion_mask", self.mask, MotionMask),
                                  ("keyframes", self.keyframes, MotionKeyframes)):
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__name__}, not {type(value).__name__}.")
        weights = self.module_weights
        if weights is not None and (not weights or not all(isinstance(w, (int, float)) and math.isfinite(w)
                                                          and 0 <= w <= MAX_SCALE for w in weights)):
            raise ValueError(f"module_weights must be numbers from 0 to {MAX_SCALE:g}, one per motion module; got "
                             f"{weights!r}. Leave it empty for equal weights.")


def load_motion_patcher(path: str | Path, disable_dynamic: bool = False) -> ModelPatcher:
    """Read a motion-module file into a ModelPatcher, in the dtype the host runs UNets in on this device.

    ``cached_patcher_init`` is the host's recipe for a fresh copy of a model (newer hosts read it to deep-clone
    a model and its additional models for each GPU, and pass ``disable_dynamic``; our patcher is never dynamic)."""
    return patcher_in_unet_dtype(load_motion_module(path, ops=comfy.ops.disable_weight_init),
                                 (load_motion_patcher, (str(path),)))


def patcher_in_unet_dtype(module: torch.nn.Module, recipe: tuple) -> ModelPatcher:
    """``module`` (cast to the dtype the host runs UNets in on this device) in a ModelPatcher whose
    ``cached_patcher_init`` is ``recipe``: (function, args) that makes a fresh copy."""
    dtype = comfy.model_management.unet_dtype(model_params=sum(p.numel() for p in module.parameters()))
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    patcher = ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                           offload_device=comfy.model_management.unet_offload_device())
    patcher.cached_patcher_init = recipe
    return patcher


def add_motion_lora(motion: ModelPatcher, path: str | Path, strength: float,
                    strength_per_frame: tuple[float, ...] = ()) -> ModelPatcher:
    """A clone of the motion module with a motion LoRA as host weight patches (removed exactly at unpatch); with
    ``strength_per_frame`` (times ``strength``, the last value holding to the end) applied per frame in the
    forward instead (frame_lora.py)."""
    name = Path(path).name
    bad = [v for v in (strength, *strength_per_frame) if not (isinstance(v, (int, float)) and math.isfinite(v))]
    if bad:
        raise ValueError(f"Motion LoRA {name}: strength (and strength_per_frame) must be finite numbers, got {bad[0]!r}.")
    pairs = lora_pairs(read_state_dict(path), name)
    check_fits(pairs, motion.model.state_dict(), name, motion.model.config.family)
    patched = motion.clone()
    if strength_per_frame:
        earlier = patched.model_options.get(frame_lora.FRAME_LORAS, ())
        patched.model_options[frame_lora.FRAME_LORAS] = (*earlier, (pairs, float(strength), tuple(strength_per_frame)))
        return patched
    patched.add_patches({key: _lora_patch(up, down) for key, (up, down) in pairs.items()}, strength)
    # kept so that step keyframes of the LoRA's strength can move it into the forward (frame_lora.in_forward)
    patched.model_options[frame_lora.WEIGHT_LORAS] = (*patched.model_options.get(frame_lora.WEIGHT_LORAS, ()),
                                                      (pairs, float(strength)))
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

    The residual's scale is the product of: motion_scale (or the frame's), the spatial mask at this block's
    resolution, the block's factor, the module's weight and the step's keyframe factor. A layer is either a
    single inserted module (one module, neutral block scales: the original path) or a ``MotionSlot``.
    """

    def __init__(self, config: MotionModuleConfig, scale: float | tuple[float, ...], stretch_positions: bool = False, *,
                 configs: tuple[MotionModuleConfig, ...] = (), weights: tuple[float, ...] = (1.0,),
                 block_scales: BlockScales = BlockScales(), mask: MotionMask | None = None,
                 frame_loras: dict[int, dict[str, list]] | None = None):
        self.config = config
        self.scale = scale
        self.stretch_positions = stretch_positions
        self.configs = configs or (config,)  # each motion module of the apply, in order (MotionSlot.indices)
        self.weights = weights
        self.block_scales = block_scales
        self.mask = mask
        self.frame_loras = frame_loras or {}  # module index -> slot -> per-frame LoRA layers (frame_lora.by_slot)

    def __call__(self, layer: VanillaTemporalModule | MotionSlot, x, emb, context, transformer_options, *unused):
        if self.scale == 0 or transformer_options.get(PLAIN_PASS):
            return x  # exactly the image model
        runs = self.runs(layer, transformer_options)
        if not runs:
            return x  # every module here is weighted or scaled to 0: exactly the image model's block
        added_inputs = transformer_options.get(ADDED_INPUT) or {}
        added = next((added_inputs[m] for m, _, _, _ in runs if m in added_inputs), None)
        if added is not None:
            x = x + added
        chunks = len(transformer_options.get("cond_or_uncond") or [0])
        frames = x.shape[0] // chunks
        # frames per clip for the modules: one window's when the context handler batched several (its frames in
        # order per chunk, which is what the per-frame indices below describe)
        clip = context_windows.clip_frames(transformer_options.get("context_window"), frames)
        for _, config, _, _ in runs:
            self.check_length(config, clip, transformer_options)
        scale = self.frame_scale(frames, chunks, transformer_options, x)
        if self.mask is not None:
            indices = self.frame_indices(frames, transformer_options)
            scale = self.mask.at(indices, chunks, x.shape[-2], x.shape[-1], x) * scale
        if isinstance(layer, MotionSlot):
            loras = self.frame_lora_hooks(layer.where, runs, frames, chunks, clip, transformer_options, x)
            return motion_slots.side_by_side(x, [(m, c.norm_across_frames, scale * f if f != 1.0 else scale, lora)
                                                 for (m, c, f, _), lora in zip(runs, loras)], clip, TEMPORAL_ATTENTION)
        factor = runs[0][2]
        if factor != 1.0:
            scale = scale * factor
        dtype = layer.temporal_transformer.proj_in.weight.dtype
        if x.dtype == dtype:
            return layer(x, clip, TEMPORAL_ATTENTION, self.config.norm_across_frames, scale)
        return layer(x.to(dtype), clip, TEMPORAL_ATTENTION, self.config.norm_across_frames, scale).to(x.dtype)

    def runs(self, layer, transformer_options: dict) -> list[tuple[VanillaTemporalModule, MotionModuleConfig, float, int]]:
        """(module, its config, factor, its index in the apply) for each module at this layer whose factor is not 0."""
        step: StepValues | None = transformer_options.get(STEP_VALUES)
        weights = (step.module_weights if step is not None and step.module_weights else None) or self.weights
        step_scale = step.scale if step is not None else 1.0
        if isinstance(layer, MotionSlot):
            block = self.block_scales.factor(layer.where)
            found = [(m, self.configs[i], weights[i] * block * step_scale, i) for i, m in zip(layer.indices, layer.members)]
        else:
            found = [(layer, self.config, weights[0] * step_scale, 0)]
        return [run for run in found if run[2] != 0]

    def frame_lora_hooks(self, where: str, runs, frames: int, chunks: int, clip: int, transformer_options: dict, x):
        """Per run, a context that applies its module's per-frame motion LoRAs at this slot during its call."""
        contexts = []
        for module, _, _, index in runs:
            entries = self.frame_loras.get(index, {}).get(where)
            if not entries:
                contexts.append(contextlib.nullcontext())
                continue
            indices = self.frame_indices(frames, transformer_options)
            step: StepValues | None = transformer_options.get(STEP_VALUES)
            factor = step.lora_strength if step is not None else 1.0
            contexts.append(frame_lora.applied(module, [
                (path, up, down, strength * factor, self._frame_values(values, indices, chunks, x))
                for path, up, down, strength, values in entries], clip))
        return contexts

    @staticmethod
    def _frame_values(values: tuple[float, ...], indices, chunks: int, x) -> torch.Tensor:
        picked = [values[min(i, len(values) - 1)] for i in indices]  # the last value holds to the end
        return torch.tensor(picked, dtype=x.dtype, device=x.device).repeat(chunks)

    def check_length(self, config: MotionModuleConfig, frames: int, transformer_options: dict) -> None:
        if frames > config.max_frames and not self.stretch_positions:
            anchor = context_windows.anchor_of(transformer_options.get("context_window")) is not None
            raise ValueError(
                f"{frames} frames, but motion module '{config.extra.get('name')}' ({config.family}) handles "
                f"at most {config.max_frames} at once (its positional encoding). " + (
                    "The context handler adds an anchor frame to each window (causal_window_fix): turn that off, or "
                    f"use windows of at most {config.max_frames - 1} frames." if anchor else
                    "Sample with context windows (Context Windows node), use at most "
                    f"{config.max_frames} latents, or turn on stretch_positions."))

    @staticmethod
    def frame_indices(frames: int, transformer_options: dict):
        """The clip frames in this batch: the context window's, or all of them."""
        window = context_windows.window_frames(transformer_options.get("context_window"))
        return window if window is not None and len(window) == frames else range(frames)

    def frame_scale(self, frames: int, chunks: int, transformer_options: dict, x) -> float | torch.Tensor:
        if not isinstance(self.scale, tuple):
            return self.scale
        indices = self.frame_indices(frames, transformer_options)
        values = [self.scale[min(i, len(self.scale) - 1)] for i in indices]  # the last value holds to the end
        return torch.tensor(values, dtype=x.dtype, device=x.device).repeat(chunks).view(-1, 1, 1, 1)


def _inject(patcher: ModelPatcher) -> None:
    module = patcher.get_additional_models_with_key(KEY)[0].model
    placement.inject(patcher.model.diffusion_model, module.config, module.in_unet_order(), module.config.extra.get("name"))


def _inject_slots(patcher: ModelPatcher) -> None:
    modules = [m.model for m in patcher.get_additional_models_with_key(KEY)]
    motion_slots.inject(patcher.model.diffusion_model, [(m.config, m.in_unet_order()) for m in modules])


def _eject(patcher: ModelPatcher) -> None:
    motion_slots.eject(patcher.model.diffusion_model)


def _step_wrapper(effect: float, keyframes: MotionKeyframes | None, weights: tuple[float, ...]):
    """APPLY_MODEL wrapper: the keyframes' values at this step (from the sigma the model is called at, on the
    patched model's own schedule) for the motion patch, and the prediction ``(1 - e) * unanimated + e * animated``
    for the effect e (Apply's, times the keyframe's): two UNet passes where e is neither 0 nor 1."""
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        animated_options, blend = transformer_options, effect
        if keyframes is not None:
            step = keyframes.at(float(t.max()), executor.class_obj.model_sampling, weights)
            animated_options, blend = {**transformer_options, STEP_VALUES: step}, effect * step.effect
        if blend == 1.0:
            return executor(x, t, c_concat, c_crossattn, control, animated_options, **kwargs)
        plain = executor(x, t, c_concat, c_crossattn, control, {**transformer_options, PLAIN_PASS: True}, **kwargs)
        if blend == 0.0:
            return plain
        animated = executor(x, t, c_concat, c_crossattn, control, animated_options, **kwargs)
        return torch.lerp(plain, animated, blend)
    return wrapper


def _mask_frames_wrapper(mask: MotionMask):
    """OUTER_SAMPLE wrapper: refuse a mask made for another clip length before the first step."""
    def wrapper(executor, noise, *args, **kwargs):
        mask.check_frames(noise.shape[0])
        return executor(noise, *args, **kwargs)
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


def apply_motion_module(model: ModelPatcher, motion: ModelPatcher, options: MotionOptions = MotionOptions(),
                        more_motion: tuple[ModelPatcher, ...] = ()) -> ModelPatcher:
    """A clone of ``model`` that animates with ``motion`` (and ``more_motion``: further modules, blended by
    ``options.module_weights``); a second apply on the result replaces the first. The first module's family
    picks the noise schedule and frame GroupNorm."""
    motions = (motion, *more_motion)
    configs = tuple(m.model.config for m in motions)
    config: MotionModuleConfig = configs[0]
    unet = model.model.diffusion_model
    for each in configs:
        placement.plan(unet, each, each.extra.get("name"))  # refuse before patching anything
    if options.frame_groupnorm not in ("autoselect", "on", "off"):
        raise ValueError(f"frame_groupnorm must be autoselect, on or off, not {options.frame_groupnorm!r}.")
    weights = options.module_weights or (1.0 / len(motions),) * len(motions)  # equal, summing to 1
    if len(weights) != len(motions):
        raise ValueError(f"module_weights gives {len(weights)} weight(s) for {len(motions)} motion module(s): give one "
                         "per module (motion_module, motion_module_2, ...), or leave it empty for equal weights.")
    options.block_scales.check_slots(motion_slots.slot_names(unet, list(configs)))
    if options.keyframes is not None:
        options.keyframes.check_modules(len(motions))
        if options.keyframes.sets_lora_strength:
            motions = tuple(frame_lora.in_forward(m) for m in motions)
    schedule = schedules.resolve(options.schedule, config.family)

    patched = model.clone()
    _remove_previous(patched)
    patched.set_additional_models(KEY, [m.clone() for m in motions])
    frame_loras = {i: frame_lora.by_slot(m.model_options[frame_lora.FRAME_LORAS], c,
                                         [s.where for s in placement.plan(unet, c, c.extra.get("name"))])
                   for i, (m, c) in enumerate(zip(motions, configs)) if m.model_options.get(frame_lora.FRAME_LORAS)}
    # MotionSlots name their block, which per-block scales and per-frame LoRAs need; else the original path
    in_slots = len(motions) > 1 or not options.block_scales.neutral or bool(frame_loras)
    patched.set_injections(KEY, [PatcherInjection(inject=_inject_slots if in_slots else _inject, eject=_eject)])
    patches = patched.model_options["transformer_options"].setdefault("patches", {})
    embed_patches = [p for p in patches.get("forward_timestep_embed_patch", []) if not isinstance(p[1], TemporalPatch)]
    patch = TemporalPatch(config, options.scale, options.stretch_positions, configs=configs, weights=weights,
                          block_scales=options.block_scales, mask=options.mask, frame_loras=frame_loras)
    patches["forward_timestep_embed_patch"] = embed_patches + [(VanillaTemporalModule, patch)] + (
        [(MotionSlot, patch)] if in_slots else [])

    sampling = schedules.model_sampling(schedule, model.get_model_object("model_sampling"))
    if sampling is not None:
        patched.add_object_patch("model_sampling", sampling)
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, schedules.keep_schedules_apart(sampling))
    across_frames = {"on": True, "off": False}.get(options.frame_groupnorm, config.family in ("AnimateDiff v1", "HotshotXL", "PIA"))
    if across_frames:
        _patch_frame_groupnorm(patched)
        patched.add_callback_with_key(ON_DEEPCLONE_MULTIGPU, KEY, lambda _, copy: _patch_frame_groupnorm(copy))
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, context_windows.adopt_stock_handler)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, prompt_schedule.check_frames)
    if options.mask is not None:
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, _mask_frames_wrapper(options.mask))
    if options.keyframes is not None or options.effect != 1.0:
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, _step_wrapper(options.effect, options.keyframes, weights))
    return patched

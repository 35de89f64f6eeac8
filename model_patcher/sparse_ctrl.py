"""SparseCtrl in the host's ControlNet path: a ``comfy.controlnet.ControlNet`` whose hint is one condition per
frame plus the condition mask, so it chains with other ControlNets (``previous_controlnet``), is loaded and
offloaded by the host with the model (``get_models``), honours strength and start/end percent, and inside
context windows gets its window's frames.

The hint (``cond_hint_original``) holds the whole clip: ``[frames, condition channels + 1, h, w]``, the keyframe
conditions at their frame indices, zeros elsewhere, and a last channel that is 1 on keyframes (AnimateDiff's
``controlnet_cond`` / ``controlnet_conditioning_mask``). Because the mask travels inside the hint, our context
handler's per-window slicing of ControlNet hints (context_windows.window_hints) hands each window its own frames'
conditions and mask with no SparseCtrl-specific code there.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

import comfy.controlnet
import comfy.model_management
import comfy.ops
import comfy.utils
from comfy.ldm.modules.attention import optimized_attention

from ..motion_modules.sparse_ctrl import RGB, SparseCtrlModel, build, detect, read_sparse_ctrl
from .motion_patcher import TEMPORAL_ATTENTION


class SparseCtrlControl(comfy.controlnet.ControlNet):
    """The host's ControlNet with SparseCtrl's forward; ``frames`` = batch // cond/uncond chunks, as for the
    motion modules (TemporalPatch)."""

    def __init__(self, control_model: SparseCtrlModel | None = None, load_device=None, manual_cast_dtype=None,
                 dtype=torch.float32):
        super().__init__(control_model, load_device=load_device, manual_cast_dtype=manual_cast_dtype, extra_conds=[])
        self.dtype = manual_cast_dtype or dtype
        self.compression_ratio = 1  # the hint is prepared here, at its own scale: see _hint

    @property
    def config(self):
        return self.control_model.config

    def copy(self):
        c = SparseCtrlControl(None, load_device=self.load_device, manual_cast_dtype=self.manual_cast_dtype,
                              dtype=self.dtype)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        return c

    def _hint(self, x_noisy: Tensor, frames: int) -> Tensor:
        """This call's hint, [frames, channels, h, w] on the sampler's device: rgb at the latent size, scribble at
        8x it (the embedding downsamples 8x). Cached until the window or the latent size changes."""
        hint = self.cond_hint_original
        if hint is None:
            raise ValueError("SparseCtrl: no keyframes were set. Use Apply SparseCtrl (AnimateDiff).")
        if hint.shape[0] != frames:
            raise ValueError(
                f"SparseCtrl ({self.config.name}) was applied for a clip of {hint.shape[0]} frames, but the sampler "
                f"runs {frames} frames at once. Set 'frames' on Apply SparseCtrl to the latent batch size (the whole "
                "clip's length, also with context windows).")
        scale = 1 if self.config.kind == RGB else 8
        size = (x_noisy.shape[-2] * scale, x_noisy.shape[-1] * scale)
        cached = self.cond_hint
        if cached is None or cached.shape[0] != frames or tuple(cached.shape[-2:]) != size:
            if tuple(hint.shape[-2:]) != size:
                method = "bilinear" if self.config.kind == RGB else self.upscale_algorithm
                hint = comfy.utils.common_upscale(hint, size[1], size[0], method, "center")
            self.cond_hint = hint.to(device=x_noisy.device, dtype=self.dtype)
        return self.cond_hint

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return previous
        frames = x_noisy.shape[0] // batched_number
        hint = self._hint(x_noisy, frames).repeat(batched_number, 1, 1, 1)  # chunk-major, like the latents
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        if context.shape[-1] != self.config.context_dim:
            raise ValueError(f"SparseCtrl ({self.config.name}) is for SD1.5 (text width {self.config.context_dim}); "
                             f"this model's conditioning is {context.shape[-1]} wide. Use an SD1.5 checkpoint.")
        timestep = self.model_sampling_current.timestep(t)
        down, mid = self.control_model(
            hint, timestep.to(x_noisy.device, self.dtype), comfy.model_management.cast_to_device(context, x_noisy.device, self.dtype),
            frames, attention=optimized_attention, temporal_attention=TEMPORAL_ATTENTION)
        return self.control_merge({"input": [], "middle": [mid], "output": down}, previous, output_dtype=None)


def load_sparse_ctrl(path: str | Path) -> SparseCtrlControl:
    """A SparseCtrl file as a control for Apply SparseCtrl, in the dtype the host picks for a UNet here."""
    sd = read_sparse_ctrl(path)
    config = detect(sd, Path(path).name)
    load_device = comfy.model_management.get_torch_device()
    dtype = comfy.model_management.unet_dtype(model_params=sum(v.numel() for v in sd.values()))
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device)
    ops = comfy.ops.manual_cast if manual_cast is not None else comfy.ops.disable_weight_init
    model = build({k: v.to(dtype) for k, v in sd.items()}, config, ops)
    return SparseCtrlControl(model, load_device=load_device, manual_cast_dtype=manual_cast, dtype=dtype)


def parse_keyframes(text: str, count: int, frames: int) -> list[int]:
    """"0, 8, 15" -> [0, 8, 15]: one frame index per condition image, each in 0..frames-1, no repeats."""
    try:
        indices = [int(v) for v in str(text).replace("\n", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"keyframes must be frame indices separated by commas, like '0, 8, 15'; got {text!r}.") from None
    if len(indices) != count:
        raise ValueError(f"keyframes lists {len(indices)} frame(s) ({text!r}) but {count} image(s) were given: give "
                         "one frame index per image, in the images' order.")
    bad = [i for i in indices if not 0 <= i < frames]
    if bad:
        raise ValueError(f"keyframes {bad} are outside the clip's frames 0..{frames - 1} (frames = {frames}).")
    if len(set(indices)) != len(indices):
        raise ValueError(f"keyframes {indices} name a frame twice; give each frame one image.")
    return indices


def keyframe_hint(condition: Tensor, indices: list[int], frames: int) -> Tensor:
    """[keyframes, c, h, w] conditions -> [frames, c + 1, h, w]: each at its frame, zeros elsewhere, then the mask."""
    if condition.dim() != 4 or condition.shape[0] != len(indices):
        raise ValueError(f"expected {len(indices)} conditions as [n, c, h, w], got {list(condition.shape)}.")
    if not bool(torch.isfinite(condition).all()):
        raise ValueError("the SparseCtrl condition holds NaN/inf values; check the images (and the VAE).")
    hint = torch.zeros(frames, condition.shape[1] + 1, *condition.shape[-2:], dtype=torch.float32)
    hint[indices, :-1] = condition.float().cpu()
    hint[indices, -1] = 1.0
    return hint


def scribble_condition(images: Tensor) -> Tensor:
    """IMAGE [n, h, w, c] -> [n, 3, h, w], the line art as it is (0..1 RGB): the published v3 sketch configs leave
    AnimateDiff's optional grey-and-stretch step (``normalize_condition_images``) off."""
    return images[..., :3].float().movedim(-1, 1)


def apply_sparse_ctrl(positive, negative, control: SparseCtrlControl, hint: Tensor, strength: float,
                      start_percent: float, end_percent: float):
    """Attach ``control`` with ``hint`` to every conditioning entry, after the ControlNets already there, as the
    host's Apply ControlNet (Advanced) does; the conditionings passed in are not changed."""
    if not isinstance(control, SparseCtrlControl):
        raise ValueError("sparse_ctrl must come from Load SparseCtrl (AnimateDiff).")
    for name, value in (("strength", strength), ("start_percent", start_percent), ("end_percent", end_percent)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}.")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy "
                         "0 <= start <= end <= 1.")
    if strength == 0:
        return positive, negative
    made = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for embedding, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if previous not in made:
                made[previous] = control.copy().set_cond_hint(hint, strength, (start_percent, end_percent))
                made[previous].set_previous_controlnet(previous)
            options["control"] = made[previous]
            options["control_apply_to_uncond"] = False
            entries.append([embedding, options])
        out.append(entries)
    return out[0], out[1]

"""Long clips through the host's own context windows (``comfy.context_windows``), with AnimateDiff defaults.

Each window's latents are denoised as one clip, so our temporal modules see only that window's frames
(positions 0..len-1, the cond/uncond split unchanged) and the host fuses the overlapping results. ComfyUI
0.3.75 built its handler for video models whose frames are not the batch; with frames in the batch (dim 0)
three things need our handler:
- the current step is found by comparing the schedule with the timestep tensor, which has one entry per
  frame here: we compare the first frame's (all frames share the step's sigma);
- per-frame conditionings (prompt travel) are not cut to the window: we cut them;
- a ControlNet given one hint per frame would feed every window the first frames' hints: while a window is
  evaluated, each ControlNet in its conds holds that window's hints.
The stock Context Windows node works too: models with a motion module swap its handler for ours per run.

Windows are plain runs of consecutive frames, as the motion modules were trained on. Newer hosts (around 0.20,
comfy/context_windows.py ``IndexListContextHandler(causal_window_fix=True)``, the default, also in the stock
node) prepend an anchor frame, the one before the window, to every window; our handlers turn that off. Where a
window carries an anchor anyway (another handler), ``window_frames`` lists it first, so per-frame settings stay
aligned with the frames the UNet sees.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from . import free_noise, host_features

try:
    import comfy.context_windows as host_windows
except ImportError:  # ComfyUI before context windows (0.3.4x)
    host_windows = None

SCHEDULES = ["standard_uniform", "standard_static", "looped_uniform", "batched"]
FUSE_METHODS = ["pyramid", "flat", "overlap-linear", "relative"]
HOST_HAS_WINDOWS = host_windows is not None and hasattr(host_windows, "IndexListContextHandler")


def anchor_of(window) -> int | None:
    """The anchor frame newer hosts prepend to a window (``causal_anchor_index``), or None."""
    anchor = getattr(window, "causal_anchor_index", None)
    return anchor if isinstance(anchor, int) and anchor >= 0 else None


def window_frames(window) -> list[int] | None:
    """The clip frames a window's UNet batch holds, in order (the anchor first where there is one)."""
    if window is None:
        return None
    anchor = anchor_of(window)
    return ([anchor] if anchor is not None else []) + list(window.index_list)


def _controls(conds):
    for cond in conds or []:
        for entry in cond or []:
            control = entry.get("control") if isinstance(entry, dict) else None
            while control is not None:
                yield control
                control = control.previous_controlnet


@contextlib.contextmanager
def window_hints(conds, index_list, full_length: int):
    """Give per-frame ControlNet hints of the whole clip only this window's frames, restoring them after."""
    saved = []
    try:
        for control in _controls(conds):
            hint = getattr(control, "cond_hint_original", None)
            if hint is not None and hint.shape[0] == full_length > 1 and all(c is not control for c, *_ in saved):
                saved.append((control, hint, control.cond_hint))
                control.cond_hint_original, control.cond_hint = hint[index_list], None
        yield
    finally:
        for control, hint, cached in saved:
            control.cond_hint_original, control.cond_hint = hint, cached


if HOST_HAS_WINDOWS:
    class AnimateDiffContextHandler(host_windows.IndexListContextHandler):
        """The host's handler, made right for windows along the batch axis (see the module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.causal_window_fix = False  # plain windows (see the module docstring); older hosts have no anchor

        def set_step(self, timestep, model_options):
            super().set_step(timestep.reshape(-1)[:1], model_options)

        def get_resized_cond(self, cond_in, x_in, window, device=None):
            resized = super().get_resized_cond(cond_in, x_in, window, device)
            for entry in resized or []:
                model_conds = entry.get("model_conds")
                for key, value in (model_conds or {}).items():
                    cond = getattr(value, "cond", None)
                    if isinstance(cond, torch.Tensor) and cond.ndim and cond.shape[0] == x_in.shape[0] > len(window.index_list):
                        entry["model_conds"] = model_conds = dict(model_conds)  # the sampler's own stay whole
                        model_conds[key] = value._copy_with(window.get_tensor(cond, device))
            return resized

        def evaluate_context_windows(self, calc_cond_batch, model, x_in, conds, timestep, enumerated_context_windows,
                                     *args, **kwargs):
            results = []
            for enumerated in enumerated_context_windows:
                with window_hints(conds, enumerated[1].index_list, x_in.size(self.dim)):
                    results += super().evaluate_context_windows(calc_cond_batch, model, x_in, conds, timestep,
                                                                [enumerated], *args, **kwargs)
            return results


def require_host_windows():
    host_features.require("context windows")
    return host_windows


def make_handler(context_length: int, context_overlap: int, schedule: str, fuse_method: str,
                 context_stride: int = 1, closed_loop: bool = False):
    windows = require_host_windows()
    if schedule not in SCHEDULES or fuse_method not in FUSE_METHODS:
        raise ValueError(f"schedule must be one of {SCHEDULES} and fuse_method one of {FUSE_METHODS}.")
    if context_overlap >= context_length:
        raise ValueError(f"context_overlap ({context_overlap}) must be smaller than context_length ({context_length}).")
    return AnimateDiffContextHandler(
        context_schedule=windows.get_matching_context_schedule(schedule),
        fuse_method=windows.get_matching_fuse_method(fuse_method),
        context_length=context_length, context_overlap=context_overlap, context_stride=context_stride,
        closed_loop=closed_loop, dim=0)


def apply_context_windows(model, handler):
    """A clone of MODEL that samples with ``handler``'s windows (and counts memory per window, not per clip)."""
    patched = model.clone()
    patched.model_options["context_handler"] = handler
    require_host_windows().create_prepare_sampling_wrapper(patched)
    return patched


def adopt_stock_handler(executor, noise, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a handler from the stock Context Windows node (batch axis) runs as ours, for this
    run only (the sampler works on its own copy of the model options): plain windows without the anchor frame,
    and its FreeNoise option done by our FreeNoise, once (free_noise.take_over_host_free_noise)."""
    options = executor.class_obj.model_options
    handler = options.get("context_handler")
    if HOST_HAS_WINDOWS and type(handler) is host_windows.IndexListContextHandler and handler.dim == 0:
        ours = AnimateDiffContextHandler.__new__(AnimateDiffContextHandler)
        ours.__dict__.update(handler.__dict__)
        if getattr(handler, "causal_window_fix", False):
            logging.info("AnimateDiff: context windows without the anchor frame (causal_window_fix off for this "
                         "model): motion modules were trained on plain consecutive frames.")
        ours.causal_window_fix = False
        options["context_handler"] = ours
        if free_noise.take_over_host_free_noise(ours):
            ours_on = free_noise.registered(options)
            logging.warning("AnimateDiff: the Context Windows node's freenoise is replaced by AnimateDiff's FreeNoise "
                            "for this model (%s), so the noise is rescheduled once.",
                            "Sampling Options' settings" if ours_on else "the node's windows")
            if ours_on is None and noise.ndim == 4:
                seed = kwargs.get("seed", args[6] if len(args) > 6 else None)
                noise = free_noise.rescheduler(options).reschedule(noise, seed, options)
    return executor(noise, *args, **kwargs)

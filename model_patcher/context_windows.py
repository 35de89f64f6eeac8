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

``windows_per_batch`` (off by default) evaluates up to N windows of one length in one UNet call: the windows'
frames one after another along the batch axis, so each step costs fewer, larger calls. To code that indexes
frames (per-frame conds, hints, scales, masks) such a batch is a window listing those frames in batch order; the
temporal modules take each window's frames as a clip of its own (``clip_frames``). Results equal window by window
up to float rounding. Where a part of the run counts a clip as the whole batch (GroupNorm across frames, a
ControlNet with temporal layers, handler callbacks, an anchor frame), windows go one by one as before.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
from comfy.patcher_extension import WrappersMP

from . import free_noise, frame_groupnorm, host_features

try:
    import comfy.context_windows as host_windows
except ImportError:  # ComfyUI before context windows (0.3.4x)
    host_windows = None

SCHEDULES = ["standard_uniform", "standard_static", "looped_uniform", "batched"]
FUSE_METHODS = ["pyramid", "flat", "overlap-linear", "relative"]
HOST_HAS_WINDOWS = host_windows is not None and hasattr(host_windows, "IndexListContextHandler")
MAX_WINDOWS_PER_BATCH = 16
CLIP_LENGTH = "animatediff_clip_length"  # on a batch of windows: the frames of each window (a clip of its own)


def anchor_of(window) -> int | None:
    """The anchor frame newer hosts prepend to a window (``causal_anchor_index``), or None."""
    anchor = getattr(window, "causal_anchor_index", None)
    return anchor if isinstance(anchor, int) and anchor >= 0 else None


def clip_frames(window, frames: int) -> int:
    """Frames per clip for the temporal layers, given ``frames`` per cond/uncond chunk of the UNet batch: all of
    them, or one window's length when the context handler batched several windows (``windows_per_batch``)."""
    length = getattr(window, CLIP_LENGTH, None)
    return length if isinstance(length, int) and 0 < length and frames % length == 0 else frames


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

        def __init__(self, *args, windows_per_batch: int = 1, **kwargs):
            super().__init__(*args, **kwargs)
            self.causal_window_fix = False  # plain windows (see the module docstring); older hosts have no anchor
            self.windows_per_batch = windows_per_batch

        def set_step(self, timestep, model_options):
            super().set_step(timestep.reshape(-1)[:1], model_options)

        def get_resized_cond(self, cond_in, x_in, window, device=None):
            resized = super().get_resized_cond(cond_in, x_in, window, device)
            for entry in resized or []:
                model_conds = entry.get("model_conds")
                for key, value in (model_conds or {}).items():
                    cond = getattr(value, "cond", None)
                    if (isinstance(cond, torch.Tensor) and cond.ndim and cond.shape[0] == x_in.shape[0]
                            and list(window.index_list) != list(range(x_in.shape[0]))):
                        entry["model_conds"] = model_conds = dict(model_conds)  # the sampler's own stay whole
                        model_conds[key] = value._copy_with(window.get_tensor(cond, device))
            return resized

        def get_context_windows(self, model, x_in, model_options):
            windows = super().get_context_windows(model, x_in, model_options)
            self._step_windows = (windows, x_in.size(self.dim))  # this step's windows, for batching them
            self._batched = {}  # window index -> its result, from an earlier window's batch this step
            return windows

        def evaluate_context_windows(self, calc_cond_batch, model, x_in, conds, timestep, enumerated_context_windows,
                                     *args, **kwargs):
            results = []
            for index, window in enumerated_context_windows:
                done = getattr(self, "_batched", {}).pop(index, None)
                if done is not None and done.window is window:
                    results.append(done)
                    continue
                group = self._batch_with(index, window, model, x_in, conds)
                if len(group) > 1:
                    window = copy.copy(window)  # the host's window class, whatever its fields in this version
                    window.index_list = [i for _, w in group for i in w.index_list]
                    window.context_length = len(window.index_list)
                    setattr(window, CLIP_LENGTH, len(group[0][1].index_list))
                with window_hints(conds, window.index_list, x_in.size(self.dim)):
                    batch = super().evaluate_context_windows(calc_cond_batch, model, x_in, conds, timestep,
                                                             [(index, window)], *args, **kwargs)
                if len(group) == 1:
                    results += batch
                    continue
                length = getattr(window, CLIP_LENGTH)
                for k, (each_index, each) in enumerate(group):  # each window's share of the outputs, in order
                    self._batched[each_index] = batch[0]._replace(
                        window_idx=each_index, window=each,
                        sub_conds_out=window_share(batch[0].sub_conds_out, self.dim, k * length, length))
                results.append(self._batched.pop(index))
            return results

        def _batch_with(self, index, window, model, x_in, conds) -> list:
            """``(index, window)`` and the next windows of this step of its length, up to ``windows_per_batch``;
            only itself where batching would not be sound (see the module docstring)."""
            alone = [(index, window)]
            windows, full_length = getattr(self, "_step_windows", ((), None))
            if (getattr(self, "windows_per_batch", 1) <= 1 or self.dim != 0 or full_length != x_in.size(0)
                    or index >= len(windows) or windows[index] is not window or anchor_of(window) is not None
                    or getattr(self, "split_conds_to_windows", False) or any(self.callbacks.values())
                    or not _clips_are_windows(model, conds)):
                return alone
            group = alone
            for later in range(index + 1, min(index + self.windows_per_batch, len(windows))):
                if (len(windows[later].index_list) != len(window.index_list) or anchor_of(windows[later]) is not None
                        or later in self._batched):
                    break
                group = group + [(later, windows[later])]
            return group


def window_share(outputs, dim: int, start: int, length: int):
    """One window's part of a batch of windows' outputs: per cond a tensor (0.3.75), or per cond a list with a
    tensor per modality (newer comfy/context_windows.py: ``result.sub_conds_out[ci][mod_idx]`` in
    ``IndexListContextHandler.execute``)."""
    if isinstance(outputs, (list, tuple)):
        return [window_share(each, dim, start, length) for each in outputs]
    return outputs.narrow(dim, start, length)


def _clips_are_windows(model, conds) -> bool:
    """Whether every part of the run that groups frames into clips asks ``clip_frames``: the temporal modules
    do; v1's GroupNorm across frames and ControlNets other than the host's own (SparseCtrl has temporal
    layers) count the whole batch as one clip."""
    unet = getattr(model, "diffusion_model", None)
    if unet is not None and any(isinstance(m, frame_groupnorm.FrameGroupNorm) for m in unet.modules()):
        return False
    return all(type(control).__module__.startswith("comfy.") for control in _controls(conds))


def require_host_windows():
    host_features.require("context windows")
    return host_windows


def make_handler(context_length: int, context_overlap: int, schedule: str, fuse_method: str,
                 context_stride: int = 1, closed_loop: bool = False, windows_per_batch: int = 1):
    windows = require_host_windows()
    if schedule not in SCHEDULES or fuse_method not in FUSE_METHODS:
        raise ValueError(f"schedule must be one of {SCHEDULES} and fuse_method one of {FUSE_METHODS}.")
    if context_overlap >= context_length:
        raise ValueError(f"context_overlap ({context_overlap}) must be smaller than context_length ({context_length}).")
    if isinstance(windows_per_batch, bool) or not isinstance(windows_per_batch, int) or not 1 <= windows_per_batch <= MAX_WINDOWS_PER_BATCH:
        raise ValueError(f"windows_per_batch must be a whole number from 1 to {MAX_WINDOWS_PER_BATCH}, got "
                         f"{windows_per_batch!r}. 1 evaluates the windows one by one.")
    return AnimateDiffContextHandler(
        context_schedule=windows.get_matching_context_schedule(schedule),
        fuse_method=windows.get_matching_fuse_method(fuse_method),
        context_length=context_length, context_overlap=context_overlap, context_stride=context_stride,
        closed_loop=closed_loop, dim=0, windows_per_batch=windows_per_batch)


def apply_context_windows(model, handler):
    """A clone of MODEL that samples with ``handler``'s windows (and counts memory per UNet call: one window,
    or ``windows_per_batch`` of them, not the whole clip)."""
    patched = model.clone()
    patched.model_options["context_handler"] = handler
    if getattr(handler, "windows_per_batch", 1) > 1:  # the host's wrapper would size memory for one window
        patched.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, BATCH_MEMORY_KEY, _batch_memory_wrapper)
    else:
        require_host_windows().create_prepare_sampling_wrapper(patched)
    return patched


BATCH_MEMORY_KEY = "animatediff_window_batches"


def _batch_memory_wrapper(executor, model, noise_shape, *args, **kwargs):
    """PREPARE_SAMPLING wrapper: the memory the models are loaded with is sized for one UNet call, which holds
    ``windows_per_batch`` windows' frames (the host's own wrapper sizes it for one window)."""
    handler = (kwargs.get("model_options") or {}).get("context_handler")
    if getattr(handler, "dim", None) == 0 and len(noise_shape):
        frames = handler.context_length * getattr(handler, "windows_per_batch", 1)
        noise_shape = [min(noise_shape[0], frames), *noise_shape[1:]]
    return executor(model, noise_shape, *args, **kwargs)


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

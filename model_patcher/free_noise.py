"""FreeNoise noise rescheduling (Qiu et al., 2023, "FreeNoise: Tuning-Free Longer Video Diffusion via Noise
Rescheduling") as an OUTER_SAMPLE wrapper, so it works with the stock KSampler.

The first window's frames keep their noise. Past it, the clip is cut into chunks of ``stride = window - overlap``
frames; the chunk starting at frame i takes the noise of frames ``i - window ... i - window + stride - 1``
(one window earlier) in a random order. Every frame's noise is so a frame of the first window's noise, and
every window sees noise with the same frames-to-frames statistics, which keeps long clips made of overlapping
windows consistent. The order is drawn from the sampler's seed. Only the noise changes, never the latent, so
denoise < 1 and masks work as usual.
"""
from __future__ import annotations

import logging

import torch

import comfy.patcher_extension
from comfy.patcher_extension import WrappersMP

KEY = "animatediff_motion.free_noise"  # the pack's wrapper key (motion_patcher.KEY) + ".free_noise"


def reschedule_noise(noise: torch.Tensor, window: int, overlap: int, seed: int) -> torch.Tensor:
    """The rescheduled noise of a [frames, ...] batch (a new tensor; the input is not changed)."""
    frames = noise.shape[0]
    if window < 1 or frames <= window:
        return noise.clone()
    stride = max(1, min(window, window - overlap))
    generator = torch.Generator(device="cpu").manual_seed(int(seed) % (1 << 64))
    out = noise.clone()
    for start in range(window, frames, stride):
        count = min(stride, frames - start)
        order = torch.randperm(stride, generator=generator)[:count] + (start - window)
        out[start:start + count] = out[order.to(out.device)]
    return out


def window_of(model_options: dict, default_length: int, default_overlap: int) -> tuple[int, int]:
    """Window length and overlap: the host's context windows on the model if set, else the defaults."""
    handler = model_options.get("context_handler")
    length = getattr(handler, "context_length", None)
    if handler is not None and length and getattr(handler, "dim", 0) == 0:
        return int(length), int(getattr(handler, "context_overlap", 0))
    return default_length, default_overlap


class FreeNoise:
    """OUTER_SAMPLE wrapper: reschedules the sampler's initial noise (4-D latents, frames first)."""

    def __init__(self, context_length: int = 16, context_overlap: int = 4):
        self.context_length = context_length
        self.context_overlap = context_overlap

    def reschedule(self, noise: torch.Tensor, seed, model_options: dict) -> torch.Tensor:
        window, overlap = window_of(model_options, self.context_length, self.context_overlap)
        return reschedule_noise(noise, window, overlap, 0 if seed is None else seed)

    def __call__(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                 disable_pbar=False, seed=None, **kwargs):
        shapes = kwargs.get("latent_shapes")
        if noise.ndim == 4 and (shapes is None or len(shapes) <= 1):
            noise = self.reschedule(noise, seed, executor.class_obj.model_options)
        else:
            logging.warning("FreeNoise: skipped (it reschedules a batch of 4-D latents, got shape %s).",
                            tuple(noise.shape))
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **kwargs)


def take_over_host_free_noise(handler) -> bool:
    """Newer hosts' Context Windows node has its own FreeNoise (``freenoise`` on the handler: a SAMPLER_SAMPLE
    wrapper shuffles the noise, comfy/context_windows.py ``_sampler_sample_wrapper``). With ours as well the noise
    would be shuffled twice, and FreeInit's later passes would start from frame-shuffled low frequencies. On a
    model with a motion module ours runs instead (the same method, the handler's windows): the host's is switched
    off on this run's handler. Returns whether it was on."""
    if not getattr(handler, "freenoise", False):
        return False
    handler.freenoise = False
    handler.animatediff_free_noise = True
    return True


def registered(model_options: dict) -> FreeNoise | None:
    """The FreeNoise that Sampling Options put on this run's model, or None."""
    found = comfy.patcher_extension.get_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY, model_options,
                                                          is_model_options=True)
    return found[0] if found else None


def rescheduler(model_options: dict) -> FreeNoise | None:
    """This run's FreeNoise: Sampling Options' wrapper, else the host's one taken over; None when off."""
    handler = model_options.get("context_handler")
    if registered(model_options) is None and getattr(handler, "animatediff_free_noise", False):
        return FreeNoise(handler.context_length, handler.context_overlap)
    return registered(model_options)


def add_free_noise(model, context_length: int = 16, context_overlap: int = 4) -> FreeNoise:
    """Register FreeNoise on ``model`` (a ModelPatcher, in place; replaces an earlier registration)."""
    wrapper = FreeNoise(context_length, context_overlap)
    model.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, wrapper)
    return wrapper


def remove_free_noise(model) -> None:
    """Take FreeNoise off ``model`` (in place), if it is there."""
    model.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)

"""FreeInit (Wu et al., 2023, "FreeInit: Bridging Initialization Gap in Video Diffusion Models") as an
OUTER_SAMPLE wrapper, so it works with the stock KSampler.

Pass 1 samples as usual. After each pass the sample z0 is diffused back to the first sigma of the schedule with
the model's own forward process (``model_sampling.noise_scaling(sigma, eps, z0)``: z0 + sigma * eps for the
EPS/V models of SD1.5/SDXL), and the next pass starts from the low spatio-temporal frequencies (a 3-D FFT over
frames x height x width) of that, plus the high frequencies of fresh noise. The sampler's own noise scaling is
inverted, so the start is exact for denoise 1 (where the host scales noise by sqrt(1 + sigma^2)) and for
denoise < 1 (sigma, added to the input latent) alike.
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.model_management
from comfy.patcher_extension import WrappersMP

from . import free_noise
from .motion_patcher import KEY as PACK_KEY

KEY = PACK_KEY + ".free_init"
FILTERS = ("gaussian", "butterworth", "ideal", "box")


def _axis_ratio(freqs: torch.Tensor, stop: float) -> torch.Tensor:
    """|frequency| / cutoff along one axis; ``stop`` is the cutoff as a fraction of the Nyquist frequency."""
    if stop <= 0:
        return torch.where(freqs == 0, 0.0, math.inf)
    return freqs.abs() / (0.5 * stop)


def low_pass_filter(frames: int, height: int, width: int, kind: str = "gaussian", spatial_stop: float = 0.25,
                    temporal_stop: float = 0.25, order: int = 4, device=None) -> torch.Tensor:
    """The [frames, 1, height, width] frequency response of a 3-D low-pass filter, in torch.fft's frequency
    order. Each axis is scaled so its stop frequency is at radius 1: gaussian exp(-r^2 / 2), butterworth
    1 / (1 + r^(2 order)), ideal 1 inside the radius-1 ellipsoid, box 1 inside the stop frequency on each axis."""
    if kind not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, not {kind!r}.")
    t = _axis_ratio(torch.fft.fftfreq(frames, device=device, dtype=torch.float64), temporal_stop)[:, None, None]
    h = _axis_ratio(torch.fft.fftfreq(height, device=device, dtype=torch.float64), spatial_stop)[None, :, None]
    w = _axis_ratio(torch.fft.fftfreq(width, device=device, dtype=torch.float64), spatial_stop)[None, None, :]
    if kind == "box":
        response = ((t <= 1) & (h <= 1) & (w <= 1)).double()
    else:
        r2 = t * t + h * h + w * w
        if kind == "gaussian":
            response = torch.exp(-0.5 * r2)
        elif kind == "butterworth":
            response = 1.0 / (1.0 + r2 ** order)
        else:
            response = (r2 <= 1).double()
    return response.float().unsqueeze(1)


def mix_frequencies(low: torch.Tensor, high: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """The low frequencies of ``low`` plus the high frequencies of ``high`` ([frames, C, H, W] each)."""
    dims = (0, 2, 3)
    spectrum_low = torch.fft.fftn(low.float(), dim=dims)
    spectrum_high = torch.fft.fftn(high.float(), dim=dims)
    mixed = spectrum_low * response + spectrum_high * (1.0 - response)
    return torch.fft.ifftn(mixed, dim=dims).real.to(low.dtype)


def _seed(seed, iteration: int) -> int:
    return (int(seed or 0) * 6364136223846793005 + iteration * 1442695040888963407 + 1) % (1 << 64)


def _one_bar(callback, offset: int, passes: int):
    """The sampler's step callback, counted across all passes (the host's progress bar shows them in turn)."""
    if callback is None:
        return None
    return lambda step, x0, x, total: callback(offset + step, x0, x, total * passes)


class FreeInit:
    """OUTER_SAMPLE wrapper: ``iterations`` passes of the sampler, each starting from the last one's low
    frequencies. One iteration is plain sampling."""

    def __init__(self, iterations: int = 3, filter: str = "gaussian", spatial_stop: float = 0.25,
                 temporal_stop: float = 0.25, order: int = 4):
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, not {filter!r}.")
        for name, stop in (("free_init_spatial_stop", spatial_stop), ("free_init_temporal_stop", temporal_stop)):
            if not (math.isfinite(stop) and 0 <= stop <= 1):  # NaN passes the host's min/max checks
                raise ValueError(f"{name} must be a number from 0 to 1 (a fraction of the highest frequency); got {stop!r}.")
        self.iterations = iterations
        self.filter = filter
        self.spatial_stop = spatial_stop
        self.temporal_stop = temporal_stop
        self.order = order

    def renoise(self, sample, first_noise, latent_image, sigmas, guider, seed, iteration) -> torch.Tensor:
        """The noise that makes the next pass start from the FreeInit mix (sample: the last pass's output)."""
        model = guider.model_patcher.model
        sampling = guider.model_patcher.get_model_object("model_sampling")
        device = sample.device
        z0 = model.process_latent_in(sample.float())
        latent = latent_image.to(device).float()
        if torch.count_nonzero(latent) > 0:  # the host shifts a non-empty input latent the same way
            latent = model.process_latent_in(latent)
        sigma = sigmas[0].to(device).float()
        max_sigma = float(sampling.sigma_max)
        max_denoise = math.isclose(max_sigma, float(sigma), rel_tol=1e-05) or float(sigma) > max_sigma

        eps = first_noise.to(device).float()
        diffused = sampling.noise_scaling(sigma, eps, z0, False)  # the forward process: z0 + sigma * eps (EPS)
        # The sampler starts from noise_scaling(sigma, noise, latent, max_denoise) = scale * noise + offset.
        offset = sampling.noise_scaling(sigma, torch.zeros_like(z0), latent, max_denoise)
        scale = sampling.noise_scaling(sigma, torch.ones_like(z0[:1]), torch.zeros_like(z0[:1]), max_denoise)
        target = (diffused - offset) / scale

        generator = torch.Generator(device="cpu").manual_seed(_seed(seed, iteration))
        fresh = torch.randn(first_noise.shape, generator=generator, dtype=torch.float32).to(device)
        rescheduler = free_noise.rescheduler(guider.model_options)
        if rescheduler:  # FreeNoise is on: the fresh noise is rescheduled like the first noise was
            fresh = rescheduler.reschedule(fresh, _seed(seed, iteration), guider.model_options)

        response = low_pass_filter(z0.shape[0], z0.shape[2], z0.shape[3], self.filter, self.spatial_stop,
                                   self.temporal_stop, self.order, device=device)
        return mix_frequencies(target, fresh, response).to(first_noise.dtype)

    def __call__(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                 disable_pbar=False, seed=None, **kwargs):
        shapes = kwargs.get("latent_shapes")
        passes = self.iterations
        if passes > 1 and (noise.ndim != 4 or (shapes is not None and len(shapes) > 1)):
            logging.warning("FreeInit: skipped (it works on a batch of 4-D latents, got shape %s).", tuple(noise.shape))
            passes = 1
        if passes > 1 and torch.count_nonzero(noise) == 0:
            passes = 1  # the sampler adds no noise (e.g. KSampler Advanced, add_noise off): nothing to re-initialise
        if passes <= 1:
            return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **kwargs)

        guider = executor.class_obj
        conds = {k: list(v) for k, v in guider.conds.items()}  # outer_sample replaces them: each pass starts anew
        steps = len(sigmas) - 1
        current = noise
        sample = None
        for i in range(passes):
            if i > 0:
                comfy.model_management.throw_exception_if_processing_interrupted()
                guider.conds = {k: list(v) for k, v in conds.items()}
                current = self.renoise(sample, noise, latent_image, sigmas, guider, seed, i)
            logging.info("FreeInit: pass %d of %d", i + 1, passes)
            sample = executor(current, latent_image, sampler, sigmas, denoise_mask,
                              _one_bar(callback, i * steps, passes), disable_pbar, seed, **kwargs)
        return sample


def add_free_init(model, iterations: int = 3, filter: str = "gaussian", spatial_stop: float = 0.25,
                  temporal_stop: float = 0.25, order: int = 4) -> FreeInit:
    """Register FreeInit on ``model`` (a ModelPatcher, in place; replaces an earlier registration)."""
    wrapper = FreeInit(iterations, filter, spatial_stop, temporal_stop, order)
    model.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, wrapper)
    return wrapper


def remove_free_init(model) -> None:
    """Take FreeInit off ``model`` (in place), if it is there."""
    model.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)

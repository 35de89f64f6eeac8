"""FreeInit: the 3-D frequency filter, and the re-initialising passes as an OUTER_SAMPLE wrapper under the host's
KSampler."""
import math

import pytest
import torch

import comfy.sample
from comfy.patcher_extension import WrappersMP

from adm.model_patcher.free_init import FILTERS, add_free_init, low_pass_filter, mix_frequencies
from adm.model_patcher.free_noise import add_free_noise
from unets import tiny_sd15_patcher

T, H, W = 16, 32, 32


def wave(ft, fh, fw):
    """cos(2 pi (ft t + fh h + fw w)) on a [T, 2, H, W] grid (frequencies in cycles per sample)."""
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    x = torch.cos(2 * math.pi * (ft * t + fh * h + fw * w)).float()
    return x.unsqueeze(1).repeat(1, 2, 1, 1)


def kept(x, kind, **kw):
    """The fraction of x's energy the low-pass filter keeps."""
    response = low_pass_filter(T, H, W, kind, **kw)
    low = mix_frequencies(x, torch.zeros_like(x), response)
    return (low.square().sum() / x.square().sum()).item(), low


@pytest.mark.parametrize("kind", FILTERS)
def test_low_frequencies_pass_and_high_ones_are_blocked(kind):
    low_wave, high_wave = wave(1 / 16, 1 / 32, 1 / 32), wave(0, 12 / 32, 0)
    fraction_low, filtered = kept(low_wave, kind)
    fraction_high, _ = kept(high_wave, kind)
    assert fraction_low > 0.6 and fraction_high < 0.01
    if kind in ("ideal", "box"):  # a hard cut: exactly
        torch.testing.assert_close(filtered, low_wave, atol=1e-5, rtol=0)
    # ...and the high frequencies of the other input take their place
    mixed = mix_frequencies(low_wave, high_wave, low_pass_filter(T, H, W, kind))
    torch.testing.assert_close(mixed, low_wave + high_wave, atol=0.45 if kind in ("gaussian", "butterworth") else 1e-5,
                               rtol=0)


def test_stop_frequencies_are_per_axis():
    temporal_only = wave(6 / 16, 0, 0)  # fast in time, constant in space
    assert kept(temporal_only, "box", temporal_stop=0.25, spatial_stop=1.0)[0] < 1e-6
    assert kept(temporal_only, "box", temporal_stop=1.0, spatial_stop=0.25)[0] > 0.999
    assert kept(wave(0, 3 / 32, 0), "ideal", spatial_stop=0.25)[0] > 0.999   # 0.094 < 0.125: inside
    assert kept(wave(0, 5 / 32, 0), "ideal", spatial_stop=0.25)[0] < 1e-6    # 0.156 > 0.125: outside
    assert kept(wave(1 / 16, 0, 0), "gaussian", temporal_stop=0.0)[0] < 1e-6  # 0: only the mean passes


def test_filter_shapes():
    for kind in FILTERS:
        response = low_pass_filter(8, 6, 10, kind, order=2)
        assert response.shape == (8, 1, 6, 10) and response[0, 0, 0, 0] == 1
        assert (response >= 0).all() and (response <= 1).all()
    assert torch.equal(low_pass_filter(8, 6, 10, "box", spatial_stop=1.0, temporal_stop=1.0), torch.ones(8, 1, 6, 10))
    sharp, soft = (low_pass_filter(1, 1, 64, "butterworth", spatial_stop=0.5, order=n)[0, 0, 0] for n in (8, 1))
    assert sharp[8] > soft[8] and sharp[24] < soft[24]  # below / above the cutoff (f = 0.25)
    with pytest.raises(ValueError, match="filter"):
        low_pass_filter(4, 4, 4, "sinc")


# --- as a sampling option -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


FRAMES = 4


def sample(model, seed=3, steps=2, denoise=1.0, latent=None, callback=None):
    noise = torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    positive = [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5)), {}]]
    negative = [[torch.zeros(1, 77, 32), {}]]
    latent = torch.zeros_like(noise) if latent is None else latent
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                               denoise=denoise, seed=seed, callback=callback, disable_pbar=True), noise


def without_unet(model):
    """A clone whose UNet predicts zeros (the sampler then keeps its start): for tests of the starts, to be quick."""
    quick = model.clone()
    quick.set_model_unet_function_wrapper(lambda apply_model, args: torch.zeros_like(args["input"]))
    return quick


def with_free_init(model, iterations, **kw):
    freed = model.clone()
    add_free_init(freed, iterations, **kw)
    return freed


def record_passes(model):
    """A clone that records each pass's noise and sigmas as the sampler gets them (SAMPLER_SAMPLE)."""
    passes = []

    def spy(executor, guider, sigmas, extra_args, callback, noise, latent_image=None, *args, **kwargs):
        copy = lambda t: None if t is None else t.to("cpu", copy=True)  # noqa: E731
        passes.append((copy(noise), copy(sigmas), copy(latent_image)))
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs)

    spied = model.clone()
    spied.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, "test.spy", spy)
    return spied, passes


def test_one_iteration_is_plain_sampling_bit_for_bit(model):
    assert torch.equal(sample(with_free_init(model, 1), steps=1)[0], sample(model, steps=1)[0])


def test_two_iterations_sample_twice_with_one_progress_bar_and_a_new_result(model):
    steps_seen = []
    spied, passes = record_passes(with_free_init(model, 2))
    out, noise = sample(spied, callback=lambda step, x0, x, total: steps_seen.append((step, total)))
    assert len(passes) == 2
    assert torch.equal(passes[0][0], noise) and not torch.equal(passes[1][0], noise)
    assert steps_seen == [(0, 4), (1, 4), (2, 4), (3, 4)]  # 2 passes x 2 steps on one bar
    assert not torch.allclose(out, sample(model)[0], atol=1e-3)
    again, _ = sample(spied)
    assert torch.equal(out, again)  # deterministic: the fresh noise comes from the seed


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_the_next_pass_starts_from_the_sample_diffused_back_to_the_first_sigma(model, denoise):
    """With a filter that keeps every frequency, pass 2 starts exactly at z0 + sigma_0 * eps (eps: pass 1's
    noise), whatever the sampler's own noise scaling (sqrt(1 + sigma^2) at denoise 1, sigma with an input latent)."""
    latent = None if denoise == 1.0 else torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    model = without_unet(model)
    first, noise = sample(model, denoise=denoise, latent=latent)
    spied, passes = record_passes(with_free_init(model, 2, filter="box", spatial_stop=1.0, temporal_stop=1.0))
    sample(spied, denoise=denoise, latent=latent)
    sampling = model.get_model_object("model_sampling")
    (noise_1, sigmas, _), (noise_2, _, latent_in) = passes
    sigma = sigmas[0]
    max_denoise = denoise == 1.0
    assert max_denoise == math.isclose(float(sigma), float(sampling.sigma_max), rel_tol=1e-5)
    start = sampling.noise_scaling(sigma, noise_2, latent_in, max_denoise)  # what the sampler starts from
    z0 = model.model.process_latent_in(first)
    torch.testing.assert_close(start, z0 + sigma * noise_1, atol=1e-4, rtol=1e-4)


def test_with_free_noise_the_fresh_high_frequencies_are_rescheduled_too(model):
    freed = without_unet(model)
    add_free_noise(freed, context_length=2, context_overlap=0)
    add_free_init(freed, 2, filter="box", spatial_stop=0.0, temporal_stop=0.0)  # only the mean is kept
    spied, passes = record_passes(freed)
    sample(spied)
    second = passes[1][0]
    fresh = second - second.mean(dim=(0, 2, 3), keepdim=True)  # the fresh noise, less the kept mean
    torch.testing.assert_close(torch.sort(fresh[2:], 0).values, torch.sort(fresh[:2], 0).values, atol=1e-5, rtol=0)
    assert not torch.allclose(second, passes[0][0], atol=1e-2)  # fresh, not the first pass's noise


def test_nothing_to_reinitialise_without_noise(model):
    spied, passes = record_passes(with_free_init(model, 3))
    positive = [[torch.randn(1, 77, 32), {}]]
    zeros = torch.zeros(FRAMES, 4, 8, 8)
    comfy.sample.sample(spied, zeros, 1, 5.0, "euler", "normal", positive, positive, torch.randn_like(zeros),
                        denoise=0.5, seed=1, disable_pbar=True)
    assert len(passes) == 1

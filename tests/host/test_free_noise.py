"""FreeNoise: the noise rescheduling itself, and as an OUTER_SAMPLE wrapper under the host's KSampler."""
import pytest
import torch

import comfy.context_windows
import comfy.sample
from comfy.patcher_extension import WrappersMP

from adm.model_patcher import free_init
from adm.model_patcher.free_noise import KEY, add_free_noise, remove_free_noise, reschedule_noise
from adm.model_patcher.motion_patcher import apply_motion_module

from adm.model_patcher.context_windows import adopt_stock_handler
from adm.nodes.sampling_options import SamplingOptions
from unets import tiny_motion_config, tiny_sd15_patcher


def sorted_frames(x):
    return torch.sort(x, dim=0).values  # the multiset of values per channel and pixel


def assert_rescheduled(noise, out, window, overlap):
    """Frames past the first window: each chunk of (window - overlap) frames holds frames of the chunk one window
    earlier, each exactly once; the first window is unchanged."""
    stride = window - overlap
    assert torch.equal(out[:window], noise[:window])
    for start in range(window, out.shape[0], stride):
        chunk, source = out[start:start + stride], out[start - window:start - window + stride]
        if chunk.shape[0] == stride:
            assert torch.equal(sorted_frames(chunk), sorted_frames(source))
        picks = [[torch.equal(frame, s) for s in source].index(True) for frame in chunk]
        assert len(set(picks)) == len(picks)
    first = list(noise[:window])
    assert all(any(torch.equal(frame, f) for f in first) for frame in out)  # all of it is the first window's noise


@pytest.mark.parametrize("frames, window, overlap", [(20, 8, 2), (18, 8, 2), (16, 4, 0), (9, 4, 3), (13, 5, 1)])
def test_frames_past_the_first_window_are_permutations_of_earlier_noise(frames, window, overlap):
    torch.manual_seed(0)
    noise = torch.randn(frames, 4, 6, 6)
    out = reschedule_noise(noise, window, overlap, seed=7)
    assert_rescheduled(noise, out, window, overlap)
    assert not torch.equal(out[window:], noise[window:])


def test_the_order_is_shuffled_and_follows_the_seed():
    torch.manual_seed(0)
    noise = torch.randn(64, 4, 2, 2)
    a, b, c = (reschedule_noise(noise, 16, 4, seed) for seed in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain_copy = torch.cat([noise[:16]] + [noise[i - 16:i - 16 + 12] for i in range(16, 64, 12)])[:64]
    assert not torch.equal(a, plain_copy)  # not just repeated in order


def test_a_clip_within_one_window_is_unchanged():
    noise = torch.randn(16, 4, 2, 2)
    assert torch.equal(reschedule_noise(noise, 16, 4, seed=1), noise)


# --- as a sampling option -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


def record_noise(model):
    """A clone with an OUTER_SAMPLE wrapper inside FreeNoise's that records the noise the sampler gets."""
    seen = []

    def spy(executor, noise, *args, **kwargs):
        seen.append(noise.clone())
        return executor(noise, *args, **kwargs)

    spied = model.clone()
    spied.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "test.spy", spy)
    return spied, seen


def without_unet(model):
    """A clone whose UNet predicts zeros: for the tests that only look at the noise, to be quick."""
    quick = model.clone()
    quick.set_model_unet_function_wrapper(lambda apply_model, args: torch.zeros_like(args["input"]))
    return quick


def sample(model, noise, seed=3, steps=1, denoise=1.0, latent=None):
    positive = [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5)), {}]]
    negative = [[torch.zeros(1, 77, 32), {}]]
    latent = torch.zeros_like(noise) if latent is None else latent
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                               denoise=denoise, seed=seed, disable_pbar=True)


def with_context_windows(model, length, overlap):
    windowed = model.clone()
    windowed.model_options["context_handler"] = comfy.context_windows.IndexListContextHandler(
        context_schedule=comfy.context_windows.get_matching_context_schedule("standard_static"),
        fuse_method=comfy.context_windows.get_matching_fuse_method("pyramid"),
        context_length=length, context_overlap=overlap, context_stride=1, closed_loop=False, dim=0)
    comfy.context_windows.create_prepare_sampling_wrapper(windowed)
    return windowed


def test_the_sampler_gets_the_rescheduled_noise_window_from_the_node_inputs(model):
    freed = without_unet(model)
    add_free_noise(freed, context_length=4, context_overlap=1)
    spied, seen = record_noise(freed)
    noise = torch.randn(10, 4, 8, 8)
    sample(spied, noise, seed=11)
    assert torch.equal(seen[0], reschedule_noise(noise, 4, 1, seed=11))
    assert_rescheduled(noise, seen[0], 4, 1)


def test_the_host_context_windows_set_the_window(model):
    freed = with_context_windows(without_unet(model), 5, 2)
    freed.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "test", adopt_stock_handler)  # as Apply Motion Module does
    add_free_noise(freed, context_length=16, context_overlap=4)  # ignored: the model has context windows
    spied, seen = record_noise(freed)
    noise = torch.randn(8, 4, 8, 8)
    sample(spied, noise, seed=4, steps=2)
    assert torch.equal(seen[0], reschedule_noise(noise, 5, 2, seed=4))
    assert not torch.equal(seen[0], noise)


def test_denoise_below_one_changes_only_the_noise(model):
    freed = model.clone()
    add_free_noise(freed, 2, 1)
    noise, latent = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    out = sample(freed, noise, seed=9, denoise=0.5, latent=latent)
    assert torch.equal(out, sample(model, reschedule_noise(noise, 2, 1, seed=9), seed=9, denoise=0.5, latent=latent))


def test_samples_an_animated_clip_in_context_windows_through_the_node(model):
    import comfy.model_management
    import comfy.model_patcher
    from adm.motion_modules import MotionModule

    torch.manual_seed(1)
    module = MotionModule(tiny_motion_config()).eval().requires_grad_(False)
    for m in module.in_unet_order():
        torch.nn.init.normal_(m.temporal_transformer.proj_out.weight, std=0.2)
    motion = comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                              offload_device=comfy.model_management.unet_offload_device())
    animated = with_context_windows(apply_motion_module(model, motion), 4, 2)
    (options,) = SamplingOptions().execute(animated, True, 16, 4, 0, "gaussian", 0.25, 0.25, 4)
    spied, seen = record_noise(options)
    noise = torch.randn(6, 4, 8, 8)
    out = sample(spied, noise, seed=2, steps=1)  # steps + 1 != frames: works thanks to the node's window fixes
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert torch.equal(seen[0], reschedule_noise(noise, 4, 2, seed=2))


def test_the_node_replaces_rather_than_stacks_and_can_switch_it_off(model):
    node = SamplingOptions()
    (once,) = node.execute(model, True, 16, 4, 3, "gaussian", 0.25, 0.25, 4)
    (twice,) = node.execute(once, True, 8, 2, 2, "box", 0.5, 0.5, 4)
    wrappers = twice.wrappers[WrappersMP.OUTER_SAMPLE]
    assert [k for k in wrappers if k in (KEY, free_init.KEY)] == [KEY, free_init.KEY]
    assert len(wrappers[KEY]) == 1 and wrappers[KEY][0].context_length == 8  # FreeNoise outside FreeInit
    (off,) = node.execute(twice, False, 16, 4, 0, "gaussian", 0.25, 0.25, 4)
    assert not off.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY)
    assert not off.get_wrappers(WrappersMP.OUTER_SAMPLE, free_init.KEY)
    assert twice.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY) and not model.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY)
    remove_free_noise(twice)
    assert not twice.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY)

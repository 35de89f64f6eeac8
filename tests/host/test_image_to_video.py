"""PIA and AnimateLCM-I2V image inputs on the real host: what each UNet call receives per frame (also inside
context windows on a 48-frame clip), the MODEL passed in left alone, schedules, and refusals."""
import pytest
import torch
import torch.nn.functional as F

import comfy.sample
from comfy.patcher_extension import WrappersMP

from adm.model_patcher import image_to_video, motion_patcher
from adm.model_patcher.image_to_video import PIA_PRESETS, apply_animatelcm_i2v, apply_pia, pia_conv_in, pia_mask_values
from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
from adm.nodes.context import ContextWindows
from adm.nodes.image_to_video import AnimateLCMI2VImageInput, PIAImageInput
from unets import tiny_motion_config, tiny_motion_patcher, tiny_sd15_patcher

PLAIN = MotionOptions(schedule="use existing")
SIZE = 8  # latent pixels


class PixelsToLatent:
    """A VAE stand-in for the host tests: a fixed map from pixels to a [B, 4, H/8, W/8] latent."""

    def encode(self, pixels):
        pooled = F.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) * 4 - 2


VAE = PixelsToLatent()


def image(seed=0):
    return torch.rand(1, SIZE * 8, SIZE * 8, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base():
    return tiny_sd15_patcher()


@pytest.fixture(scope="module")
def pia(base):
    return apply_motion_module(base, tiny_motion_patcher(tiny_motion_config(family="PIA", mid=(), max_frames=16)), PLAIN)


@pytest.fixture(scope="module")
def i2v(base):
    config = tiny_motion_config(family="AnimateLCM-I2V", max_frames=16, pe_in_file=False)
    return apply_motion_module(base, tiny_motion_patcher(config), PLAIN)


def sample(model, frames=4, steps=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 77, 32, generator=g), {}]]
    uncond = [[torch.randn(1, 77, 32, generator=g), {}]]
    noise = torch.randn(frames, 4, SIZE, SIZE, generator=g)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", cond, uncond, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


def recording(model):
    """A clone whose every UNet call is recorded (inside our wrapper: what the UNet itself gets)."""
    calls = []

    def record(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        window = transformer_options.get("context_window")
        calls.append(dict(frames=list(window.index_list) if window is not None else list(range(x.shape[0] // 2)),
                          chunks=len(transformer_options["cond_or_uncond"]), c_concat=c_concat,
                          added=transformer_options.get(motion_patcher.ADDED_INPUT)))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    recorded = model.clone()
    recorded.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test-recorder", record)
    return recorded, calls


def windows(model, per_batch=1):
    return ContextWindows().apply(model, 16, 4, "standard_static", "pyramid", False, windows_per_batch=per_batch)[0]


def state_of(model):
    patches = model.model_options["transformer_options"].get("patches", {})
    return ([p[1] for p in patches.get("forward_timestep_embed_patch", [])],
            {k: dict(v) for k, v in model.wrappers.items()})


def test_pia_input_returns_a_clone_and_leaves_the_model_passed_in_alone(pia):
    before, plain = state_of(pia), sample(pia)
    patched = PIAImageInput().apply(pia, image(), VAE, "moderate motion", 0)[0]
    assert patched is not pia and state_of(pia) == before
    assert pia_conv_in in state_of(patched)[0] and pia_conv_in not in before[0]
    out = sample(patched)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert torch.equal(sample(pia), plain)


def test_pia_gives_each_frame_its_mask_and_the_image_inside_context_windows(pia):
    preset, image_frame = "large motion", 20
    model, calls = recording(PIAImageInput().apply(windows(pia), image(), VAE, preset, image_frame)[0])
    out = sample(model, frames=48)
    assert out.shape[0] == 48 and torch.isfinite(out).all()
    latent = pia.model.process_latent_in(VAE.encode(image()))
    seen = set()
    for call in calls:
        concat, frames = call["c_concat"], call["frames"]
        assert concat.shape == (call["chunks"] * len(frames), 5, SIZE, SIZE)
        masks = concat[:, 0, 0, 0].view(call["chunks"], len(frames))
        for chunk in masks:  # cond and uncond: the same frames, the same conditions
            assert chunk.tolist() == pytest.approx(pia_mask_values(preset, frames, image_frame))
        torch.testing.assert_close(concat[:, 1:], latent.expand(concat.shape[0], -1, -1, -1))
        seen.update(frames)
    assert len(calls) > 3 and seen == set(range(48))  # several windows, every frame conditioned
    values = pia_mask_values(preset, range(48), image_frame)
    assert values[image_frame] == 1.0 and values.index(max(values)) == image_frame  # the image's frame most


def test_pia_adds_its_channels_as_one_nine_channel_convolution(pia):
    conv = pia.model.diffusion_model.input_blocks[0][0]
    extra = torch.randn(conv.out_channels, 5, 3, 3)
    x = torch.randn(3, 9, SIZE, SIZE)
    got = pia_conv_in(conv, x, None, None, {image_to_video.PIA_WEIGHT: extra})
    want = F.conv2d(x, torch.cat([conv.weight, extra], dim=1), conv.bias, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = torch.randn(3, 4, SIZE, SIZE)
    assert torch.equal(pia_conv_in(conv, plain, None, None, {image_to_video.PIA_WEIGHT: extra}), conv(plain))
    assert torch.equal(pia_conv_in(conv, plain, None, None, {}), conv(plain))


def test_the_image_reaches_every_frame(pia, i2v):
    for apply, model in ((lambda m, img: apply_pia(m, img, VAE, "small motion"), pia),
                         (lambda m, img: apply_animatelcm_i2v(m, img, VAE), i2v)):
        a, b = sample(apply(model, image(1))), sample(apply(model, image(2)))
        assert all(not torch.equal(a[f], b[f]) for f in range(a.shape[0]))


def test_i2v_features_go_to_the_second_module_of_each_down_block_in_every_window(i2v):
    strength, drift = 0.5, 0.3
    model, calls = recording(AnimateLCMI2VImageInput().apply(windows(i2v), image(), VAE, strength, drift)[0])
    sample(model, frames=48)
    module = i2v.get_additional_models_with_key(motion_patcher.KEY)[0].model
    targets = [block.motion_modules[1] for block in module.down_blocks]
    latent = i2v.model.process_latent_in(VAE.encode(image()))
    with torch.no_grad():
        expected = module.img_encoder(latent, 16, drift)
    seen = set()
    for call in calls:
        assert list(call["added"]) == targets  # nothing for the first module, the mid or the up blocks
        for layer, features in zip(targets, expected):
            torch.testing.assert_close(call["added"][layer], (strength * features).repeat(call["chunks"], 1, 1, 1))
        seen.update(call["frames"])
    assert len(calls) > 3 and seen == set(range(48))


def test_windows_evaluated_together_get_the_same_conditions_as_one_by_one(pia, i2v):
    for model in (apply_pia(pia, image(), VAE, "large motion", 20), apply_animatelcm_i2v(i2v, image(), VAE)):
        one_by_one = sample(windows(model), frames=40)
        together = sample(windows(model, per_batch=3), frames=40)
        # float rounding of batched convolutions, times sigma_max (~14.6) in the one-step result
        torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-4 * one_by_one.abs().max().item())


def test_i2v_at_strength_zero_is_plain_animatelcm(i2v):
    assert torch.equal(sample(apply_animatelcm_i2v(i2v, image(), VAE, strength=0.0)), sample(i2v))


def test_image_to_video_modules_still_animate_without_an_image(base, pia, i2v):
    plain = sample(base)
    for model in (pia, i2v):
        out = sample(model)
        assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_a_second_image_input_replaces_the_first(pia):
    twice = apply_pia(apply_pia(pia, image(1), VAE, "small motion"), image(2), VAE, "large motion")
    handlers, wrappers = state_of(twice)
    assert handlers.count(pia_conv_in) == 1 and len(wrappers[WrappersMP.APPLY_MODEL][image_to_video.KEY]) == 1
    assert torch.equal(sample(twice), sample(apply_pia(pia, image(2), VAE, "large motion")))


def test_animatelcm_i2v_samples_with_its_own_lcm_schedule(i2v):
    config = tiny_motion_config(family="AnimateLCM-I2V", max_frames=16, pe_in_file=False)
    model = apply_motion_module(tiny_sd15_patcher(), tiny_motion_patcher(config))  # autoselect
    sampling = model.get_model_object("model_sampling")
    assert len(sampling.sigmas) == 200  # LCM with 200 original steps (inference-i2v.yaml)
    assert sampling.sigma_max.item() == pytest.approx(41.67, abs=0.05)  # sqrt_linear 0.00085 -> 0.014 (formats.md §7)


@pytest.mark.parametrize("call, message", [
    (lambda base, pia, i2v: apply_pia(base, image(), VAE, "small motion"), "has no motion module.*Apply Motion Module"),
    (lambda base, pia, i2v: apply_pia(i2v, image(), VAE, "small motion"), r"\(AnimateLCM-I2V\); this node needs a PIA"),
    (lambda base, pia, i2v: apply_animatelcm_i2v(pia, image(), VAE), r"\(PIA\); this node needs a AnimateLCM-I2V"),
    (lambda base, pia, i2v: apply_pia(pia, image().repeat(2, 1, 1, 1), VAE, "small motion"), "one start image"),
    (lambda base, pia, i2v: apply_pia(pia, image()[:, :4, :4], VAE, "small motion"), "at least 8x8"),
    (lambda base, pia, i2v: apply_pia(pia, image() * float("nan"), VAE, "small motion"), "NaN"),
    (lambda base, pia, i2v: apply_pia(pia, image(), VAE, "huge motion"), "Unknown PIA motion intensity"),
    (lambda base, pia, i2v: apply_pia(pia, image(), VAE, "small motion", -1), "image_frame"),
    (lambda base, pia, i2v: apply_animatelcm_i2v(i2v, image(), VAE, strength=float("nan")), "strength"),
    (lambda base, pia, i2v: apply_animatelcm_i2v(i2v, image(), VAE, drift=float("inf")), "drift"),
], ids=["no-motion-module", "pia-node-on-i2v", "i2v-node-on-pia", "two-images", "tiny-image", "nan-image",
        "unknown-preset", "negative-frame", "nan-strength", "inf-drift"])
def test_refusals_name_the_problem_and_leave_the_model_alone(base, pia, i2v, call, message):
    before = [state_of(m) for m in (base, pia, i2v)]
    with pytest.raises(ValueError, match=message):
        call(base, pia, i2v)
    assert [state_of(m) for m in (base, pia, i2v)] == before


def test_presets_are_pias_affinity_lists():
    assert len(PIA_PRESETS) == 9 and all(values[0] in (1.0, 0.5) for values in PIA_PRESETS.values())
    assert pia_mask_values("small motion", range(8), 2) == [0.85, 0.9, 1.0, 0.9, 0.85, 0.85, 0.85, 0.8]

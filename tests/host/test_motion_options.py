"""Apply Motion Module's options: noise schedule per family, v1 GroupNorm across frames, effect, per-frame scale."""
import pytest
import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.sample
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from adm.model_patcher import frame_groupnorm, schedules
from adm.model_patcher.motion_patcher import MotionOptions, TemporalPatch, apply_motion_module
from unets import tiny_motion_config, tiny_motion_patcher as motion_patcher, tiny_sd15_patcher

PLAIN = dict(schedule="use existing", frame_groupnorm="off")


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


def sample(model, frames=4, steps=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 77, 32, generator=g), {}]]
    noise = torch.randn(frames, 4, 8, 8, generator=g)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", cond, cond, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


@pytest.mark.parametrize("family, choice, sigma_max", [
    ("AnimateDiff v2", "autoselect", 25.146), ("AnimateDiff v3", "autoselect", 25.146),
    ("AnimateDiff v2", "use existing", 14.615), ("AnimateDiff v2", schedules.LINEAR_SDXL, 65.93),
    ("HotshotXL", "autoselect", 14.615),
])
def test_noise_schedule_follows_the_family_and_the_override(model, family, choice, sigma_max):
    patched = apply_motion_module(model, motion_patcher(tiny_motion_config(family=family)), MotionOptions(schedule=choice))
    assert patched.get_model_object("model_sampling").sigma_max.item() == pytest.approx(sigma_max, rel=1e-3)
    assert model.get_model_object("model_sampling").sigma_max.item() == pytest.approx(14.615, rel=1e-3)


def test_animatelcm_gets_the_lcm_sampling(model):
    patched = apply_motion_module(model, motion_patcher(tiny_motion_config(family="AnimateLCM")))
    sampling = patched.get_model_object("model_sampling")
    assert "ModelSamplingDiscreteDistilled" in [c.__name__ for c in type(sampling).__mro__]
    assert len(sampling.sigmas) == 50


def test_frame_groupnorm_is_the_groupnorm_of_the_whole_clip():
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    frames = frame_groupnorm.FrameCount()
    patched = frame_groupnorm.FrameGroupNorm(norm, frames)
    x = torch.randn(2 * 3, 8, 5, 5)
    x[3:] *= 4
    frames.value = 3
    direct = torch.cat([F.group_norm(x[c * 3:(c + 1) * 3].permute(1, 0, 2, 3)[None], 4, norm.weight, norm.bias, norm.eps)[0]
                        .permute(1, 0, 2, 3) for c in range(2)])
    torch.testing.assert_close(patched(x), direct)
    frames.value = None
    assert torch.equal(patched(x), norm(x))
    assert patched.weight is norm.weight


def test_v1_groupnorm_acts_while_sampling_and_is_removed_after(model):
    unet = model.model.diffusion_model
    norms = {name: m.in_layers[0] for name, m in unet.named_modules() if isinstance(m, ResBlock)}
    before = sample(model)
    still = MotionOptions(scale=0.0, **{**PLAIN, "frame_groupnorm": "on"})  # the norm alone, no temporal layers
    across = sample(apply_motion_module(model, motion_patcher(), still))
    assert not torch.allclose(across, before, rtol=1e-4, atol=1e-3)
    # one frame: statistics over the clip == statistics per frame
    torch.testing.assert_close(sample(apply_motion_module(model, motion_patcher(), still), frames=1),
                               sample(model, frames=1), rtol=1e-5, atol=1e-4)
    assert torch.equal(sample(model), before)
    assert all(m.in_layers[0] is norms[name] for name, m in unet.named_modules() if isinstance(m, ResBlock))


def test_v1_module_turns_frame_groupnorm_on_by_default(model):
    patched = apply_motion_module(model, motion_patcher(tiny_motion_config(family="AnimateDiff v1")))
    assert any(isinstance(p, frame_groupnorm.FrameGroupNorm) for p in patched.object_patches.values())
    v2 = apply_motion_module(model, motion_patcher())
    assert not any(isinstance(p, frame_groupnorm.FrameGroupNorm) for p in v2.object_patches.values())


def test_effect_blends_the_animated_and_the_unanimated_prediction(model):
    motion = motion_patcher()
    plain = sample(model, steps=1)
    assert torch.equal(sample(apply_motion_module(model, motion, MotionOptions(effect=0.0, **PLAIN)), steps=1), plain)
    full = sample(apply_motion_module(model, motion, MotionOptions(**PLAIN)), steps=1)
    half = sample(apply_motion_module(model, motion, MotionOptions(effect=0.5, **PLAIN)), steps=1)
    # one Euler step is linear in the prediction
    torch.testing.assert_close(half, (plain + full) / 2, rtol=1e-4, atol=1e-3)


def test_a_second_apply_replaces_the_first(model):
    first = apply_motion_module(model, motion_patcher(tiny_motion_config(family="AnimateDiff v1")), MotionOptions(effect=0.5))
    second = apply_motion_module(first, motion_patcher(), MotionOptions(**PLAIN))
    assert not any(isinstance(p, frame_groupnorm.FrameGroupNorm) for p in second.object_patches.values())
    assert "model_sampling" not in second.object_patches
    assert torch.equal(sample(second), sample(apply_motion_module(model, motion_patcher(), MotionOptions(**PLAIN))))


class Window:
    def __init__(self, index_list):
        self.index_list = index_list


def test_per_frame_scale_follows_absolute_frame_indices():
    patch = TemporalPatch(tiny_motion_config(), (1.0, 0.5, 0.0))
    x = torch.zeros(2 * 3, 1, 1, 1)
    assert patch.frame_scale(3, 2, {}, x).flatten().tolist() == [1.0, 0.5, 0.0] * 2
    # inside a context window of frames 2..4: the last value holds
    assert patch.frame_scale(3, 1, {"context_window": Window([2, 3, 4])}, x[:3]).flatten().tolist() == [0.0] * 3


def test_per_frame_scale_of_zero_leaves_that_frame_to_the_other_frames_only(model):
    motion = motion_patcher()
    ones = sample(apply_motion_module(model, motion, MotionOptions(scale=(1.0,) * 4, **PLAIN)))
    torch.testing.assert_close(ones, sample(apply_motion_module(model, motion, MotionOptions(**PLAIN))),
                               rtol=1e-4, atol=1e-3)  # a per-frame multiply instead of a scalar one: rounding only
    mixed = sample(apply_motion_module(model, motion, MotionOptions(scale=(1.0, 1.0, 1.0, 0.0), **PLAIN)))
    assert not torch.allclose(mixed[3], ones[3], rtol=1e-4, atol=1e-3)


def test_stretch_positions_allows_more_frames_than_the_encoding(model):
    short = motion_patcher(tiny_motion_config(max_frames=4))
    with pytest.raises(ValueError, match="stretch_positions"):
        sample(apply_motion_module(model, short, MotionOptions(**PLAIN)), frames=6)
    out = sample(apply_motion_module(model, short, MotionOptions(stretch_positions=True, **PLAIN)), frames=6)
    assert out.shape[0] == 6 and torch.isfinite(out).all()

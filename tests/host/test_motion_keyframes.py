"""Motion keyframes over the sampling steps: values per step, a neutral chain is bit-identical, a keyframe changes
only the steps from its start on (per-step outputs compared), module switches by step, refusals."""
import pytest
import torch

import comfy.sample
import comfy.samplers

from adm.model_patcher.keyframes import MotionKeyframe, MotionKeyframes, StepValues, percent_of
from adm.model_patcher.motion_patcher import MotionOptions, add_motion_lora, apply_motion_module
from adm.nodes.keyframes import MotionKeyframeNode
from adm.nodes.motion import ApplyMotionModule
from unets import tiny_motion_lora_file, tiny_motion_patcher, tiny_sd15_patcher

PLAIN = dict(schedule="use existing", frame_groupnorm="off")
STEPS = 4


class LinearSampling:
    """sigma = 10 * (1 - percent), with the host's ends."""

    def percent_to_sigma(self, percent):
        return 999999999.9 if percent <= 0 else 0.0 if percent >= 1 else 10.0 * (1.0 - percent)


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


@pytest.fixture(scope="module")
def motion():
    return tiny_motion_patcher(seed=1)


def chain(*keyframes):
    out = MotionKeyframes()
    for k in keyframes:
        out = out.add(k)
    return out


def sample_steps(model, seed=3):
    """The denoised prediction of every step (the sampler's callback), and the result."""
    steps = []
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 77, 32, generator=g), {}]]
    noise = torch.randn(4, 4, 8, 8, generator=g)
    out = comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", cond, cond, torch.zeros_like(noise), seed=seed,
                              disable_pbar=True, callback=lambda step, x0, x, total: steps.append(x0.clone()))
    return steps, out


def percent_between_steps(model, first: int):
    """A start_percent whose sigma lies between step ``first - 1``'s and step ``first``'s."""
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)
    return percent_of(float(sigmas[first - 1] + sigmas[first]) / 2, sampling)


def test_values_hold_or_ramp_between_keyframes():
    sampling, weights = LinearSampling(), (0.5, 0.5)
    keys = chain(MotionKeyframe(0.5, scale=0.0, effect=0.5, module_weights=(0.0, 1.0)),
                 MotionKeyframe(0.2, scale=2.0, interpolation="linear"))
    assert keys.at(9.0, sampling, weights) == StepValues()  # before the first keyframe: Apply's values
    assert keys.at(8.0, sampling, weights) == StepValues(2.0, 1.0, weights)  # at its start
    ramp = keys.at(6.5, sampling, weights)  # percent 0.35: halfway from 0.2 to 0.5
    assert ramp.scale == pytest.approx(1.0) and ramp.effect == pytest.approx(0.75)
    assert ramp.module_weights == pytest.approx((0.25, 0.75))
    assert keys.at(5.0, sampling, weights) == StepValues(0.0, 0.5, (0.0, 1.0))
    assert keys.at(0.1, sampling, weights) == StepValues(0.0, 0.5, (0.0, 1.0))  # the last one holds to the end
    later = keys.add(MotionKeyframe(0.5, scale=3.0))  # same start: the one added later wins
    assert later.at(5.0, sampling, weights).scale == 3.0


def test_percent_of_inverts_the_models_schedule(model):
    sampling = model.get_model_object("model_sampling")
    for percent in (0.1, 0.5, 0.93):
        assert percent_of(sampling.percent_to_sigma(percent), sampling) == pytest.approx(percent, abs=1e-4)


def test_a_neutral_keyframe_is_bit_identical_to_none(model, motion):
    plain = sample_steps(apply_motion_module(model, motion, MotionOptions(**PLAIN)))[1]
    neutral = chain(MotionKeyframe(0.0), MotionKeyframe(0.5, interpolation="linear"), MotionKeyframe(0.8))
    assert torch.equal(sample_steps(apply_motion_module(model, motion, MotionOptions(keyframes=neutral, **PLAIN)))[1], plain)


def test_a_keyframe_changes_only_the_steps_from_its_start_on(model, motion):
    base, _ = sample_steps(apply_motion_module(model, motion, MotionOptions(**PLAIN)))
    start = percent_between_steps(model, first=2)
    keys = chain(MotionKeyframe(start, scale=0.0))
    keyed, _ = sample_steps(apply_motion_module(model, motion, MotionOptions(keyframes=keys, **PLAIN)))
    assert len(keyed) == len(base) == STEPS
    assert torch.equal(keyed[0], base[0]) and torch.equal(keyed[1], base[1])
    assert not torch.allclose(keyed[2], base[2], atol=1e-3) and not torch.allclose(keyed[3], base[3], atol=1e-3)


def test_an_effect_keyframe_of_zero_from_the_start_is_the_image_model(model, motion):
    keys = chain(MotionKeyframe(0.0, effect=0.0))
    assert torch.equal(sample_steps(apply_motion_module(model, motion, MotionOptions(keyframes=keys, **PLAIN)))[1],
                       sample_steps(model)[1])


def test_keyframes_switch_from_one_module_to_another(model, motion):
    other = tiny_motion_patcher(seed=2)
    first_only, _ = sample_steps(apply_motion_module(model, motion, MotionOptions(**PLAIN)))
    keys = chain(MotionKeyframe(0.0, module_weights=(1.0, 0.0)),
                 MotionKeyframe(percent_between_steps(model, first=2), module_weights=(0.0, 1.0)))
    switched, _ = sample_steps(apply_motion_module(model, motion, MotionOptions(keyframes=keys, **PLAIN), (other,)))
    assert torch.equal(switched[0], first_only[0]) and torch.equal(switched[1], first_only[1])
    assert not torch.allclose(switched[2], first_only[2], atol=1e-3)


@pytest.fixture(scope="module")
def with_lora(motion, tmp_path_factory):
    return add_motion_lora(motion, tiny_motion_lora_file(motion, tmp_path_factory.mktemp("lora") / "pan.safetensors"), 1.0)


def test_a_lora_strength_keyframe_scales_the_motion_lora_from_its_start(model, motion, with_lora):
    lora, _ = sample_steps(apply_motion_module(model, with_lora, MotionOptions(**PLAIN)))
    none, _ = sample_steps(apply_motion_module(model, motion, MotionOptions(**PLAIN)))
    assert not torch.allclose(lora[0], none[0], atol=1e-3)  # the LoRA matters here
    # Off from the start: the module without its LoRA (in the forward instead of a weight patch: float rounding)
    off = sample_steps(apply_motion_module(model, with_lora, MotionOptions(keyframes=chain(MotionKeyframe(0.0, lora_strength=0.0)), **PLAIN)))[0]
    for a, b in zip(off, none):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Off from step 2: steps 0-1 are the LoRA's, steps 2-3 change
    keys = chain(MotionKeyframe(percent_between_steps(model, first=2), lora_strength=0.0))
    keyed, _ = sample_steps(apply_motion_module(model, with_lora, MotionOptions(keyframes=keys, **PLAIN)))
    torch.testing.assert_close(keyed[0], lora[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(keyed[1], lora[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(keyed[2], lora[2], atol=1e-3) and not torch.allclose(keyed[3], lora[3], atol=1e-3)
    # The motion patcher passed in keeps its weight patch
    assert with_lora.patches and not with_lora.model_options.get("animatediff_frame_loras")


def test_the_node_chains_keyframes_in_percent_order():
    node = MotionKeyframeNode()
    (keys,) = node.add(0.6, 0.5, 1.0, "hold")
    (keys,) = node.add(0.1, 2.0, 0.8, "linear", prev_keyframes=keys, module_weights="1, 0")
    assert [k.start_percent for k in keys.keyframes] == [0.1, 0.6]
    assert keys.keyframes[0] == MotionKeyframe(0.1, 2.0, 0.8, "linear", (1.0, 0.0))


@pytest.mark.parametrize("args, match", [
    ((float("nan"), 1.0, 1.0, "hold"), "start_percent must be a number from 0 to 1; got nan"),
    ((1.5, 1.0, 1.0, "hold"), "start_percent must be a number from 0 to 1; got 1.5"),
    ((0.0, -1.0, 1.0, "hold"), "motion_scale must be a number from 0 to 10; got -1"),
    ((0.0, 1.0, float("inf"), "hold"), "effect must be a number from 0 to 1; got inf"),
    ((0.0, 1.0, 1.0, "cubic"), "interpolation must be one of hold, linear; got 'cubic'"),
    ((0.0, 1.0, 1.0, "hold", None, "", float("nan")), "motion_lora_strength must be a number from 0 to 10; got nan"),
])
def test_hostile_keyframes_are_refused_with_the_range(args, match):
    with pytest.raises(ValueError, match=match):
        MotionKeyframeNode().add(*args)


def test_keyframe_weights_must_fit_the_modules_and_prev_must_be_keyframes(model, motion):
    with pytest.raises(ValueError, match="module_weights must be numbers separated by commas"):
        MotionKeyframeNode().add(0.0, 1.0, 1.0, "hold", module_weights="a, b")
    with pytest.raises(ValueError, match="module_weights must be a number from 0 to 10; got nan"):
        MotionKeyframeNode().add(0.0, 1.0, 1.0, "hold", module_weights="1, nan")
    with pytest.raises(ValueError, match="prev_keyframes must come from a Motion Keyframe node"):
        MotionKeyframeNode().add(0.0, 1.0, 1.0, "hold", prev_keyframes=[1, 2])
    (keys,) = MotionKeyframeNode().add(0.3, 1.0, 1.0, "hold", module_weights="0, 1")
    with pytest.raises(ValueError, match=r"gives 2 module weights, but Apply Motion Module has 1 motion module"):
        ApplyMotionModule().apply(model, motion, 1.0, "autoselect", "autoselect", keyframes=keys)
    assert not model.injections

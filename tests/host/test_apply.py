"""Apply Motion Module against the real host: its ModelPatcher, its samplers, its UNet."""
import hashlib

import pytest
import torch

import comfy.model_management
import comfy.sample

from adm.model_patcher import placement
from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
from adm.motion_modules import LAYOUTS, MotionModule
from adm.nodes.motion import ApplyMotionModule
from unets import meta_unet, tiny_motion_config, tiny_motion_patcher as motion_patcher, tiny_sd15_patcher

FRAMES = 6


def sample(model, frames=FRAMES, seed=3):
    g = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, 32, generator=g), {}]]
    negative = [[torch.randn(1, 77, 32, generator=g), {}]]
    noise = torch.randn(frames, 4, 8, 8, generator=g)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative,
                               torch.zeros_like(noise), seed=seed, disable_pbar=True)


def unet_fingerprint(patcher):
    unet = patcher.model.diffusion_model
    digest = hashlib.sha256()
    for key, value in unet.state_dict().items():
        digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest(), [type(m).__name__ for m in unet.modules()]


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


def test_model_passed_in_is_unchanged_and_plain_sampling_is_bit_identical(model):
    before = sample(model)
    fingerprint = unet_fingerprint(model)
    animated = sample(apply_motion_module(model, motion_patcher()))
    assert not torch.equal(animated, before), "the motion module had no effect"
    after = sample(model)
    assert torch.equal(before, after)
    assert unet_fingerprint(model) == fingerprint
    assert model.get_additional_models() == [] and not model.injections


def test_motion_scale_zero_is_plain_image_sampling(model):
    assert torch.equal(sample(apply_motion_module(model, motion_patcher(), MotionOptions(scale=0.0, schedule="use existing"))), sample(model))


def test_frames_interact_only_through_the_motion_module(model):
    # Without the module the frames are independent images: frame 0 does not depend on the batch size.
    plain = sample(model, frames=4)
    patched = apply_motion_module(model, motion_patcher())
    short, longer = sample(patched, frames=4), sample(patched, frames=5)
    torch.testing.assert_close(plain[0], sample(model, frames=5)[0], rtol=1e-4, atol=1e-3)  # batch-size rounding only
    assert not torch.allclose(short[0], longer[0], rtol=1e-4, atol=1e-3)  # a new frame changes frame 0


def test_cond_and_uncond_batched_together_or_apart_give_the_same_result(model):
    patched = apply_motion_module(model, motion_patcher())
    comfy.model_management.load_models_gpu([patched])
    unet = patched.model.diffusion_model
    options = patched.model_options["transformer_options"]
    torch.manual_seed(0)
    x = torch.randn(2 * FRAMES, 4, 8, 8)
    t = torch.full((2 * FRAMES,), 500.0)
    context = torch.randn(2 * FRAMES, 77, 32)
    together = unet(x, t, context, transformer_options={**options, "cond_or_uncond": [0, 1]})
    cond = unet(x[:FRAMES], t[:FRAMES], context[:FRAMES], transformer_options={**options, "cond_or_uncond": [0]})
    uncond = unet(x[FRAMES:], t[FRAMES:], context[FRAMES:], transformer_options={**options, "cond_or_uncond": [1]})
    torch.testing.assert_close(together, torch.cat([cond, uncond]), atol=1e-5, rtol=1e-5)
    # ...and the batch really is split: the chunks do not attend to each other.
    merged = unet(x, t, context, transformer_options={**options, "cond_or_uncond": [0]})
    assert not torch.allclose(merged, together, atol=1e-4)


def test_modules_are_inserted_while_sampling_and_removed_after(model):
    patched = apply_motion_module(model, motion_patcher())
    comfy.model_management.load_models_gpu([patched])
    unet = patched.model.diffusion_model
    inserted = [m for m in unet.modules() if type(m).__name__ == "VanillaTemporalModule"]
    assert len(inserted) == 21
    sample(model)  # loading the plain model unloads the animated clone, which ejects the modules
    assert not [m for m in unet.modules() if type(m).__name__ == "VanillaTemporalModule"]


def test_two_models_with_different_motion_modules_each_get_their_own(model):
    first, second = apply_motion_module(model, motion_patcher(seed=1)), apply_motion_module(model, motion_patcher(seed=2))
    a1, b, a2 = sample(first), sample(second), sample(first)
    assert torch.equal(a1, a2) and not torch.equal(a1, b)


def test_frames_beyond_the_positional_encoding_are_refused_with_the_fix(model):
    patched = apply_motion_module(model, motion_patcher(tiny_motion_config(max_frames=4)))
    with pytest.raises(ValueError, match=r"5 frames.*at most 4.*context windows"):
        sample(patched, frames=5)
    assert torch.equal(sample(model), sample(model))  # the host still samples the plain model


def test_module_for_another_base_is_refused_before_anything_is_patched(model):
    sdxl = motion_patcher(tiny_motion_config(family="AnimateDiff SDXL beta", base="SDXL", down=((32, 32), (64, 64), (128, 128)),
                                             mid=(), up=((128,) * 3, (64,) * 3, (32,) * 3)))
    with pytest.raises(placement.MotionCompatibilityError, match="made for SDXL"):
        ApplyMotionModule().apply(model, sdxl, 1.0, "autoselect", "autoselect")
    assert not model.injections


@pytest.mark.parametrize("base, family, where", [
    ("SD1.5", "AnimateDiff v2", ["input 1", "input 2", "input 4", "input 5", "input 7", "input 8", "input 10",
                                 "input 11", "middle", *[f"output {i}" for i in range(12)]]),
    ("SD1.5", "AnimateDiff v3", ["input 1", "input 2", "input 4", "input 5", "input 7", "input 8", "input 10",
                                 "input 11", *[f"output {i}" for i in range(12)]]),
    ("SDXL", "AnimateDiff SDXL beta", ["input 1", "input 2", "input 4", "input 5", "input 7", "input 8",
                                       *[f"output {i}" for i in range(9)]]),
])
def test_full_size_placement_follows_the_original_architecture(base, family, where):
    unet = meta_unet(base)
    config = LAYOUTS[family]
    assert [s.where for s in placement.plan(unet, config, family)] == where
    with torch.device("meta"):
        module = MotionModule(config)
    placement.inject(unet, config, module.in_unet_order(), family)
    layers = lambda block: [type(layer).__name__ for layer in block]  # noqa: E731
    if base == "SD1.5":
        assert layers(unet.output_blocks[5]) == ["ResBlock", "SpatialTransformer", "VanillaTemporalModule", "Upsample"]
        assert layers(unet.output_blocks[2]) == ["ResBlock", "VanillaTemporalModule", "Upsample"]
        assert layers(unet.input_blocks[10]) == ["ResBlock", "VanillaTemporalModule"]
        mid = ["ResBlock", "SpatialTransformer", "VanillaTemporalModule", "ResBlock"] if config.mid else \
            ["ResBlock", "SpatialTransformer", "ResBlock"]
        assert layers(unet.middle_block) == mid
    else:
        assert layers(unet.input_blocks[1]) == ["ResBlock", "VanillaTemporalModule"]
        assert layers(unet.output_blocks[8]) == ["ResBlock", "VanillaTemporalModule"]
    placement.eject(unet)
    assert not [m for m in unet.modules() if type(m).__name__ == "VanillaTemporalModule"]

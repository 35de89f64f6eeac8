"""Per-block scales, the spatial motion mask and several motion modules: each neutral value is bit-identical to
today's path, and each control changes only what it claims."""
import pytest
import torch

import comfy.model_management

from adm.model_patcher import placement
from adm.model_patcher.block_scales import BlockScales
from adm.model_patcher.motion_mask import MotionMask
from adm.model_patcher.motion_patcher import MotionOptions, TemporalPatch, apply_motion_module
from adm.motion_modules import VanillaTemporalModule
from adm.nodes.motion import ApplyMotionModule
from unets import tiny_motion_config, tiny_motion_lora_file, tiny_motion_patcher, tiny_sd15_patcher

FRAMES = 4
PLAIN = dict(schedule="use existing", frame_groupnorm="off")
V3 = tiny_motion_config(family="AnimateDiff v3", mid=())
SDXL = tiny_motion_config(family="AnimateDiff SDXL beta", base="SDXL", down=((32, 32), (64, 64), (128, 128)), mid=(),
                          up=((128,) * 3, (64,) * 3, (32,) * 3))


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


@pytest.fixture(scope="module")
def motion():
    return tiny_motion_patcher(seed=1)


@pytest.fixture(scope="module")
def motion_b():
    return tiny_motion_patcher(seed=2)


def predict(patcher, capture=None):
    """One UNet prediction of a 4-frame clip (cond only) through the host's apply_model and its wrappers;
    ``capture`` (a list) receives each input block's output."""
    comfy.model_management.load_models_gpu([patcher, *patcher.get_nested_additional_models()])  # as sampling does
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(FRAMES, 4, 8, 8, generator=g), torch.randn(FRAMES, 77, 32, generator=g)
    options = dict(patcher.model_options["transformer_options"], cond_or_uncond=[0])
    if capture is not None:
        patches = {k: list(v) for k, v in options.get("patches", {}).items()}
        patches.setdefault("input_block_patch", []).append(lambda h, _: capture.append(h.clone()) or h)
        options["patches"] = patches
    return patcher.model.apply_model(x, torch.full((FRAMES,), 2.0), c_crossattn=context, transformer_options=options)


def animated(model, motion, more=(), **options):
    return apply_motion_module(model, motion, MotionOptions(**PLAIN, **options), more)


# Per-block scale

def test_block_scales_of_one_take_the_slot_path_and_are_bit_identical_to_today(model, motion):
    today = predict(animated(model, motion))
    ones = animated(model, motion, block_scales=BlockScales(slots=(("input 1", 1.0), ("middle", 1.0))))
    comfy.model_management.load_models_gpu([ones])
    assert any(type(m).__name__ == "MotionSlot" for m in ones.model.diffusion_model.modules())
    assert torch.equal(predict(ones), today)


def test_block_scale_zero_everywhere_is_the_image_model(model, motion):
    assert torch.equal(predict(animated(model, motion, block_scales=BlockScales(0.0, 0.0, 0.0))), predict(model))


def test_a_block_scale_changes_its_blocks_and_none_before_them(model, motion):
    full, plain, no_down, no_input_4 = [], [], [], []
    predict(animated(model, motion), full)
    predict(model, plain)
    out_no_down = predict(animated(model, motion, block_scales=BlockScales(down=0.0)), no_down)
    predict(animated(model, motion, block_scales=BlockScales(slots=(("input 4", 0.0),))), no_input_4)
    # down = 0: every down block is the image model's, the output is not
    assert all(torch.equal(a, b) for a, b in zip(no_down, plain)) and len(no_down) == 12
    assert not torch.allclose(out_no_down, predict(model), atol=1e-3)
    # one slot at 0: the blocks before it are the fully animated ones, that block is not
    assert all(torch.equal(a, b) for a, b in zip(no_input_4[:4], full[:4]))
    assert not torch.allclose(no_input_4[4], full[4], atol=1e-4)


def test_block_scales_are_refused_readably(model, motion):
    apply = ApplyMotionModule().apply
    with pytest.raises(ValueError, match=r"block_scales names 'input 3'.*slots are: input 1, input 2, input 4"):
        apply(model, motion, 1.0, "autoselect", "autoselect", block_scales="input 3: 0")
    with pytest.raises(ValueError, match=r"cannot read 'down 3 = 0'.*output 9: 0"):
        apply(model, motion, 1.0, "autoselect", "autoselect", block_scales="down 3 = 0")
    for bad in (float("nan"), -1.0, 11.0):
        with pytest.raises(ValueError, match="up_scale must be a number from 0 to 10"):
            apply(model, motion, 1.0, "autoselect", "autoselect", up_scale=bad)
    with pytest.raises(ValueError, match=r"block_scales 'middle' must be a number from 0 to 10; got -1"):
        apply(model, motion, 1.0, "autoselect", "autoselect", block_scales="middle: -1")
    with pytest.raises(ValueError, match=r"cannot read 'middle: nan'"):
        apply(model, motion, 1.0, "autoselect", "autoselect", block_scales="middle: nan")
    assert not model.injections


# Spatial motion mask

def test_a_white_mask_is_bit_identical_and_a_black_mask_is_the_image_model(model, motion):
    assert torch.equal(predict(animated(model, motion, mask=MotionMask(torch.ones(64, 64)))), predict(animated(model, motion)))
    assert torch.equal(predict(animated(model, motion, mask=MotionMask(torch.zeros(FRAMES, 64, 64)))), predict(model))


def test_a_frame_with_a_black_mask_is_the_image_models_frame(model, motion):
    mask = torch.ones(FRAMES, 64, 64)
    mask[2] = 0
    out, plain = predict(animated(model, motion, mask=MotionMask(mask))), predict(model)
    torch.testing.assert_close(out[2], plain[2], rtol=0, atol=1e-5)  # batch arithmetic only
    assert all(not torch.allclose(out[i], plain[i], atol=1e-3) for i in (0, 1, 3))


def test_the_mask_leaves_the_temporal_layer_alone_where_it_is_black():
    torch.manual_seed(0)
    layer = VanillaTemporalModule(32).eval()
    torch.nn.init.normal_(layer.temporal_transformer.proj_out.weight, std=0.2)
    mask = torch.ones(16, 16)
    mask[:, :8] = 0  # left half black; the 8x8 block sees left 4 columns black
    patch = TemporalPatch(tiny_motion_config(), 1.0, mask=MotionMask(mask))
    x = torch.randn(2 * FRAMES, 32, 8, 8)
    with torch.no_grad():
        out = patch(layer, x, None, None, {"cond_or_uncond": [0, 1]})
        unmasked = TemporalPatch(tiny_motion_config(), 1.0)(layer, x, None, None, {"cond_or_uncond": [0, 1]})
    assert torch.equal(out[..., :4], x[..., :4])
    assert torch.equal(out[..., 4:], unmasked[..., 4:])
    assert not torch.allclose(out[..., 4:], x[..., 4:])


def test_the_mask_follows_the_frames_of_a_context_window_and_each_chunk():
    mask = MotionMask(torch.arange(5.0).view(5, 1, 1).expand(5, 16, 16) / 4)  # frame i is i/4 everywhere
    picked = mask.at([2, 3, 4], 2, 8, 8, torch.zeros(1, dtype=torch.float64))
    assert picked.shape == (6, 1, 8, 8) and picked.dtype == torch.float64
    assert picked[:, 0, 0, 0].tolist() == [0.5, 0.75, 1.0] * 2
    with pytest.raises(ValueError, match="motion_mask has 5 frames but frame 5 is being sampled"):
        mask.at([4, 5], 1, 8, 8, picked)


@pytest.mark.parametrize("mask, match", [
    (torch.full((8, 8), float("nan")), r"from 0 \(no motion\) to 1.*nan"),
    (torch.full((8, 8), 1.5), r"from 0 \(no motion\) to 1.*1\.5"),
    (torch.ones(1, 1, 8, 8), r"\[frames, height, width\].*\[1, 1, 8, 8\]"),
    (torch.ones(0, 8, 8), r"\[frames, height, width\]"),
])
def test_bad_masks_are_refused_with_the_fix(mask, match):
    with pytest.raises(ValueError, match=match):
        MotionMask(mask)


def test_a_mask_for_another_frame_count_is_refused_before_sampling(model, motion):
    import comfy.sample
    patched = animated(model, motion, mask=MotionMask(torch.ones(3, 8, 8)))
    noise = torch.zeros(FRAMES, 4, 8, 8)
    cond = [[torch.zeros(1, 77, 32), {}]]
    with pytest.raises(ValueError, match=r"motion_mask has 3 frames but the latent batch has 4.*exactly 4"):
        comfy.sample.sample(patched, noise, 1, 1.0, "euler", "normal", cond, cond, noise, seed=0, disable_pbar=True)


# Several motion modules

def test_weights_one_and_zero_are_exactly_that_module_alone(model, motion, motion_b):
    a_alone, b_alone = predict(animated(model, motion)), predict(animated(model, motion_b))
    assert torch.equal(predict(animated(model, motion, (motion_b,), module_weights=(1.0, 0.0))), a_alone)
    assert torch.equal(predict(animated(model, motion, (motion_b,), module_weights=(0.0, 1.0))), b_alone)
    both = predict(animated(model, motion, (motion_b,)))
    assert not torch.allclose(both, a_alone, atol=1e-3) and not torch.allclose(both, b_alone, atol=1e-3)


def test_modules_at_one_slot_add_their_weighted_residuals_side_by_side(model, motion, motion_b):
    from adm.model_patcher.motion_slots import MotionSlot
    a, b = motion.model.in_unet_order()[0], motion_b.model.in_unet_order()[0]
    x = torch.randn(FRAMES, 32, 8, 8)
    patch = TemporalPatch(tiny_motion_config(), 1.0, configs=(tiny_motion_config(),) * 2, weights=(0.7, 0.3))
    with torch.no_grad():
        out = patch(MotionSlot("input 1", [(0, a), (1, b)]), x, None, None, {})
        expected = x + 0.7 * (a(x, FRAMES) - x) + 0.3 * (b(x, FRAMES) - x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_modules_of_two_families_each_keep_their_placement(model, motion):
    v3 = tiny_motion_patcher(V3, seed=3)
    patched = animated(model, motion, (v3,))
    comfy.model_management.load_models_gpu([patched])
    slots = {m.where: m.indices for m in patched.model.diffusion_model.modules() if type(m).__name__ == "MotionSlot"}
    assert slots["middle"] == (0,) and slots["input 1"] == (0, 1) and len(slots) == 21
    assert torch.isfinite(predict(patched)).all()
    predict(model)
    assert not [m for m in model.model.diffusion_model.modules() if type(m).__name__ in ("MotionSlot", "VanillaTemporalModule")]


def test_modules_that_cannot_share_the_unet_are_refused_before_patching(model, motion):
    with pytest.raises(placement.MotionCompatibilityError, match="made for SDXL"):
        ApplyMotionModule().apply(model, motion, 1.0, "autoselect", "autoselect", motion_module_2=tiny_motion_patcher(SDXL))
    with pytest.raises(ValueError, match=r"module_weights gives 1 weight\(s\) for 2 motion module\(s\)"):
        ApplyMotionModule().apply(model, motion, 1.0, "autoselect", "autoselect", motion_module_2=motion, module_weights="1")
    with pytest.raises(ValueError, match="module_weights must be numbers from 0 to 10"):
        ApplyMotionModule().apply(model, motion, 1.0, "autoselect", "autoselect", motion_module_2=motion,
                                  module_weights="1, nan")
    with pytest.raises(ValueError, match="module_weights must be numbers separated by commas"):
        ApplyMotionModule().apply(model, motion, 1.0, "autoselect", "autoselect", module_weights="one")
    assert not model.injections and not model.get_additional_models()


def test_a_second_apply_with_one_module_replaces_two(model, motion, motion_b):
    two = animated(model, motion, (motion_b,))
    again = apply_motion_module(two, motion, MotionOptions(**PLAIN))
    assert len(again.get_additional_models()) == 1
    assert torch.equal(predict(again), predict(animated(model, motion)))


# Motion-LoRA strength per frame

@pytest.fixture(scope="module")
def lora_file(motion, tmp_path_factory):
    return tiny_motion_lora_file(motion, tmp_path_factory.mktemp("lora") / "camera.safetensors")


def test_per_frame_lora_strengths_match_the_weight_patch_when_even_and_nothing_at_zero(model, motion, lora_file):
    from adm.model_patcher.motion_patcher import add_motion_lora
    patched_weights = predict(animated(model, add_motion_lora(motion, lora_file, 0.8)))
    even = predict(animated(model, add_motion_lora(motion, lora_file, 1.6, (0.5,))))
    torch.testing.assert_close(even, patched_weights, rtol=1e-4, atol=1e-4)  # (W + s up down) x vs W x + s up down x
    assert not torch.allclose(patched_weights, predict(animated(model, motion)), atol=1e-3)
    off = predict(animated(model, add_motion_lora(motion, lora_file, 1.0, (0.0,))))
    torch.testing.assert_close(off, predict(animated(model, motion)), rtol=1e-4, atol=1e-4)


def test_per_frame_lora_strength_acts_per_frame(motion, lora_file):
    """One module call: the LoRA's update of a frame's tokens scales with that frame's strength (frame 0 at 1 as
    the weight patch, frame 1 at 0 as no LoRA; its queries, keys and values are per token)."""
    from adm.model_patcher import frame_lora
    from adm.model_patcher.motion_patcher import add_motion_lora
    layer, config = motion.model.in_unet_order()[0], motion.model.config
    entries = frame_lora.by_slot(add_motion_lora(motion, lora_file, 1.0, (1.0, 0.0)).model_options[frame_lora.FRAME_LORAS],
                                 config, [f"slot {i}" for i in range(len(config.channels_in_unet_order))])["slot 0"]
    to_q = layer.temporal_transformer.transformer_blocks[0].attention_blocks[0].to_q
    path = "temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q"
    up, down = next((u, d) for p, u, d, _, _ in entries if p == path)
    tokens = torch.randn(3, 2, 32)  # (b h w) f c with 2 frames
    with torch.no_grad(), frame_lora.applied(layer, [(p, u, d, s, torch.tensor([1.0, 0.0])) for p, u, d, s, _ in entries], 2):
        hooked = to_q(tokens)
    plain = to_q(tokens).detach()
    torch.testing.assert_close(hooked[:, 0], plain[:, 0] + tokens[:, 0] @ (up @ down).T, rtol=1e-5, atol=1e-5)
    assert torch.equal(hooked[:, 1], plain[:, 1])
    assert not to_q._forward_hooks  # nothing stays on the module


def test_bad_per_frame_lora_strengths_are_refused(motion, lora_file):
    from adm.model_patcher.motion_patcher import add_motion_lora
    with pytest.raises(ValueError, match=r"strength_per_frame\) must be finite numbers, got nan"):
        add_motion_lora(motion, lora_file, 1.0, (1.0, float("nan")))
    from adm.nodes.motion import LoadMotionLoRA
    with pytest.raises(ValueError, match="strength_per_frame must be numbers separated by commas"):
        LoadMotionLoRA().load(motion, "x.safetensors", 1.0, strength_per_frame="1, high")

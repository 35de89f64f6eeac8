"""PIA and AnimateLCM-I2V files: detected as motion-module families with their extra weights kept, the published
key layout (formats.md §2.4, §2.5), and clear refusals of files that only look like them."""
import pytest
import torch
from safetensors.torch import save_file

from adm.motion_modules import LAYOUTS, MotionModule, MotionModuleError, load_motion_module
from adm.motion_modules.formats import published_state_dict
from adm.motion_modules.image_encoder import ImageEncoder
from unets import tiny_motion_config

PIA_CONFIG = dict(family="PIA", mid=())
I2V_CONFIG = dict(family="AnimateLCM-I2V", max_frames=64, pe_in_file=False)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    module = MotionModule(tiny_motion_config(**overrides))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return module


def saved(tmp_path, sd, name="file.safetensors"):
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("overrides, extra", [
    (PIA_CONFIG, "conv_in."), (dict(PIA_CONFIG, mid=(128,)), "conv_in."), (I2V_CONFIG, "img_encoder."),
], ids=["PIA", "PIA-with-mid-block", "AnimateLCM-I2V"])
def test_image_to_video_files_load_with_their_extra_weights(tmp_path, overrides, extra):
    module = tiny(**overrides)
    sd = published_state_dict(module)
    assert any(k.startswith(extra) for k in sd)
    if overrides["family"] == "AnimateLCM-I2V":
        assert not any(k.endswith("pos_encoder.pe") for k in sd)  # as AnimateLCM: no table in the file
    loaded = load_motion_module(saved(tmp_path, sd))
    assert loaded.config.family == overrides["family"] and loaded.config.mid == overrides.get("mid", (128,))
    got = loaded.state_dict()
    for key, value in sd.items():
        assert torch.equal(got[key], value), key


def test_published_layouts_have_the_real_keys_and_shapes():
    with torch.device("meta"):
        pia = MotionModule(LAYOUTS["PIA"]).state_dict()
        i2v = MotionModule(LAYOUTS["AnimateLCM-I2V"]).state_dict()
    assert list(pia["conv_in.weight"].shape) == [320, 9, 3, 3] and list(pia["conv_in.bias"].shape) == [320]
    encoder = {k[len("img_encoder."):]: list(v.shape) for k, v in i2v.items() if k.startswith("img_encoder.")}
    expected = {"conv_in.weight": [320, 4, 3, 3], "conv_in.bias": [320],
                "body.2.in_conv.weight": [640, 320, 1, 1], "body.2.in_conv.bias": [640],
                "body.4.in_conv.weight": [1280, 640, 1, 1], "body.4.in_conv.bias": [1280]}
    for unit, width in enumerate([320, 320, 640, 640, 1280, 1280, 1280, 1280]):
        expected.update({f"body.{unit}.block1.weight": [width, width, 3, 3], f"body.{unit}.block1.bias": [width],
                         f"body.{unit}.block2.weight": [width, width, 1, 1], f"body.{unit}.block2.bias": [width]})
    assert encoder == expected  # formats.md §2.4: no in_conv where the width stays, no skep, pooling has no weights


def test_image_encoder_gives_one_map_per_level_at_the_unets_sizes():
    encoder = ImageEncoder((8, 16, 32, 32))
    maps = encoder(torch.randn(1, 4, 13, 10), positions=3)
    # The UNet's downsampling conv (stride 2, padding 1) gives ceil(h / 2); the encoder's pooling must match.
    assert [tuple(m.shape) for m in maps] == [(3, 8, 13, 10), (3, 16, 7, 5), (3, 32, 4, 3), (3, 32, 2, 2)]
    assert not torch.equal(maps[0][0], maps[0][1])  # the frame sinusoid makes frames differ
    same = encoder(torch.randn(1, 4, 13, 10), positions=3, drift=0.0)
    assert torch.equal(same[3][0], same[3][2])  # and nothing else does


def pia_sd(**replace):
    sd = published_state_dict(tiny(**PIA_CONFIG))
    sd.update(replace)
    return {k: v for k, v in sd.items() if v is not None}


@pytest.mark.parametrize("sd, message", [
    (lambda: pia_sd(**{"conv_in.weight": torch.zeros(32, 4, 3, 3)}), r"conv_in\.weight has shape \[32, 4, 3, 3\].*\[32, 9, 3, 3\]"),
    (lambda: pia_sd(**{"conv_in.weight": torch.zeros(320, 9, 3, 3)}), r"\[320, 9, 3, 3\].*first block's 32 channels"),
    (lambda: pia_sd(**{"conv_in.bias": None}), "conv_in.bias is missing"),
    (lambda: published_state_dict(tiny(family="PIA", base="SDXL", mid=(), down=((32, 32), (64, 64), (128, 128)),
                                       up=((128,) * 3, (64,) * 3, (32,) * 3))), "PIA file with SDXL-shaped"),
    (lambda: {**published_state_dict(tiny(family="AnimateDiff SDXL beta", base="SDXL", mid=(),
                                          down=((32, 32), (64, 64), (128, 128)), up=((128,) * 3, (64,) * 3, (32,) * 3))),
              "img_encoder.conv_in.weight": torch.zeros(32, 4, 3, 3)}, "AnimateLCM-I2V file with SDXL-shaped"),
    (lambda: {k: v for k, v in published_state_dict(tiny(**I2V_CONFIG)).items() if "body.5." not in k},
     "keys do not match the AnimateLCM-I2V layout"),
    (lambda: {**published_state_dict(tiny(**I2V_CONFIG)), "img_encoder.body.2.in_conv.weight": torch.zeros(64, 64, 1, 1)},
     "shapes do not match the AnimateLCM-I2V layout"),
    (lambda: {**published_state_dict(tiny(**I2V_CONFIG)), "img_encoder.conv_in.bias": torch.full((32,), float("nan"))},
     "img_encoder.conv_in.bias' holds NaN"),
], ids=["pia-4-channel-conv", "pia-width-of-another-unet", "pia-no-bias", "pia-sdxl", "i2v-sdxl", "i2v-missing-unit",
        "i2v-wrong-shape", "i2v-nan"])
def test_files_that_only_look_like_image_to_video_modules_are_refused(tmp_path, sd, message):
    with pytest.raises(MotionModuleError, match=rf"picked\.safetensors: .*{message}"):
        load_motion_module(saved(tmp_path, sd(), "picked.safetensors"))

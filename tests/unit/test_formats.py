"""Reading motion-module files: containers, dtypes, detection, and refusing what is not one."""
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adm.motion_modules import LAYOUTS, MotionModule, MotionModuleError, detect, load_motion_module
from adm.motion_modules.formats import published_state_dict
from unets import tiny_motion_config


def tiny_module(seed=0, **overrides):
    torch.manual_seed(seed)
    module = MotionModule(tiny_motion_config(**overrides))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return module


def assert_same_module(loaded, module, dtype=torch.float32):
    expected = {k: v.to(dtype) for k, v in published_state_dict(module).items()}
    got = loaded.state_dict()
    assert got.keys() == module.state_dict().keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("suffix, wrap, dtype", [
    (".safetensors", None, torch.float16), (".safetensors", None, torch.bfloat16), (".safetensors", None, torch.float32),
    (".ckpt", None, torch.float32), (".ckpt", "state_dict", torch.float32), (".pt", "module", torch.float16),
    (".pth", "prefix", torch.float32),
])
def test_containers_load_with_their_tensors(tmp_path, suffix, wrap, dtype):
    module = tiny_module()
    sd = {k: v.to(dtype).contiguous() for k, v in published_state_dict(module).items()}
    path = tmp_path / f"mm{suffix}"
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        obj = {"state_dict": sd, "epoch": 3} if wrap == "state_dict" else {"module": sd} if wrap == "module" else \
            {**{f"module.{k}": v for k, v in sd.items()}} if wrap == "prefix" else {**sd, "animatediff_config": "x"}
        torch.save(obj, path)
    loaded = load_motion_module(path)
    assert loaded.config.family == "AnimateDiff v2"
    assert_same_module(loaded, module, dtype)
    x = torch.randn(8, 32, 2, 2, dtype=dtype)
    torch.testing.assert_close(loaded.in_unet_order()[0](x, 8), module.to(dtype).in_unet_order()[0](x, 8))


def test_animatelcm_without_encoding_regenerates_it(tmp_path):
    module = tiny_module()
    sd = {k: v for k, v in published_state_dict(module).items() if "pos_encoder" not in k}
    save_file(sd, tmp_path / "lcm.safetensors")
    loaded = load_motion_module(tmp_path / "lcm.safetensors")
    assert loaded.config.family == "AnimateLCM" and loaded.config.max_frames == 64
    pe = loaded.in_unet_order()[0].temporal_transformer.transformer_blocks[0].attention_blocks[0].pos_encoder.pe
    assert pe.shape == (1, 64, 32) and not pe.is_meta


def full_size(family):
    with torch.device("meta"):
        return published_state_dict(MotionModule(LAYOUTS[family]))


@pytest.mark.parametrize("family, frames", [("AnimateDiff v1", 24), ("AnimateDiff v2", 32), ("AnimateDiff v3", 32),
                                            ("AnimateDiff SDXL beta", 32), ("AnimateLCM", 64), ("PIA", 32),
                                            ("AnimateLCM-I2V", 64)])
def test_full_size_layouts_are_detected(family, frames):
    config = detect(full_size(family), "x")
    assert (config.family, config.max_frames) == (family, frames)
    assert config == LAYOUTS[family]


def test_hotshotxl_names_are_recognised(tmp_path):
    sd = {k.replace(".temporal_transformer.", ".").replace("motion_modules", "temporal_attentions")
          .replace("pos_encoder.pe", "pos_encoder.positional_encoding"): v
          for k, v in full_size("AnimateDiff SDXL beta").items()}
    sd = {k: v for k, v in sd.items()}
    from adm.motion_modules.formats import _unwrap
    config = detect(_unwrap(sd, "hsxl.safetensors"), "hsxl.safetensors")
    assert config.family == "HotshotXL" and config.base == "SDXL"


class MakesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {**published_state_dict(tiny_module()), "config": MakesMarker(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(MotionModuleError, match=r"evil\.ckpt: refused to load.*could run code"):
        load_motion_module(path)
    assert not marker.exists()


def test_truncated_and_empty_files_say_so(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(published_state_dict(tiny_module()), good)
    for suffix in (".safetensors", ".ckpt"):
        cut = tmp_path / f"cut{suffix}"
        if suffix == ".ckpt":
            torch.save(published_state_dict(tiny_module()), cut)
        data = (good if suffix == ".safetensors" else cut).read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(MotionModuleError, match=rf"cut\{suffix}: cannot be read.*truncated"):
            load_motion_module(cut)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(MotionModuleError, match=r"empty\.ckpt: the file is empty"):
        load_motion_module(tmp_path / "empty.ckpt")


@pytest.mark.parametrize("keys, what", [
    ({"model.diffusion_model.input_blocks.0.0.weight": [8, 4]}, "Stable Diffusion checkpoint.*models/checkpoints"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": [4, 4]}, "LoRA for the image model.*models/loras"),
    ({"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight": [4, 4]},
     "motion LoRA.*animatediff_motion_lora"),
    ({"controlnet_cond_embedding.weight": [4, 4]}, "SparseCtrl"),
    ({"something.else": [4]}, "not an AnimateDiff motion module"),
])
def test_other_kinds_of_file_are_named_with_where_they_belong(tmp_path, keys, what):
    path = tmp_path / "picked.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
    with pytest.raises(MotionModuleError, match=rf"picked\.safetensors: this file is .*{what}"):
        load_motion_module(path)


def test_damaged_layout_is_refused(tmp_path):
    sd = published_state_dict(tiny_module())
    sd.pop(next(k for k in sd if k.endswith("ff_norm.weight")))
    save_file(sd, tmp_path / "damaged.safetensors")
    with pytest.raises(MotionModuleError, match="damaged.safetensors: keys do not match"):
        load_motion_module(tmp_path / "damaged.safetensors")

"""Motion LoRAs: key layouts, application through the host's weight patches, stacking, refusal."""
import copy
import hashlib

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import pytest
import torch
from safetensors.torch import save_file

from adm.model_patcher.motion_patcher import MotionOptions, add_motion_lora, apply_motion_module
from adm.motion_modules import MotionModuleError
from adm.motion_modules.motion_lora import target_key
from unets import tiny_motion_config, tiny_motion_patcher, tiny_sd15_patcher

PLAIN = MotionOptions(schedule="use existing")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


@pytest.mark.parametrize("key, target", [
    ("down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight",
     "down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight"),
    ("mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor.to_out_lora.up.weight",
     "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.weight"),
    ("up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_out.processor.0_lora.up.weight",
     "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_out.0.weight"),
    ("up_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.processor.proj_lora.down.weight",
     "up_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight"),
    ("up_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.processor.2_lora.up.weight",
     "up_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.2.weight"),
])
def test_published_and_motiondirector_keys_map_to_module_weights(key, target):
    assert target_key(key) == target


def official_lora(module_sd, rank=4, seed=0, mid=True):
    """v2 camera-LoRA layout: every attention projection of every module, mid block included."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, weight in module_sd.items():
        if ".attention_blocks." not in key or not key.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            continue
        if key.startswith("mid_block") and not mid:
            continue
        stem, proj = key.rsplit(".", 2)[0], key.split(".")[-2]
        stem, proj = (key[: -len(".to_out.0.weight")], "to_out") if key.endswith("to_out.0.weight") else (stem, proj)
        c = weight.shape[0]
        sd[f"{stem}.processor.{proj}_lora.down.weight"] = torch.randn(rank, c, generator=g) * 0.3
        sd[f"{stem}.processor.{proj}_lora.up.weight"] = torch.randn(c, rank, generator=g) * 0.3
    return sd


def sample(model, seed=3):
    torch.manual_seed(seed)
    noise = torch.randn(4, 4, 8, 8)
    cond = [[torch.randn(1, 77, 32), {}]]
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", cond, cond, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


def merged(motion, *loras):
    """The independent reference: a copy of the module with W + strength * up @ down written in."""
    module = copy.deepcopy(motion.model)
    sd = module.state_dict()
    for lora, strength in loras:
        for key, up_down in lora.items():
            if key.endswith("down.weight"):
                up = lora[key.replace("down.weight", "up.weight")]
                sd[target_key(key)] += strength * (up @ up_down)
    return comfy.model_patcher.ModelPatcher(module, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


def digest(module):
    return hashlib.sha256(b"".join(v.numpy().tobytes() for v in module.state_dict().values())).hexdigest()


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


def test_lora_equals_merged_weights_and_unpatching_restores_the_module(model, tmp_path):
    motion = tiny_motion_patcher()
    before, fingerprint = sample(apply_motion_module(model, motion, PLAIN)), digest(motion.model)
    lora = official_lora(motion.model.state_dict())
    reference = sample(apply_motion_module(model, merged(motion, (lora, 0.8)), PLAIN))
    torch.save(lora, tmp_path / "v2_lora_PanLeft.ckpt")
    with_lora = sample(apply_motion_module(model, add_motion_lora(motion, tmp_path / "v2_lora_PanLeft.ckpt", 0.8), PLAIN))
    torch.testing.assert_close(with_lora, reference, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(with_lora, before, rtol=1e-4, atol=1e-3)
    # Sampling with the plain module makes the host unload the LoRA clone, which restores the weights exactly.
    assert torch.equal(sample(apply_motion_module(model, motion, PLAIN)), before)
    assert digest(motion.model) == fingerprint


def test_loras_stack_with_their_own_strengths(model, tmp_path):
    motion = tiny_motion_patcher()
    a, b = official_lora(motion.model.state_dict(), seed=1), official_lora(motion.model.state_dict(), seed=2)
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    reference = sample(apply_motion_module(model, merged(motion, (a, 0.5), (b, -0.3)), PLAIN))
    stacked = add_motion_lora(add_motion_lora(motion, tmp_path / "a.safetensors", 0.5), tmp_path / "b.safetensors", -0.3)
    torch.testing.assert_close(sample(apply_motion_module(model, stacked, PLAIN)), reference, rtol=1e-4, atol=1e-3)


def test_a_zero_up_lora_changes_nothing(model, tmp_path):
    motion = tiny_motion_patcher()
    lora = {k: torch.zeros_like(v) if ".up." in k else v for k, v in official_lora(motion.model.state_dict()).items()}
    save_file(lora, tmp_path / "zero.safetensors")
    assert torch.equal(sample(apply_motion_module(model, add_motion_lora(motion, tmp_path / "zero.safetensors", 1.0), PLAIN)),
                       sample(apply_motion_module(model, motion, PLAIN)))


def test_a_v2_lora_on_a_module_without_mid_block_is_refused(tmp_path):
    v2 = tiny_motion_patcher()
    v3 = tiny_motion_patcher(tiny_motion_config(family="AnimateDiff v3", mid=()))
    save_file(official_lora(v2.model.state_dict()), tmp_path / "v2_lora_ZoomIn.safetensors")
    with pytest.raises(MotionModuleError, match=r"v2_lora_ZoomIn.*AnimateDiff v3.*mid block.*AnimateDiff v2"):
        add_motion_lora(v3, tmp_path / "v2_lora_ZoomIn.safetensors", 1.0)
    save_file(official_lora(v2.model.state_dict(), mid=False), tmp_path / "no_mid.safetensors")
    add_motion_lora(v3, tmp_path / "no_mid.safetensors", 1.0)  # fits: no mid-block layers


def test_a_file_without_lora_layers_is_refused(tmp_path):
    save_file({"something": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(MotionModuleError, match="x.safetensors: no motion-LoRA layers"):
        add_motion_lora(tiny_motion_patcher(), tmp_path / "x.safetensors", 1.0)


@pytest.mark.parametrize("alpha_name", ["{stem}.alpha", "{stem}.down.alpha"])
def test_alpha_scales_each_pair_by_alpha_over_rank(tmp_path, alpha_name):
    from adm.motion_modules import read_state_dict
    from adm.training.lora import merge_motion_lora

    narrow = tiny_motion_config(down=((32, 32),) * 4, mid=(32,), up=((32,) * 3,) * 4)  # small: weights only
    motion, rank, strength = tiny_motion_patcher(narrow), 4, 0.7
    base = {k: v.clone() for k, v in motion.model.state_dict().items()}
    lora = official_lora(base, rank=rank)
    expected = dict(base)
    for i, down_key in enumerate([k for k in lora if k.endswith(".down.weight")]):
        stem, alpha = down_key[: -len(".down.weight")], float(1 + i % 3)  # scales 1/4, 2/4, 3/4 by layer
        lora[alpha_name.format(stem=stem)] = torch.tensor(alpha)
        target = stem.replace(".processor.", ".").replace("_lora", "")
        target += ".0.weight" if target.endswith(".to_out") else ".weight"
        expected[target] = base[target] + strength * alpha / rank * (lora[f"{stem}.up.weight"] @ lora[down_key])
    save_file(lora, tmp_path / "alpha.safetensors")

    patched = add_motion_lora(motion, tmp_path / "alpha.safetensors", strength)  # the node: host weight patches
    patched.patch_model()
    try:
        got = {k: v.clone() for k, v in patched.model.state_dict().items()}
    finally:
        patched.unpatch_model()
    merged_copy = copy.deepcopy(motion.model)  # training's merge (e.g. for saving a merged module)
    merge_motion_lora(merged_copy, read_state_dict(tmp_path / "alpha.safetensors"), strength)
    for result in (got, merged_copy.state_dict()):
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(result[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert all(torch.equal(v, base[k]) for k, v in motion.model.state_dict().items())

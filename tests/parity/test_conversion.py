"""Full-size published layouts into diffusers' MotionAdapter (strict) and back, tensor for tensor."""
import re

import pytest
import torch
from safetensors.torch import save_file

from adm.motion_modules import LAYOUTS, MotionModule, load_motion_module, read_state_dict, sinusoidal_encoding
from adm.motion_modules.diffusers_format import from_diffusers, is_diffusers_layout, to_diffusers
from adm.motion_modules.formats import published_state_dict
from unets import tiny_motion_config

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import SinusoidalPositionalEmbedding  # noqa: E402

pytestmark = pytest.mark.parity


def published_keys_and_shapes(family: str) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in published_state_dict(MotionModule(LAYOUTS[family])).items()}


def distinct_fp16_views(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """A real-valued state dict of any size in one 64 MiB fp16 pool: each tensor a view at its own offset, so
    no two tensors hold the same numbers (a swapped key would show) while memory stays small. pe buffers get
    the real sinusoid, equal in both attention blocks, as in the published files."""
    pool = torch.randn(32 * 2**20, generator=torch.Generator().manual_seed(0)).half()
    sd = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("pos_encoder.pe"):
            sd[key] = sinusoidal_encoding(shape[1], shape[2]).half()
            continue
        numel = shape.numel()
        offset = (i * 1_000_003) % (pool.numel() - numel)
        sd[key] = pool[offset:offset + numel].view(shape)
    return sd


def meta_tensors(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def adapter_from(state, config):
    with torch.device("meta"):
        adapter = diffusers.MotionAdapter(**config)
    adapter.load_state_dict(state, strict=True, assign=True)  # every key, every shape, nothing left over
    return adapter


# formats.md §1.4: drop temporal_transformer; attention_blocks.0/1 -> attn1/attn2; norms.0/1 -> norm1/norm2;
# ff_norm -> norm3; one pos_embed.pe per transformer block.
SPOT_CHECKS = {
    "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": "down_blocks.0.motion_modules.0.norm.weight",
    "down_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight":
        "down_blocks.1.motion_modules.1.transformer_blocks.0.attn1.to_q.weight",
    "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.bias":
        "up_blocks.3.motion_modules.2.transformer_blocks.0.attn2.to_out.0.bias",
    "up_blocks.0.motion_modules.2.temporal_transformer.transformer_blocks.0.norms.1.weight":
        "up_blocks.0.motion_modules.2.transformer_blocks.0.norm2.weight",
    "down_blocks.2.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.bias":
        "down_blocks.2.motion_modules.0.transformer_blocks.0.norm3.bias",
    "up_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight":
        "up_blocks.1.motion_modules.0.transformer_blocks.0.ff.net.0.proj.weight",
    "mid_block.motion_modules.0.temporal_transformer.proj_out.weight": "mid_block.motion_modules.0.proj_out.weight",
}


def test_full_size_v2_converts_into_motion_adapter_and_back_with_equal_tensors():
    shapes = published_keys_and_shapes("AnimateDiff v2")
    assert len(shapes) == 588 and sum(s.numel() for k, s in shapes.items() if not k.endswith(".pe")) == 453_209_280
    sd = distinct_fp16_views(shapes)
    state, config = to_diffusers(sd)
    assert config == dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                          motion_transformer_layers_per_block=1, motion_mid_block_layers_per_block=1,
                          motion_transformer_layers_per_mid_block=1, motion_num_attention_heads=8,
                          motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
                          conv_in_channels=None)
    for published, renamed in SPOT_CHECKS.items():
        assert state[renamed] is sd[published]
    adapter = adapter_from(state, config)
    assert len(adapter.state_dict()) == 588 - 21  # two tables per module become one
    pe = adapter.state_dict()["up_blocks.2.motion_modules.1.transformer_blocks.0.pos_embed.pe"]
    assert torch.equal(pe, SinusoidalPositionalEmbedding(640, 32).pe.half())  # the same sinusoid as diffusers'

    back = from_diffusers(adapter.state_dict())
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert is_diffusers_layout(adapter.state_dict()) and not is_diffusers_layout(sd)


@pytest.mark.parametrize("family, blocks, mid, keys", [
    ("AnimateDiff v3", (320, 640, 1280, 1280), False, 560),
    ("AnimateDiff SDXL beta", (320, 640, 1280), False, 420),
    ("AnimateDiff v1", (320, 640, 1280, 1280), False, 560),
])
def test_layouts_map_onto_motion_adapter_key_for_key(family, blocks, mid, keys):
    shapes = published_keys_and_shapes(family)
    assert len(shapes) == keys
    state, config = to_diffusers(meta_tensors(shapes))
    assert config["block_out_channels"] == blocks and config["use_motion_mid_block"] is mid
    assert config["motion_max_seq_length"] == LAYOUTS[family].max_frames
    adapter = adapter_from(state, config)
    back = from_diffusers(adapter.state_dict())
    assert {k: v.shape for k, v in back.items()} == shapes


def test_animatelcm_without_tables_gets_the_sinusoid_both_ways():
    shapes = published_keys_and_shapes("AnimateLCM")
    assert not any(k.endswith(".pe") for k in shapes)
    state, config = to_diffusers(meta_tensors(shapes))
    assert config["motion_max_seq_length"] == 64
    table = state["mid_block.motion_modules.0.transformer_blocks.0.pos_embed.pe"]
    assert torch.equal(table, SinusoidalPositionalEmbedding(1280, 64).pe)
    adapter_from(state, config)
    # A MotionAdapter state dict saved without its tables: regenerated on the way back.
    no_tables = {k: v for k, v in state.items() if not k.endswith("pos_embed.pe")}
    back = from_diffusers(no_tables, max_seq_length=32)
    pe = back["down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"]
    assert torch.equal(pe, SinusoidalPositionalEmbedding(640, 32).pe)


def test_tables_that_differ_between_attention_blocks_are_refused():
    with torch.device("meta"):
        module = MotionModule(tiny_motion_config())
    sd = {k: torch.zeros(v.shape) for k, v in published_state_dict(module).items()}
    key = next(k for k in sd if k.endswith("attention_blocks.1.pos_encoder.pe"))
    sd[key] = sd[key] + 1
    with pytest.raises(ValueError, match="different positional tables"):
        to_diffusers(sd)


def test_unknown_motion_key_is_refused():
    with torch.device("meta"):
        sd = dict(published_state_dict(MotionModule(tiny_motion_config())))
    sd["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.bias"] = \
        torch.empty(32, device="meta")
    with pytest.raises(ValueError, match="unknown motion-module key"):
        to_diffusers(sd)


def test_a_saved_motion_adapter_file_loads_as_the_module_it_came_from(tmp_path):
    torch.manual_seed(0)
    module = MotionModule(tiny_motion_config())
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    state, config = to_diffusers(published_state_dict(module))
    adapter = diffusers.MotionAdapter(**config)
    adapter.load_state_dict(state, strict=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, path)

    assert all(re.search(r"\.temporal_transformer\.", k) for k in read_state_dict(path))
    loaded = load_motion_module(path)
    assert loaded.config.family == "AnimateDiff v2" and loaded.config.max_frames == 32
    for key, value in published_state_dict(module).items():
        assert torch.equal(loaded.state_dict()[key], value), key

"""The temporal transformer against a direct, loop-by-loop computation of AnimateDiff's equations."""
import math

import pytest
import torch
import torch.nn.functional as F

from adm.motion_modules import LAYOUTS, MotionModule, VanillaTemporalModule, sinusoidal_encoding
from adm.motion_modules.formats import published_state_dict


def randomize(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module


def reference(module: VanillaTemporalModule, x: torch.Tensor, frames: int) -> torch.Tensor:
    """AnimateDiff's motion module written out plainly: per clip, per pixel, per head."""
    t = module.temporal_transformer
    block = t.transformer_blocks[0]
    bf, c, h, w = x.shape
    out = torch.empty_like(x)
    for clip in range(bf // frames):
        frames_x = x[clip * frames:(clip + 1) * frames]                        # f c h w
        normed = torch.stack([F.group_norm(f[None], 32, t.norm.weight, t.norm.bias, 1e-6)[0] for f in frames_x])
        tokens = normed.permute(0, 2, 3, 1).reshape(frames, h * w, c)          # f (h w) c
        hidden = tokens @ t.proj_in.weight.T + t.proj_in.bias
        for pixel in range(h * w):
            seq = hidden[:, pixel]                                              # f c
            for attn, norm in zip(block.attention_blocks, block.norms):
                n = F.layer_norm(seq, (c,), norm.weight, norm.bias, 1e-5) + attn.pos_encoder.pe[0, :frames].to(seq.dtype)
                q, k, v = n @ attn.to_q.weight.T, n @ attn.to_k.weight.T, n @ attn.to_v.weight.T
                heads, d = attn.heads, c // attn.heads
                merged = torch.cat([torch.softmax(q[:, i * d:(i + 1) * d] @ k[:, i * d:(i + 1) * d].T / math.sqrt(d), -1)
                                    @ v[:, i * d:(i + 1) * d] for i in range(heads)], dim=1)
                seq = seq + merged @ attn.to_out[0].weight.T + attn.to_out[0].bias
            n = F.layer_norm(seq, (c,), block.ff_norm.weight, block.ff_norm.bias, 1e-5)
            value, gate = (n @ block.ff.net[0].proj.weight.T + block.ff.net[0].proj.bias).chunk(2, -1)
            seq = seq + (value * F.gelu(gate)) @ block.ff.net[2].weight.T + block.ff.net[2].bias
            hidden[:, pixel] = seq
        result = hidden @ t.proj_out.weight.T + t.proj_out.bias                  # f (h w) c
        out[clip * frames:(clip + 1) * frames] = frames_x + result.reshape(frames, h, w, c).permute(0, 3, 1, 2)
    return out


@pytest.mark.parametrize("channels, frames, clips", [(32, 8, 1), (64, 5, 2), (64, 16, 3)])
def test_matches_the_direct_computation(channels, frames, clips):
    # float64 on both sides, so any difference is a difference in the math, not rounding.
    module = randomize(VanillaTemporalModule(channels, max_len=24)).double()
    x = torch.randn(clips * frames, channels, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x, frames), reference(module, x, frames), atol=1e-10, rtol=1e-10)


def test_zero_output_projection_is_an_exact_identity():
    module = randomize(VanillaTemporalModule(32))
    torch.nn.init.zeros_(module.temporal_transformer.proj_out.weight)
    torch.nn.init.zeros_(module.temporal_transformer.proj_out.bias)
    x = torch.randn(8, 32, 4, 4)
    assert torch.equal(module(x, 8), x)


def test_norm_across_frames_uses_statistics_of_the_whole_clip():
    module = randomize(VanillaTemporalModule(32))
    x = torch.randn(6, 32, 4, 4)
    x[3:] *= 10  # frames with very different statistics: per-frame and per-clip norms disagree
    assert not torch.allclose(module(x, 6, norm_across_frames=True), module(x, 6), atol=1e-3)
    # Across frames == the 5-D GroupNorm of (b c f h w).
    t = module.temporal_transformer
    five_d = F.group_norm(x.permute(1, 0, 2, 3)[None], 32, t.norm.weight, t.norm.bias, 1e-6)[0].permute(1, 0, 2, 3)
    seen = {}
    t.proj_in.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    module(x, 6, norm_across_frames=True)
    torch.testing.assert_close(seen["in"], five_d.permute(2, 3, 0, 1).reshape(16, 6, 32))


def test_scale_scales_the_motion_residual():
    module = randomize(VanillaTemporalModule(32))
    x = torch.randn(4, 32, 2, 2)
    full, half = module(x, 4), module(x, 4, scale=0.5)
    torch.testing.assert_close(half - x, 0.5 * (full - x))


def test_positional_encoding_is_the_published_sinusoid():
    pe = sinusoidal_encoding(32, 320)
    assert pe.shape == (1, 32, 320)
    assert pe[0, 5, 6].item() == pytest.approx(math.sin(5 / 10000 ** (6 / 320)), abs=1e-6)
    assert pe[0, 5, 7].item() == pytest.approx(math.cos(5 / 10000 ** (6 / 320)), abs=1e-6)


@pytest.mark.parametrize("family, tensors, numel", [
    ("AnimateDiff v1", 560, 417_982_400), ("AnimateDiff v2", 588, 454_417_600),
    ("AnimateDiff v3", 560, 418_264_000), ("AnimateDiff SDXL beta", 420, 237_496_000),
    ("AnimateLCM", 546, 453_209_280),
])
def test_published_layouts_have_the_published_sizes(family, tensors, numel):
    with torch.device("meta"):
        sd = published_state_dict(MotionModule(LAYOUTS[family]))
    assert len(sd) == tensors
    assert sum(v.numel() for v in sd.values()) == numel


def test_encoding_beyond_the_table_is_the_table_stretched():
    from adm.motion_modules.temporal_transformer import PositionalEncoding
    encoder = PositionalEncoding(8, 4)
    assert torch.equal(encoder.encoding(3), encoder.pe[:, :3])
    stretched = encoder.encoding(7)  # 4 positions over 7 frames: every other frame is a table entry
    assert stretched.shape == (1, 7, 8)
    torch.testing.assert_close(stretched[:, ::2], encoder.pe)
    torch.testing.assert_close(stretched[:, 1], (encoder.pe[:, 0] + encoder.pe[:, 1]) / 2)

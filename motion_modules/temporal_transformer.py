"""The temporal transformer of AnimateDiff (Guo et al., 2023, "AnimateDiff: Animate Your Personalized
Text-to-Image Diffusion Models without Specific Tuning", arXiv:2307.04725).

One motion module attends across the frames of a clip at every pixel position. Class and attribute names
follow the keys of the published checkpoints (``temporal_transformer.transformer_blocks.0.attention_blocks.1.
to_q.weight`` ...), so the files load with ``load_state_dict`` as they are.

Layout: the host UNet hands us ``(b f) c h w``. Everything in the block except the input GroupNorm and the
attention itself works per token, so the whole block runs in one layout, ``(b h w) f c``: one permute in,
one out, and attention reads its frame axis without further copies.

Speed (issue 7; BENCHMARKS.md): q, k and v come from one matmul, handed to attention as views; residuals and
the encoding are added in place into fresh outputs (which autograd allows: no layer here keeps its output for
backward); the permute out is the final residual add itself; on the CPU the matmuls run as 1x1 convolutions
(see ``matmul``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (q, k, v, heads) -> out; q, k, v and out are [batch, tokens, heads * head_dim]. The host passes its own
# optimized attention (same signature); standalone code uses torch SDPA.
AttentionFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    b, n, inner = q.shape
    q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))  # b heads n d
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


def matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``. On the CPU in float32, the same product as a 1x1 convolution over the rows
    laid out as a channels-last image: PyTorch runs float32 matmuls there on MKL's GEMM but convolutions on
    oneDNN, like the UNet's own, and oneDNN was 1.5-2.4x faster at these shapes (BENCHMARKS.md). The sums run
    in another order, so results differ from ``F.linear`` by float32 rounding (a few ulp)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return F.linear(x, weight, bias)
    *lead, k = x.shape
    rows = x.reshape(1, -1, 1, k).permute(0, 3, 1, 2)  # 1 k rows 1, channels-last: no copy
    out = F.conv2d(rows, weight.reshape(*weight.shape, 1, 1), bias)
    return out.permute(0, 2, 3, 1).reshape(*lead, weight.shape[0])


def plain(layer: nn.Module) -> bool:
    """Whether ``layer(x)`` is just its own weight and bias: no ComfyUI cast (lowvram offload, manual cast) or
    weight patch function applied at call time, and no module hooks. Others are called as they are."""
    return not (getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                or getattr(layer, "bias_function", None) or layer._forward_hooks or layer._forward_pre_hooks)


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    return matmul(x, layer.weight, layer.bias) if plain(layer) else layer(x)


def sinusoidal_encoding(length: int, channels: int) -> Tensor:
    """pe[0, p, 2i] = sin(p / 10000^(2i/C)), pe[0, p, 2i+1] = cos(...): the fixed table the files store."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * (-math.log(10000.0) / channels))
    pe = torch.zeros(1, length, channels)
    pe[0, :, 0::2] = torch.sin(position * frequency)
    pe[0, :, 1::2] = torch.cos(position * frequency)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, channels: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_encoding(max_len, channels))

    def encoding(self, frames: int) -> Tensor:
        """The first ``frames`` positions; past the table's end, the whole table stretched to ``frames``
        (linear interpolation), so longer clips keep the trained range of positions."""
        if frames <= self.pe.shape[1]:
            return self.pe[:, :frames]
        return F.interpolate(self.pe.transpose(1, 2), size=frames, mode="linear", align_corners=True).transpose(1, 2)


class VersatileAttention(nn.Module):
    """Self-attention over frames; ``pe`` is added to the attention input only, not to the residual."""

    def __init__(self, channels: int, heads: int, max_len: int, ops=nn):
        super().__init__()
        self.heads = heads
        self.to_q = ops.Linear(channels, channels, bias=False)
        self.to_k = ops.Linear(channels, channels, bias=False)
        self.to_v = ops.Linear(channels, channels, bias=False)
        self.to_out = nn.ModuleList([ops.Linear(channels, channels), nn.Dropout(0.0)])
        self.pos_encoder = PositionalEncoding(channels, max_len)

    def forward(self, x: Tensor, attention: AttentionFn) -> Tensor:
        # x: (b h w) f c, a fresh tensor (the norm's output) that this adds the encoding to in place
        x = x.add_(self.pos_encoder.encoding(x.shape[1]).to(x.dtype))
        return linear(self.to_out[0], attention(*self.qkv(x), self.heads))

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v from one matmul on the stacked weights, stacked afresh each call (so patched or trained
        weights are always current, and no second copy stays in memory); layers that are not plain are called
        one by one."""
        layers = (self.to_q, self.to_k, self.to_v)
        if not all(plain(layer) and layer.bias is None for layer in layers):
            return tuple(layer(x) for layer in layers)
        return matmul(x, torch.cat([layer.weight for layer in layers])).chunk(3, dim=-1)


class GEGLU(nn.Module):
    def __init__(self, channels: int, hidden: int, ops=nn):
        super().__init__()
        self.proj = ops.Linear(channels, hidden * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = linear(self.proj, x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)


class FeedForward(nn.Module):
    def __init__(self, channels: int, ops=nn):
        super().__init__()
        # Index 1 is a dropout in the original, hence the keys ff.net.0.proj and ff.net.2.
        self.net = nn.ModuleList([GEGLU(channels, 4 * channels, ops), nn.Dropout(0.0), ops.Linear(4 * channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.net[2], self.net[0](x))


class TemporalTransformerBlock(nn.Module):
    def __init__(self, channels: int, heads: int, max_len: int, ops=nn):
        super().__init__()
        self.attention_blocks = nn.ModuleList([VersatileAttention(channels, heads, max_len, ops) for _ in range(2)])
        self.norms = nn.ModuleList([ops.LayerNorm(channels) for _ in range(2)])
        self.ff = FeedForward(channels, ops)
        self.ff_norm = ops.LayerNorm(channels)

    def forward(self, x: Tensor, attention: AttentionFn) -> Tensor:
        # x: (b h w) f c
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x), attention).add_(x)
        return self.ff(self.ff_norm(x)).add_(x)


class TemporalTransformer3DModel(nn.Module):
    def __init__(self, channels: int, heads: int, max_len: int, ops=nn):
        super().__init__()
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = ops.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads, max_len, ops)])
        self.proj_out = ops.Linear(channels, channels)

    def forward(self, x: Tensor, frames: int, attention: AttentionFn, norm_across_frames: bool) -> Tensor:
        """x: (b f) c h w -> the motion residual as a ``b f c (h w)`` view of the tokens, not copied: the
        caller's residual add does the permute back (one pass instead of a copy and an add)."""
        bf, c, h, w = x.shape
        b = bf // frames
        if norm_across_frames:
            # b c f (h w): statistics over all frames of a clip (SDXL beta reference, diffusers).
            hidden = self.norm(x.view(b, frames, c, h * w).transpose(1, 2)).transpose(1, 2)
        else:
            hidden = self.norm(x)  # per frame, as the original SD1.5 code
        # (b f) c h w -> (b h w) f c
        hidden = hidden.reshape(b, frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, frames, c)
        hidden = linear(self.proj_in, hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, attention)
        # (b h w) f c -> b f c (h w)
        return linear(self.proj_out, hidden).view(b, h * w, frames, c).permute(0, 2, 3, 1)


class VanillaTemporalModule(nn.Module):
    """One motion module: ``x + scale * temporal_transformer(x)`` on a batch of ``frames``-long clips."""

    def __init__(self, channels: int, heads: int = 8, max_len: int = 32, ops=nn):
        super().__init__()
        self.temporal_transformer = TemporalTransformer3DModel(channels, heads, max_len, ops)

    @property
    def channels(self) -> int:
        return self.temporal_transformer.proj_in.in_features

    def forward(self, x: Tensor, frames: int, attention: AttentionFn = sdpa_attention,
                norm_across_frames: bool = False, scale: float | Tensor = 1.0) -> Tensor:
        """``scale``: a float, or a tensor broadcastable to x (e.g. [(b f), 1, 1, 1], one value per frame)."""
        if x.shape[0] % frames:
            raise ValueError(f"batch of {x.shape[0]} is not a whole number of {frames}-frame clips")
        residual = self.temporal_transformer(x, frames, attention, norm_across_frames)  # b f c (h w)
        if isinstance(scale, Tensor):  # in x's layout: a view for the usual [(b f), 1, 1, 1] or a scalar
            residual = residual.mul_(scale.expand(x.shape).reshape(residual.shape))
            scale = 1.0
        return torch.add(x.reshape(residual.shape), residual, alpha=scale).reshape(x.shape)

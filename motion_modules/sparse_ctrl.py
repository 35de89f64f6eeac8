"""SparseCtrl (Guo et al., 2023, "SparseCtrl: Adding Sparse Controls to Text-to-Video Diffusion Models",
arXiv:2311.16933): a ControlNet for AnimateDiff v3 that is given a condition on a few frames only.

It is the down half of an SD1.5 UNet (conv_in, time embedding, four down blocks, the mid block) whose down blocks
also hold motion modules with a single temporal self-attention, plus a condition embedding and 1x1 "zero convs"
that turn each block output into a residual for the image UNet. Two published files (formats.md §2.7):

- ``v3_sd15_sparsectrl_rgb.ckpt``: the condition is an image's latent (VAE-encoded, scaled), embedded by one
  3x3 conv (``controlnet_cond_embedding.weight [320, 5, 3, 3]``);
- ``v3_sd15_sparsectrl_scribble.ckpt``: the condition is line art in pixels, embedded by a conv stack that
  downsamples 8x (``controlnet_cond_embedding.conv_in/blocks.0-5/conv_out``).

Either way one more channel, the condition mask (1 on conditioned frames, 0 elsewhere), is concatenated to the
condition. Both files were run with ``set_noisy_sample_input_to_zero`` (AnimateDiff configs/inference/sparsectrl/
*.yaml): the noisy latent is replaced by zeros, so the output depends only on the condition, the timestep and the
prompt. Attribute names follow the published keys, so the files load with ``load_state_dict`` as they are.

Pure torch; ``ops`` lets the host pass its own layer classes (dtype casts, offloading), ``attention`` /
``temporal_attention`` its attention functions.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import MotionModuleError, _load_pickle, _unwrap, assign, check_finite, read_state_dict
from .temporal_transformer import AttentionFn, FeedForward, VanillaTemporalModule, sdpa_attention

RGB, SCRIBBLE = "rgb", "scribble"


class SparseCtrlError(MotionModuleError):
    """A file that is not a SparseCtrl model this version can use; the message names the file and the fix."""


@dataclass(frozen=True)
class SparseCtrlConfig:
    kind: str                                   # RGB (latent condition) or SCRIBBLE (pixel condition)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)   # width of each down block
    attention: tuple[bool, ...] = (True, True, True, False)  # which down blocks have spatial transformers
    layers: int = 2                             # ResNets per down block
    in_channels: int = 4                        # latent channels (conv_in)
    condition_channels: int = 4                 # without the mask: 4 (rgb latent) or 3 (scribble RGB)
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)  # scribble's conv stack
    context_dim: int = 768                      # text embedding width (SD1.5)
    heads: int = 8                              # spatial and temporal attention heads (SD1.5: 8 everywhere)
    max_frames: int = 32                        # length of the motion modules' positional encoding
    name: str = "SparseCtrl"

    @property
    def time_dim(self) -> int:
        return 4 * self.channels[0]


# --- building blocks (diffusers-style names, as the files store them) ---

def timestep_embedding(timesteps: Tensor, dim: int) -> Tensor:
    """[N] -> [N, dim]: cos then sin of t * 10000^(-i/(dim/2)) (flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, channels: int, time_dim: int, ops=nn):
        super().__init__()
        self.linear_1 = ops.Linear(channels, time_dim)
        self.linear_2 = ops.Linear(time_dim, time_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, ops=nn):
        super().__init__()
        self.norm1 = ops.GroupNorm(32, cin, eps=1e-5)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = ops.Linear(time_dim, cout)
        self.norm2 = ops.GroupNorm(32, cout, eps=1e-5)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = ops.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # GroupNorm per frame: AnimateDiff's "inflated" GroupNorm works on (b f) c h w, as here.
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int, ops=nn):
        super().__init__()
        self.heads = heads
        self.to_q = ops.Linear(channels, channels, bias=False)
        self.to_k = ops.Linear(context_dim, channels, bias=False)
        self.to_v = ops.Linear(context_dim, channels, bias=False)
        self.to_out = nn.ModuleList([ops.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Tensor, attention: AttentionFn) -> Tensor:
        return self.to_out[0](attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class BasicTransformerBlock(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int, ops=nn):
        super().__init__()
        self.norm1 = ops.LayerNorm(channels)
        self.attn1 = Attention(channels, channels, heads, ops)
        self.norm2 = ops.LayerNorm(channels)
        self.attn2 = Attention(channels, context_dim, heads, ops)
        self.norm3 = ops.LayerNorm(channels)
        self.ff = FeedForward(channels, ops)

    def forward(self, x: Tensor, context: Tensor, attention: AttentionFn) -> Tensor:
        n = self.norm1(x)
        x = x + self.attn1(n, n, attention)
        x = x + self.attn2(self.norm2(x), context, attention)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """The spatial transformer of SD1.5 (1x1-conv projections, one block, GroupNorm eps 1e-6)."""

    def __init__(self, channels: int, context_dim: int, heads: int, ops=nn):
        super().__init__()
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = ops.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim, heads, ops)])
        self.proj_out = ops.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor, attention: AttentionFn) -> Tensor:
        b, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # b (h w) c
        for block in self.transformer_blocks:
            hidden = block(hidden, context, attention)
        return self.proj_out(hidden.transpose(1, 2).reshape(b, c, h, w)) + x


def single_attention_motion_module(channels: int, heads: int, max_len: int, ops=nn) -> VanillaTemporalModule:
    """SparseCtrl's motion module: ours with only ``attention_blocks.0`` / ``norms.0`` (``attention_block_types:
    ["Temporal_Self"]``). The block's forward loops over whatever attention blocks it holds, so the math is the
    published one with one self-attention, then the feed-forward."""
    module = VanillaTemporalModule(channels, heads, max_len, ops)
    block = module.temporal_transformer.transformer_blocks[0]
    del block.attention_blocks[1]
    del block.norms[1]
    return module


class Downsample(nn.Module):
    def __init__(self, channels: int, ops=nn):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, config: SparseCtrlConfig, attention: bool, downsample: bool, ops=nn):
        super().__init__()
        c = config
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, c.time_dim, ops) for i in range(c.layers))
        if attention:
            self.attentions = nn.ModuleList(Transformer2D(cout, c.context_dim, c.heads, ops) for _ in range(c.layers))
        self.motion_modules = nn.ModuleList(
            single_attention_motion_module(cout, c.heads, c.max_frames, ops) for _ in range(c.layers))
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(cout, ops)])


class MidBlock(nn.Module):
    """ResNet, spatial transformer, ResNet; no motion module (``motion_module_mid_block: false``)."""

    def __init__(self, channels: int, config: SparseCtrlConfig, ops=nn):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, config.time_dim, ops) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2D(channels, config.context_dim, config.heads, ops)])


class ScribbleEmbedding(nn.Module):
    """Pixels -> the first block's width at 1/8 the size: conv, then (conv, strided conv) per stage, SiLU after
    each but the last conv."""

    def __init__(self, cin: int, widths: tuple[int, ...], cout: int, ops=nn):
        super().__init__()
        self.conv_in = ops.Conv2d(cin, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(ops.Conv2d(a, a, 3, padding=1))
            self.blocks.append(ops.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = ops.Conv2d(widths[-1], cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class SparseCtrlModel(nn.Module):
    def __init__(self, config: SparseCtrlConfig, ops=nn):
        super().__init__()
        c = config
        self.config = c
        first = c.channels[0]
        self.conv_in = ops.Conv2d(c.in_channels, first, 3, padding=1)
        self.time_embedding = TimestepEmbedding(first, c.time_dim, ops)
        if c.kind == RGB:
            self.controlnet_cond_embedding = ops.Conv2d(c.condition_channels + 1, first, 3, padding=1)
        else:
            self.controlnet_cond_embedding = ScribbleEmbedding(c.condition_channels + 1, c.embedding_channels, first, ops)
        self.down_blocks = nn.ModuleList()
        zero_convs = [first]
        for i, cout in enumerate(c.channels):
            last = i == len(c.channels) - 1
            cin = c.channels[i - 1] if i else first
            self.down_blocks.append(DownBlock(cin, cout, c, c.attention[i], not last, ops))
            zero_convs += [cout] * (c.layers + (0 if last else 1))
        self.controlnet_down_blocks = nn.ModuleList(ops.Conv2d(w, w, 1) for w in zero_convs)
        self.mid_block = MidBlock(c.channels[-1], c, ops)
        self.controlnet_mid_block = ops.Conv2d(c.channels[-1], c.channels[-1], 1)

    def forward(self, hint: Tensor, timesteps: Tensor, context: Tensor, frames: int,
                attention: AttentionFn = sdpa_attention, temporal_attention: AttentionFn = sdpa_attention,
                norm_across_frames: bool = False) -> tuple[list[Tensor], Tensor]:
        """hint: (b f) (condition_channels + 1) h w, the mask last, at the latent size (rgb) or 8x it (scribble);
        timesteps: (b f) or one; context: (b f) tokens context_dim. Returns the residuals for the image UNet's
        input blocks (in order, 3 * blocks) and its middle block, unscaled.

        ``norm_across_frames``: the motion modules' input GroupNorm over all frames (diffusers) instead of per frame
        (the original code); for the parity test."""
        c = self.config
        if hint.dim() != 4 or hint.shape[1] != c.condition_channels + 1:
            raise ValueError(f"{c.name}: the condition must be [(batch frames), {c.condition_channels + 1}, h, w] "
                             f"(condition and mask), got {list(hint.shape)}.")
        if hint.shape[0] % frames:
            raise ValueError(f"{c.name}: a batch of {hint.shape[0]} is not a whole number of {frames}-frame clips.")
        n = hint.shape[0]
        timesteps = timesteps.reshape(-1)
        if timesteps.numel() not in (1, n):
            raise ValueError(f"{c.name}: {timesteps.numel()} timesteps for a batch of {n}.")
        emb = self.time_embedding(timestep_embedding(timesteps.expand(n), c.channels[0]).to(hint.dtype))
        cond = self.controlnet_cond_embedding(hint)
        # set_noisy_sample_input_to_zero: conv_in sees zeros, whatever the sampler's latent; on a zero image a
        # padded conv gives its bias everywhere, so one pixel of zeros is enough
        zeros = torch.zeros(n, c.in_channels, 1, 1, dtype=hint.dtype, device=hint.device)
        h = self.conv_in(zeros) + cond
        outputs = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, emb)
                if hasattr(block, "attentions"):
                    h = block.attentions[i](h, context, attention)
                h = block.motion_modules[i](h, frames, temporal_attention, norm_across_frames)
                outputs.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                outputs.append(h)
        mid = self.mid_block
        h = mid.resnets[1](mid.attentions[0](mid.resnets[0](h, emb), context, attention), emb)
        residuals = [zero(o) for zero, o in zip(self.controlnet_down_blocks, outputs)]
        return residuals, self.controlnet_mid_block(h)


# --- files ---

_RESNET = re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight$")
_SCRIBBLE_STAGE = re.compile(r"^controlnet_cond_embedding\.blocks\.(\d+)\.weight$")


def read_sparse_ctrl(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a SparseCtrl file. Besides the wrappings every loader here takes, AnimateDiff's own loader
    unwraps a top-level ``"controlnet"`` entry beside a non-tensor ``"animatediff_config"`` (formats.md §1.4,
    §2.7); the shared reader keeps only top-level tensors, so such a pickle is opened again to take that entry."""
    path = Path(path)
    sd = read_state_dict(path)
    if not sd and path.suffix.lower() != ".safetensors":
        obj = _load_pickle(path)  # already read once above without error: a weights_only pickle
        if isinstance(obj, dict) and isinstance(obj.get("controlnet"), dict):
            sd = _unwrap(obj["controlnet"], path.name)
    return sd


def detect(sd: dict[str, Tensor], name: str) -> SparseCtrlConfig:
    """Kind (rgb / scribble) and widths from the keys, or SparseCtrlError saying what the file is."""
    if "controlnet_cond_embedding.weight" in sd:
        kind, cond = RGB, sd["controlnet_cond_embedding.weight"]
    elif "controlnet_cond_embedding.conv_in.weight" in sd:
        kind, cond = SCRIBBLE, sd["controlnet_cond_embedding.conv_in.weight"]
    elif any(k.startswith(("input_hint_block.", "zero_convs.", "control_model.")) for k in sd) or \
            "controlnet_mid_block.weight" in sd:
        raise SparseCtrlError(f"{name}: this is a ControlNet, but not SparseCtrl (no SparseCtrl condition "
                              "embedding). Load it with the stock Load ControlNet Model node.")
    else:
        raise SparseCtrlError(f"{name}: not a SparseCtrl model (no 'controlnet_cond_embedding' keys; first keys: "
                              f"{', '.join(list(sd)[:3]) or 'no tensors at all'}). SparseCtrl files are "
                              "v3_sd15_sparsectrl_rgb.ckpt and v3_sd15_sparsectrl_scribble.ckpt.")
    if not any(".motion_modules." in k for k in sd):
        raise SparseCtrlError(f"{name}: a ControlNet without motion modules, not SparseCtrl. Load it with the stock "
                              "Load ControlNet Model node.")
    if any(".attention_blocks.1." in k for k in sd):
        raise SparseCtrlError(f"{name}: its motion modules have two attention blocks, SparseCtrl's have one; the "
                              "file is a motion module or an unknown variant. Motion modules go in "
                              "models/animatediff_models.")
    resnets: dict[int, set[int]] = {}
    for key in sd:
        m = _RESNET.match(key)
        if m:
            resnets.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    blocks = sorted(resnets)
    if not blocks or blocks != list(range(len(blocks))) or any(resnets[i] != resnets[0] for i in blocks):
        raise SparseCtrlError(f"{name}: its down blocks {blocks} are not numbered 0..n with the same number of "
                              "ResNets each; the file is damaged.")

    def shape(key: str, dims: int) -> tuple[int, ...]:
        value = sd.get(key)
        if value is None or value.dim() != dims:
            raise SparseCtrlError(f"{name}: tensor '{key}' is missing or not {dims}-D; the file is damaged.")
        return tuple(value.shape)

    if cond.dim() != 4 or cond.shape[1] < 2:
        raise SparseCtrlError(f"{name}: condition embedding has shape {list(cond.shape)}; the file is damaged.")
    channels = tuple(shape(f"down_blocks.{i}.resnets.0.conv1.weight", 4)[0] for i in blocks)
    attention = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in blocks)
    context_key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    embedding = ()
    if kind == SCRIBBLE:
        stages = sorted(int(m.group(1)) for k in sd if (m := _SCRIBBLE_STAGE.match(k)))
        embedding = (cond.shape[0], *(shape(f"controlnet_cond_embedding.blocks.{i}.weight", 4)[0]
                                      for i in stages if i % 2))
    pe = next((v for k, v in sd.items() if k.endswith("pos_encoder.pe")), None)
    if pe is not None and (pe.dim() != 3 or pe.shape[1] == 0):
        raise SparseCtrlError(f"{name}: positional encoding of shape {list(pe.shape)}; the file is damaged.")
    if any(c % 32 for c in channels):
        raise SparseCtrlError(f"{name}: block widths {channels} are not multiples of 32 (GroupNorm); the file is damaged.")
    return SparseCtrlConfig(
        kind=kind, channels=channels, attention=attention, layers=len(resnets[0]),
        in_channels=shape("conv_in.weight", 4)[1], condition_channels=cond.shape[1] - 1,
        embedding_channels=embedding or SparseCtrlConfig.embedding_channels,
        context_dim=shape(context_key, 2)[1], max_frames=pe.shape[1] if pe is not None else 32, name=name)


def build(sd: dict[str, Tensor], config: SparseCtrlConfig, ops=nn) -> SparseCtrlModel:
    """The model holding the given tensors (no copy): built on the meta device, then assigned, strictly."""
    check_finite(sd, config.name)
    with torch.device("meta"):
        model = SparseCtrlModel(config, ops)
    return assign(model, sd, config.name, f"SparseCtrl {config.kind}", pe_optional=True, error=SparseCtrlError)


def load_sparse_ctrl(path: str | Path, ops=nn) -> SparseCtrlModel:
    sd = read_sparse_ctrl(path)
    return build(sd, detect(sd, Path(path).name), ops)

"""The diffusers ``MotionAdapter`` layout of a motion module, to and from the published AnimateDiff layout.

Same tensors, other names (formats.md §1.4):

    published (per module ``<block>.motion_modules.<j>.``)        diffusers MotionAdapter
    temporal_transformer.norm / proj_in / proj_out              norm / proj_in / proj_out
    temporal_transformer.transformer_blocks.<t>.                transformer_blocks.<t>.
        attention_blocks.0. / attention_blocks.1.                   attn1. / attn2.
        norms.0. / norms.1. / ff_norm.                              norm1. / norm2. / norm3.
        ff.net.0.proj. / ff.net.2.                                  ff.net.0.proj. / ff.net.2.
        attention_blocks.{0,1}.pos_encoder.pe  (one per attention)  pos_embed.pe  (one per transformer block)

The published files keep one positional table per attention block, diffusers one per transformer block, so
both tables of a block must be equal to convert; going back, the block's table is copied into both. Without
any table (AnimateLCM) the sinusoid is regenerated.

Pure torch: no host imports, no diffusers import (the parity tests check it against the real class).
"""
from __future__ import annotations

import re
from collections import defaultdict

from torch import Tensor

from .temporal_transformer import sinusoidal_encoding

_MODULE = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.motion_modules\.(\d+)\.(.*)$")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")
_SIMPLE = ("norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias")

# Inside one transformer block: published prefix <-> diffusers prefix.
_BLOCK_RENAMES = (
    ("attention_blocks.0.", "attn1."),
    ("attention_blocks.1.", "attn2."),
    ("norms.0.", "norm1."),
    ("norms.1.", "norm2."),
    ("ff_norm.", "norm3."),
    ("ff.", "ff."),
)
_ATTENTION_PARAMS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
_NORM_PARAMS = ("weight", "bias")
_FF_PARAMS = ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias")


def _inner_ok(prefix: str, rest: str) -> bool:
    if prefix.startswith(("attention_blocks", "attn")):
        return rest in _ATTENTION_PARAMS
    if prefix == "ff.":
        return rest in _FF_PARAMS
    return rest in _NORM_PARAMS


def _rename_inner(key: str, to_diffusers: bool) -> str | None:
    """A key inside ``transformer_blocks.<t>.`` renamed, or None when it is not a known parameter."""
    for published, diffusers in _BLOCK_RENAMES:
        src, dst = (published, diffusers) if to_diffusers else (diffusers, published)
        if key.startswith(src) and _inner_ok(src, key[len(src):]):
            return dst + key[len(src):]
    return None


def is_diffusers_layout(sd: dict) -> bool:
    """True for a diffusers MotionAdapter state dict (motion modules without ``temporal_transformer``)."""
    motion = [m.group(3) for m in map(_MODULE.match, sd) if m]
    return bool(motion) and not any(k.startswith("temporal_transformer.") for k in motion) \
        and any(k.startswith("transformer_blocks.") for k in motion)


def _widths(sd: dict, norm_key: str) -> dict[str, dict[int, int]]:
    """{block: {module index: channel width}} read from each module's GroupNorm weight."""
    widths: dict[str, dict[int, int]] = defaultdict(dict)
    for key, value in sd.items():
        m = _MODULE.match(key)
        if m and m.group(3) == norm_key:
            if value.dim() != 1:
                raise ValueError(f"{key} has shape {list(value.shape)}, not [channels]")
            widths[m.group(1)][int(m.group(2))] = int(value.shape[0])
    return widths


def _numbered(widths: dict, kind: str) -> list[dict[int, int]]:
    indices = sorted(int(b.split(".")[1]) for b in widths if b.startswith(kind + "."))
    if indices != list(range(len(indices))):
        raise ValueError(f"{kind} {indices} are not numbered 0..n")
    blocks = [widths[f"{kind}.{i}"] for i in indices]
    for i, block in enumerate(blocks):
        if sorted(block) != list(range(len(block))):
            raise ValueError(f"{kind}.{i} has motion modules {sorted(block)}, not 0..n")
        if len(set(block.values())) != 1:
            raise ValueError(f"{kind}.{i} mixes channel widths {sorted(set(block.values()))}")
    return blocks


def _renamed_to_diffusers(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, set[int]]]:
    """(renamed tensors without tables, {diffusers pos_embed key: table}, {module prefix: its block indices})."""
    out: dict[str, Tensor] = {}
    tables: dict[str, Tensor] = {}
    blocks_per_module: dict[str, set[int]] = defaultdict(set)
    for key, value in sd.items():
        m = _MODULE.match(key)
        if not m:
            continue
        prefix = f"{m.group(1)}.motion_modules.{m.group(2)}."
        rest = m.group(3)
        if not rest.startswith("temporal_transformer."):
            raise ValueError(f"{key}: not in the published AnimateDiff layout (no 'temporal_transformer.')")
        rest = rest[len("temporal_transformer."):]
        if rest in _SIMPLE:
            out[prefix + rest] = value
            continue
        b = _BLOCK.match(rest)
        if not b:
            raise ValueError(f"{key}: unknown motion-module key")
        block, inner = f"transformer_blocks.{b.group(1)}.", b.group(2)
        blocks_per_module[prefix].add(int(b.group(1)))
        if re.fullmatch(r"attention_blocks\.\d+\.pos_encoder\.pe", inner):
            target = prefix + block + "pos_embed.pe"
            if target in tables and not _same(tables[target], value):
                raise ValueError(f"{key}: the attention blocks of {prefix + block} hold different positional "
                                 "tables; diffusers keeps one per transformer block, so this file cannot be converted")
            tables[target] = value
            continue
        renamed = _rename_inner(inner, to_diffusers=True)
        if renamed is None:
            raise ValueError(f"{key}: unknown motion-module key")
        out[prefix + block + renamed] = value
    return out, tables, blocks_per_module


def _place_tables(out: dict, tables: dict, blocks_per_module: dict, length: int) -> None:
    for prefix, blocks in blocks_per_module.items():
        for t in blocks:
            key = f"{prefix}transformer_blocks.{t}.pos_embed.pe"
            if key in tables:
                out[key] = tables[key]
            else:  # AnimateLCM-like: the files carry no table
                norm = out[prefix + "norm.weight"]
                out[key] = sinusoidal_encoding(length, norm.shape[0]).to(norm.dtype)


def module_to_diffusers(sd: dict[str, Tensor], max_seq_length: int = 32) -> dict[str, Tensor]:
    """One module's keys (``temporal_transformer.*``: a VanillaTemporalModule state dict) -> the keys of one
    diffusers ``AnimateDiffTransformer3D``."""
    prefix = "down_blocks.0.motion_modules.0."
    out, tables, blocks = _renamed_to_diffusers({prefix + k: v for k, v in sd.items()})
    _place_tables(out, tables, blocks, max_seq_length)
    return {k[len(prefix):]: v for k, v in out.items()}


def to_diffusers(sd: dict[str, Tensor], heads: int = 8, max_seq_length: int | None = None
                 ) -> tuple[dict[str, Tensor], dict]:
    """Published AnimateDiff keys -> (diffusers MotionAdapter state dict, MotionAdapter constructor kwargs).

    Keys outside the motion modules (e.g. a HotshotXL marker) are ignored; an unknown key inside a module is
    an error. ``heads`` is not stored in the files (8 in every published family). ``max_seq_length`` is the
    positional-table length, read from the tables when the file has them (64, AnimateLCM's, otherwise).
    """
    out, tables, blocks_per_module = _renamed_to_diffusers(sd)
    widths = _widths(sd, "temporal_transformer.norm.weight")
    down, up = _numbered(widths, "down_blocks"), _numbered(widths, "up_blocks")
    mid = widths.get("mid_block", {})
    if not down or len(down) != len(up):
        raise ValueError(f"{len(down)} down and {len(up)} up blocks: not a motion module diffusers can hold")
    channels = [next(iter(b.values())) for b in down]
    if [next(iter(b.values())) for b in reversed(up)] != channels:
        raise ValueError("up-block widths do not mirror the down-block widths")
    layers = [len(b) for b in down]
    if [len(b) for b in reversed(up)] != [n + 1 for n in layers]:
        raise ValueError("diffusers needs one more motion module per up block than per down block")
    if mid and set(mid.values()) != {channels[-1]}:
        raise ValueError("the mid-block motion module is not as wide as the last down block")
    depths = {len(v) for v in blocks_per_module.values()}
    if len(depths) != 1:
        raise ValueError(f"motion modules have different numbers of transformer blocks {sorted(depths)}")

    if any(t.dim() != 3 for t in tables.values()):
        raise ValueError("a positional table is not [1, frames, channels]")
    lengths = {int(t.shape[1]) for t in tables.values()}
    if len(lengths) > 1:
        raise ValueError(f"positional tables of different lengths {sorted(lengths)}")
    length = lengths.pop() if lengths else (max_seq_length or 64)
    _place_tables(out, tables, blocks_per_module, length)

    depth = depths.pop()
    config = dict(
        block_out_channels=tuple(channels),
        motion_layers_per_block=layers[0] if len(set(layers)) == 1 else tuple(layers),
        motion_transformer_layers_per_block=depth,
        motion_mid_block_layers_per_block=len(mid) or 1,
        motion_transformer_layers_per_mid_block=depth,
        motion_num_attention_heads=heads,
        motion_norm_num_groups=32,
        motion_max_seq_length=length,
        use_motion_mid_block=bool(mid),
        conv_in_channels=None,
    )
    return out, config


def from_diffusers(sd: dict[str, Tensor], max_seq_length: int = 32) -> dict[str, Tensor]:
    """diffusers MotionAdapter keys -> the published AnimateDiff layout.

    Each transformer block's ``pos_embed.pe`` becomes the ``pos_encoder.pe`` of both its attention blocks (a
    copy each, so the result can be saved as safetensors); a block without one gets the sinusoid of
    ``max_seq_length`` positions. Keys outside the motion modules (e.g. PIA's ``conv_in``) pass through.
    """
    out: dict[str, Tensor] = {}
    attentions: dict[str, dict[int, int]] = defaultdict(dict)  # block prefix -> {attention index: width}
    tables: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _MODULE.match(key)
        if not m:
            out[key] = value
            continue
        prefix = f"{m.group(1)}.motion_modules.{m.group(2)}.temporal_transformer."
        rest = m.group(3)
        if rest in _SIMPLE:
            out[prefix + rest] = value
            continue
        b = _BLOCK.match(rest)
        if not b:
            raise ValueError(f"{key}: unknown MotionAdapter key")
        block = f"{prefix}transformer_blocks.{b.group(1)}."
        if b.group(2) == "pos_embed.pe":
            tables[block] = value
            continue
        renamed = _rename_inner(b.group(2), to_diffusers=False)
        if renamed is None:
            raise ValueError(f"{key}: unknown MotionAdapter key")
        out[block + renamed] = value
        q = re.fullmatch(r"attention_blocks\.(\d)\.to_q\.weight", renamed)
        if q:
            if value.dim() != 2:
                raise ValueError(f"{key} has shape {list(value.shape)}, not [out, in]")
            attentions[block][int(q.group(1))] = int(value.shape[0])
    for block, widths in attentions.items():
        table = tables.get(block)
        for a, width in sorted(widths.items()):
            if table is None:
                dtype = out[f"{block}attention_blocks.{a}.to_q.weight"].dtype
                pe = sinusoidal_encoding(max_seq_length, width).to(dtype)
            else:
                pe = table
            out[f"{block}attention_blocks.{a}.pos_encoder.pe"] = pe.clone()
    return out


def _same(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:
        return True  # shapes only
    return bool((a == b).all())

"""Motion LoRA: low-rank adapters on the temporal self-attention projections of a motion module.

AnimateDiff's MotionLoRA (Guo et al., 2023, §4.3) adapts only the q/k/v/out projections of the temporal
attention, with the base motion module frozen; MotionDirector (Zhao et al., 2023, arXiv:2310.08465) trains
the same kind of adapters on a handful of videos (rank 32 in its configs). An adapter is
``(W + scale * up @ down) x`` with ``up`` zero-initialised, so training starts exactly at the base module, and
the adapted weight is exactly what loaders build from the saved file.

Files use the published motion-LoRA layout (formats.md §3.1), one pair per projection::

    <block>.motion_modules.<j>.temporal_transformer.transformer_blocks.0.attention_blocks.<a>.processor.
        {to_q,to_k,to_v,to_out}_lora.{down,up}.weight          down [r, C], up [C, r]

and are applied by every loader as ``W <- W + strength * up @ down`` with no rank or alpha normalisation,
so the training scale is folded into ``up`` when saving.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..motion_modules import MotionModule
from ..motion_modules.motion_lora import check_fits, lora_pairs, target_key

# Projection module (relative to an attention block) -> its name in the published keys.
TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
ATTENTION = re.compile(r"\.transformer_blocks\.\d+\.attention_blocks\.\d+$")


class LoRAAdapter(nn.Module):
    """``weight -> weight + scale * up @ down``: a parametrization of the adapted projection's weight."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(in_features, rank, bias=False)   # weight [r, in]
        self.up = nn.Linear(rank, out_features, bias=False)    # weight [out, r]
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.up.weight @ self.down.weight).mul(self.scale).to(weight.dtype)


class MotionLoRA(nn.Module):
    """One adapter per temporal attention projection of ``motion_module``.

    The motion module is not changed: :meth:`attached` makes each adapted projection's ``weight`` the sum
    ``W + scale * up @ down`` (a torch parametrization, so every way the module reads its weights sees it, the
    fused q/k/v matmul included) and restores the plain weight on exit. Parameters are only the adapters'.

    Args:
        motion_module: the base module; its keys give the adapters' names.
        rank: inner width r of each adapter.
        scale: multiplier on the adapters' output while training; folded into ``up`` by
            :meth:`published_state_dict`.
    """

    def __init__(self, motion_module: MotionModule, rank: int = 32, scale: float = 1.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}.")
        self.rank, self.scale = rank, scale
        self.adapters = nn.ModuleList()
        self.prefixes: list[str] = []     # published key prefix of each adapter
        self._targets: list[nn.Linear] = []  # the projections they adapt (owned by the motion module)
        for attention_name, attention in motion_module.named_modules():
            if not ATTENTION.search(attention_name):
                continue
            for relative, published in TARGETS.items():
                layer = attention.get_submodule(relative)
                self.adapters.append(LoRAAdapter(layer.in_features, layer.out_features, rank, scale))
                self.prefixes.append(f"{attention_name}.processor.{published}_lora")
                self._targets.append(layer)
        if not self.adapters:
            raise ValueError("the motion module has no temporal attention projections to adapt.")

    @contextlib.contextmanager
    def attached(self) -> Iterator["MotionLoRA"]:
        """Within the block, every adapted projection computes with ``W + scale * up @ down``."""
        done = []
        try:
            for layer, adapter in zip(self._targets, self.adapters):
                parametrize.register_parametrization(layer, "weight", adapter)
                done.append(layer)
            yield self
        finally:
            for layer in done:  # gives back the original Parameter object, untouched
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)

    def published_state_dict(self) -> dict[str, Tensor]:
        """The adapters in the published layout, ``scale`` folded into ``up`` (fp32, on the CPU)."""
        sd = {}
        for prefix, adapter in zip(self.prefixes, self.adapters):
            sd[f"{prefix}.down.weight"] = adapter.down.weight.detach().float().cpu().clone()
            sd[f"{prefix}.up.weight"] = (adapter.up.weight.detach().float() * self.scale).cpu()
        return sd

    def load_published(self, sd: dict[str, Tensor], name: str = "motion LoRA") -> None:
        """Continue from a saved LoRA of the same rank (the inverse of :meth:`published_state_dict`). The file is
        checked as the loaders check it (shapes, ranks, NaN/inf) and an ``alpha`` is folded in the same way."""
        pairs = lora_pairs(sd, name)
        adapters = {target_key(f"{p}.down.weight"): a for p, a in zip(self.prefixes, self.adapters)}
        missing, unexpected = sorted(set(adapters) - set(pairs)), sorted(set(pairs) - set(adapters))
        if missing or unexpected:
            raise ValueError(f"{name}: motion LoRA layers do not match this motion module (missing: {missing[:3]}, "
                             f"unexpected: {unexpected[:3]}).")
        with torch.no_grad():
            for key, adapter in adapters.items():
                up, down = pairs[key]
                if down.shape[0] != self.rank:
                    raise ValueError(f"{name}: {key}: rank {down.shape[0]} in the file, {self.rank} requested.")
                if (up.shape[0], down.shape[1]) != (adapter.up.weight.shape[0], adapter.down.weight.shape[1]):
                    raise ValueError(f"{name}: {key}: the LoRA makes {[up.shape[0], down.shape[1]]}, the layer is "
                                     f"{[adapter.up.weight.shape[0], adapter.down.weight.shape[1]]}.")
                adapter.down.weight.copy_(down)
                adapter.up.weight.copy_(up.float() / self.scale)


def merge_motion_lora(module: MotionModule, lora: dict[str, Tensor], strength: float = 1.0) -> int:
    """Add ``strength * up @ down`` (in fp32) to the weights ``lora`` adapts, in place, the way loaders apply a
    published motion LoRA; returns how many weights changed."""
    pairs = lora_pairs(lora, "motion LoRA")
    weights = dict(module.named_parameters())
    check_fits(pairs, weights, "motion LoRA", module.config.family)
    with torch.no_grad():
        for key, (up, down) in pairs.items():
            weight = weights[key]
            weight.copy_((weight.float() + strength * (up.float() @ down.float()).to(weight.device)).to(weight.dtype))
    return len(pairs)

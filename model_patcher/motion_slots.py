"""Several motion modules in one UNet, and per-block control: one ``MotionSlot`` per UNet block that gets motion.

Each module keeps its own family's placement (placement.plan per module); where several modules have a slot in
the same block, the slot runs them side by side on the same input and adds their residuals:
``x + sum_i s_i * residual_i(x)``. Side by side rather than one after the other because each module was trained
on the image UNet's features, never on another module's output; the sum does not depend on the order, and
weights (1, 0) give exactly the first module alone, so a step switch from one module to another is a change of
weights. A slot also carries its name ("input 4"), which per-block scales need.
"""
from __future__ import annotations

import torch
from torch import nn

from ..motion_modules import MotionModuleConfig, VanillaTemporalModule
from . import placement


class MotionSlot(nn.Module):
    """The motion modules at one slot, with the index of the apply's module each comes from."""

    def __init__(self, where: str, members: list[tuple[int, VanillaTemporalModule]]):
        super().__init__()
        self.where = where
        self.indices = tuple(i for i, _ in members)
        self.members = nn.ModuleList(m for _, m in members)  # children while inserted, as single modules are


def inject(unet, modules: list[tuple[MotionModuleConfig, list[VanillaTemporalModule]]]) -> None:
    """Insert one MotionSlot per slot that any module has, in the module's own place (after eject)."""
    eject(unet)
    by_slot: dict[str, tuple[placement.Slot, list]] = {}
    for index, (config, layers) in enumerate(modules):
        for slot, layer in zip(placement.plan(unet, config, config.extra.get("name")), layers):
            by_slot.setdefault(slot.where, (slot, []))[1].append((index, layer))
    # A block has at most one slot, so inserting in any order keeps the other slots' indices valid.
    for where, (slot, members) in by_slot.items():
        slot.block.insert(slot.index + 1, MotionSlot(where, members))


def eject(unet) -> None:
    """Remove every MotionSlot and every single inserted module (by type, not by position)."""
    placement.eject(unet)
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for i in reversed(range(len(block))):
            if isinstance(block[i], MotionSlot):
                del block[i]


def slot_names(unet, configs: list[MotionModuleConfig]) -> list[str]:
    """The slots the modules use, in UNet order (for messages and checks)."""
    names = {s.where: None for c in configs for s in placement.plan(unet, c, c.extra.get("name"))}
    order = [s.where for s in placement.slots(unet.input_blocks, "input") + placement.slots([unet.middle_block], "middle")
             + placement.slots(unet.output_blocks, "output")]
    return [w for w in order if w in names]


def side_by_side(x: torch.Tensor, runs: list[tuple[VanillaTemporalModule, bool, float | torch.Tensor, object]],
                 frames: int, attention) -> torch.Tensor:
    """``x + sum s * module(x)'s residual`` for ``runs`` of (module, norm_across_frames, scale, context); each
    module runs in its own dtype, inside its context (per-frame LoRA hooks, or a null context)."""
    total = None
    for module, norm_across_frames, scale, context in runs:
        dtype = module.temporal_transformer.proj_in.weight.dtype
        with context:
            residual = module.temporal_transformer(x.to(dtype), frames, attention, norm_across_frames)  # b f c (h w)
        residual = residual.to(x.dtype)
        if isinstance(scale, torch.Tensor):  # [(b f), 1, h|1, w|1]: in x's layout, seen as the residual's
            residual = residual * scale.expand(x.shape).reshape(residual.shape)
        else:
            residual = residual * scale
        total = residual if total is None else total.add_(residual)
    return torch.add(x.reshape(total.shape), total).reshape(x.shape)

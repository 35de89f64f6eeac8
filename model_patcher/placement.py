"""Where each temporal module goes in the host's UNet, and putting it there / taking it out again.

The rule (the original architecture, mapped onto ComfyUI's ``openaimodel.UNetModel``): walk input blocks,
the middle block and output blocks in order; a block holding SpatialTransformers gets the next module after
its last one, a block holding only ResBlocks gets it after its first ResBlock, anything else (conv_in, a bare
Downsample) gets none. So the mid-block module lands between its transformer and its second ResBlock, and the
up-block modules land before their Upsample, as in AnimateDiff's UNet3D.
"""
from __future__ import annotations

from dataclasses import dataclass

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
from torch import nn

from ..motion_modules import MotionModuleConfig, VanillaTemporalModule


class MotionCompatibilityError(ValueError):
    """A motion module that does not fit the model it is applied to."""


@dataclass(frozen=True)
class Slot:
    block: nn.Sequential   # a TimestepEmbedSequential of the host UNet
    index: int             # the module goes right after block[index]
    channels: int
    where: str             # "input 4", "middle", "output 11": for messages


def slots(blocks, where: str) -> list[Slot]:
    """Where a temporal module goes in each of ``blocks``: after its last SpatialTransformer, else its ResBlock."""
    found = []
    for n, block in enumerate(blocks):
        layers = [layer for layer in block if not isinstance(layer, VanillaTemporalModule)]
        attention = [i for i, layer in enumerate(layers) if isinstance(layer, SpatialTransformer)]
        resnets = [i for i, layer in enumerate(layers) if isinstance(layer, ResBlock)]
        index = attention[-1] if attention else resnets[0] if resnets else None
        if index is not None:
            layer = layers[index]
            channels = layer.in_channels if attention else layer.out_channels
            found.append(Slot(block, index, channels, f"{where} {n}" if where != "middle" else where))
    return found


def plan(unet, config: MotionModuleConfig, name: str) -> list[Slot]:
    """The slot of every module of ``config`` in ``unet``, in UNet order; refuses a module that does not fit."""
    down = slots(unet.input_blocks, "input")
    middle = slots([unet.middle_block], "middle")[: len(config.mid)]
    up = slots(unet.output_blocks, "output")
    planned = down + middle + up
    wanted = config.channels_in_unet_order
    counts_fit = len(down) == sum(map(len, config.down)) and len(up) == sum(map(len, config.up)) \
        and len(middle) == len(config.mid)
    if not counts_fit or [s.channels for s in planned] != wanted:
        widths = sorted({s.channels for s in down})
        raise MotionCompatibilityError(
            f"Motion module '{name}' ({config.family}) is made for {config.base} models, but this model's UNet has "
            f"{len(down)} down-block slots with widths {widths} (the module needs {sum(map(len, config.down))} with "
            f"widths {sorted(set(c for b in config.down for c in b))}). Use a motion module made for this model's "
            f"base, or a {config.base} checkpoint with this module.")
    return planned


def inject(unet, config: MotionModuleConfig, modules: list[VanillaTemporalModule], name: str) -> None:
    """Insert each module after its slot's layer. Idempotent: anything inserted earlier is taken out first."""
    eject(unet)
    planned = plan(unet, config, name)
    # Insert from the back so earlier indices in the same block stay valid.
    for slot, module in reversed(list(zip(planned, modules))):
        slot.block.insert(slot.index + 1, module)


def eject(unet) -> None:
    """Remove every temporal module from the UNet's blocks (by type, not by position)."""
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for i in reversed(range(len(block))):
            if isinstance(block[i], VanillaTemporalModule):
                del block[i]

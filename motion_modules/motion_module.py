"""A whole motion module file: temporal modules for the down, mid and up blocks of an image UNet."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .image_encoder import ImageEncoder
from .temporal_transformer import VanillaTemporalModule

# Image-to-video families: their files carry, beside the motion modules, weights for the image UNet's input.
PIA = "PIA"                        # conv_in [C0, 9, 3, 3]: latent (4) + mask (1) + image latent (4) channels
ANIMATELCM_I2V = "AnimateLCM-I2V"  # img_encoder.*: features of the start image added in the down blocks
PIA_INPUT_CHANNELS = 9


@dataclass(frozen=True)
class MotionModuleConfig:
    """Shape of a motion module, read from its keys (see formats.detect)."""

    family: str                          # "AnimateDiff v2", "AnimateLCM", ... for messages and defaults
    base: str                            # "SD1.5" or "SDXL": the image UNet it was trained inside
    down: tuple[tuple[int, ...], ...]    # channel width of each module, per down block, in UNet order
    mid: tuple[int, ...]                 # (1280,) for v2 / AnimateLCM, () otherwise
    up: tuple[tuple[int, ...], ...]      # per up block
    max_frames: int                      # length of the positional encoding: the most frames per window
    heads: int = 8
    norm_across_frames: bool = False     # input GroupNorm over all frames (SDXL beta) or per frame (SD1.5)
    pe_in_file: bool = True              # AnimateLCM files carry no encoding; it is regenerated
    extra: dict = field(default_factory=dict, compare=False)  # e.g. the file name

    @property
    def channels_in_unet_order(self) -> list[int]:
        return [c for block in self.down for c in block] + list(self.mid) + [c for block in self.up for c in block]


class MotionBlock(nn.Module):
    def __init__(self, channels: tuple[int, ...], config: MotionModuleConfig, ops=nn):
        super().__init__()
        self.motion_modules = nn.ModuleList(
            VanillaTemporalModule(c, config.heads, config.max_frames, ops) for c in channels)


class MotionModule(nn.Module):
    """Keys: ``down_blocks.<i>.motion_modules.<j>.*``, ``mid_block.motion_modules.0.*``, ``up_blocks.<i>...``;
    PIA adds ``conv_in.*``, AnimateLCM-I2V ``img_encoder.*`` (formats.md §2.4, §2.5)."""

    def __init__(self, config: MotionModuleConfig, ops=nn):
        super().__init__()
        self.config = config
        self.down_blocks = nn.ModuleList(MotionBlock(c, config, ops) for c in config.down)
        if config.mid:
            self.mid_block = MotionBlock(config.mid, config, ops)
        self.up_blocks = nn.ModuleList(MotionBlock(c, config, ops) for c in config.up)
        # Named as in the files, so they load and save with the motion modules; used only by the image-input nodes.
        if config.family == PIA:
            self.conv_in = ops.Conv2d(PIA_INPUT_CHANNELS, config.down[0][0], 3, padding=1)
        if config.family == ANIMATELCM_I2V:
            self.img_encoder = ImageEncoder(tuple(block[0] for block in config.down), ops=ops)

    def in_unet_order(self) -> list[VanillaTemporalModule]:
        """Modules in the order the UNet meets them: down blocks, mid block, up blocks."""
        blocks = [*self.down_blocks, *([self.mid_block] if self.config.mid else []), *self.up_blocks]
        return [m for block in blocks for m in block.motion_modules]

"""AnimateLCM-I2V's image encoder (the ``img_encoder.*`` keys of ``AnimateLCM-I2V.ckpt``).

A small convolutional adapter (G-U-N/AnimateLCM ``Adapter(cin=4, channels=[320, 640, 1280, 1280], nums_rb=2,
ksize=1, sk=True, use_conv=False)``, formats.md §2.4) turns the start image's latent into one feature map per UNet
level; the UNet adds level l's map to the input of the second motion module of down block l.

- ``conv_in``: 3x3, latent channels -> C0; then a sinusoid over the frames (width C0, the motion modules' table)
  times ``drift`` is added: the only thing that makes one frame's features differ from another's.
- ``body``: two residual units per level (index = 2 * level + unit). The first unit of levels 1.. halves the size
  (2x2 average after repeating the last row/column of an odd size: ceil(h / 2), as the UNet's own downsampling)
  and, where the width changes, projects with a 1x1 ``in_conv``. A unit is ``x + block2(relu(block1(x)))`` with
  ``block1`` 3x3 and ``block2`` 1x1. Downsampling has no weights, so levels whose width does not change have no
  ``in_conv`` key.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .temporal_transformer import sinusoidal_encoding

UNITS_PER_LEVEL = 2
DEFAULT_DRIFT = 0.8  # the original Adapter's ``motion_scale``: how much the frame sinusoid moves the features


class ResidualUnit(nn.Module):
    def __init__(self, channels_in: int, channels: int, downsample: bool, ops=nn):
        super().__init__()
        self.downsample = downsample
        self.in_conv = ops.Conv2d(channels_in, channels, 1) if channels_in != channels else None
        self.block1 = ops.Conv2d(channels, channels, 3, padding=1)
        self.block2 = ops.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample:
            x = F.avg_pool2d(F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="replicate"), 2)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


class ImageEncoder(nn.Module):
    def __init__(self, channels: tuple[int, ...], latent_channels: int = 4, ops=nn):
        super().__init__()
        self.channels = tuple(channels)
        self.conv_in = ops.Conv2d(latent_channels, channels[0], 3, padding=1)
        self.body = nn.ModuleList(
            ResidualUnit(channels[level - 1] if unit == 0 and level else width, width, unit == 0 and level > 0, ops)
            for level, width in enumerate(channels) for unit in range(UNITS_PER_LEVEL))

    def forward(self, latent: Tensor, positions: int, drift: float = DEFAULT_DRIFT) -> list[Tensor]:
        """``latent`` [1, C, h, w] (scaled like the sampler's latents) -> one map per level, each
        [positions, C_level, ceil(h / 2^level), ceil(w / 2^level)] for frame positions 0..positions-1."""
        x = self.conv_in(latent)
        table = sinusoidal_encoding(positions, self.channels[0])[0].to(x)  # [positions, C0]
        x = x + drift * table[:, :, None, None]
        features = []
        for level in range(len(self.channels)):
            for unit in range(UNITS_PER_LEVEL):
                x = self.body[level * UNITS_PER_LEVEL + unit](x)
            features.append(x)
        return features

"""A spatial motion mask: where in the picture (and in which frames) the motion module acts.

The mask multiplies every temporal module's residual per pixel, resized to that block's resolution: white (1) =
the module as trained, black (0) = no temporal residual there. A frame whose mask is black everywhere is
denoised exactly as the image model alone would (the spatial layers never mix frames), so it comes out as the
plain model's frame; the other frames still see it through their attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class MotionMask:
    """A MASK (``[frames, H, W]`` or ``[H, W]``, values 0..1): one mask for every frame, or one per frame."""

    def __init__(self, mask):
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or mask.numel() == 0:
            shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"motion_mask must be a MASK of shape [frames, height, width] or [height, width]; got "
                             f"{shape}. Connect a mask (Load Image's MASK output, Solid Mask, ...).")
        mask = mask.detach().to("cpu", torch.float32)
        mask = mask[None] if mask.dim() == 2 else mask
        bad = mask[~((mask >= 0) & (mask <= 1))]  # NaN fails both comparisons
        if bad.numel():
            raise ValueError(f"motion_mask values must be from 0 (no motion) to 1 (full motion); it holds "
                             f"{bad[0].item()!r}. Clamp or normalise the mask first.")
        self.mask = mask
        self._resized: dict[tuple[int, int], torch.Tensor] = {}  # per block resolution: computed once

    @property
    def frames(self) -> int:
        return self.mask.shape[0]

    def check_frames(self, frames: int) -> None:
        """Refuse a mask made for another clip length (before sampling, when the latent batch is known)."""
        if self.frames not in (1, frames):
            raise ValueError(f"motion_mask has {self.frames} frames but the latent batch has {frames}: give one mask "
                             f"for all frames or exactly {frames} (one per frame).")

    def at(self, indices: list[int], chunks: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """``[(chunks frames), 1, h, w]`` for the clip frames ``indices`` (broadcasts against ``(b f) c h w``)."""
        if (h, w) not in self._resized:
            big = self.mask.shape[1] >= h and self.mask.shape[2] >= w
            # Downscaling averages the pixels each latent cell covers; upscaling interpolates.
            self._resized[(h, w)] = F.interpolate(self.mask[:, None], size=(h, w), mode="area" if big else "bilinear",
                                                  align_corners=None if big else False).clamp_(0, 1)
        resized = self._resized[(h, w)]
        if self.frames == 1:
            picked = resized.expand(len(indices), -1, -1, -1)
        else:
            if max(indices) >= self.frames:
                raise ValueError(f"motion_mask has {self.frames} frames but frame {max(indices)} is being sampled: "
                                 f"give one mask for all frames or one per latent frame.")
            picked = resized[list(indices)]
        return picked.to(like.device, like.dtype).repeat(chunks, 1, 1, 1)


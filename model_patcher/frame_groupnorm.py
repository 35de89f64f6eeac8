"""AnimateDiff v1's GroupNorm across frames in the image UNet's ResNets.

The v1 (and HotshotXL) UNet ran its ResNets on 5-D tensors, so their GroupNorms (and the final output norm)
took statistics over all frames of a clip together; the spatial-transformer norms stayed per frame. We get the
same by swapping those GroupNorms, through object patches of the clone, for a GroupNorm that shares their
parameters and normalises ``(b f) c h w`` as ``b c (f h w)``. A DIFFUSION_MODEL wrapper tells it, per UNet
call, how many frames the batch holds.
"""
from __future__ import annotations

import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from ..motion_modules import VanillaTemporalModule


class FrameCount:
    """Frames per clip in the current UNet call (None outside one); one per patched clone."""

    def __init__(self):
        self.value: int | None = None


class FrameGroupNorm(comfy.ops.disable_weight_init.GroupNorm):
    def __init__(self, original, frames: FrameCount):
        super().__init__(original.num_groups, original.num_channels, original.eps, original.affine, device="meta")
        self.weight, self.bias = original.weight, original.bias  # the same Parameters: no copy, same keys
        self.frames = frames

    def forward(self, x):
        frames = self.frames.value
        if not frames or frames == 1 or x.shape[0] % frames:
            return super().forward(x)
        clips, channels, height, width = x.shape[0] // frames, x.shape[1], x.shape[2], x.shape[3]
        # (b f) c h w -> b c (f h) w: statistics over the whole clip, through the host's own GroupNorm (its
        # weight casting and patching, whatever their form in this host version)
        whole = x.reshape(clips, frames, channels, height, width).transpose(1, 2).reshape(clips, channels, frames * height, width)
        out = super().forward(whole)
        return out.reshape(clips, channels, frames, height, width).transpose(1, 2).reshape(x.shape)


def resnet_norm_patches(unet, frames: FrameCount, prefix: str = "diffusion_model.") -> dict[str, FrameGroupNorm]:
    """Object patches: every ResBlock's two GroupNorms and the UNet's output norm.

    Keys are the paths of the UNet as loaded, without temporal modules: the host applies object patches with
    the injections taken out, but the UNet we walk here may still hold an earlier run's modules (the host
    keeps the last sampled clone patched), which would shift every index after them."""
    patches = {}
    blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)] + [("middle_block", unet.middle_block)] \
        + [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
    for path, block in blocks:
        layers = [layer for layer in block if not isinstance(layer, VanillaTemporalModule)]
        for index, layer in enumerate(layers):
            if isinstance(layer, ResBlock):
                for norm in ("in_layers.0", "out_layers.0"):
                    patches[f"{prefix}{path}.{index}.{norm}"] = FrameGroupNorm(layer.get_submodule(norm), frames)
    patches[f"{prefix}out.0"] = FrameGroupNorm(unet.out[0], frames)
    return patches


def frame_count_wrapper(frames: FrameCount):
    """DIFFUSION_MODEL wrapper: publish the frame count of each UNet call while it runs."""
    def wrapper(executor, x, timesteps, context, y=None, control=None, transformer_options={}, **kwargs):
        frames.value = x.shape[0] // len(transformer_options.get("cond_or_uncond") or [0])
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            frames.value = None
    return wrapper

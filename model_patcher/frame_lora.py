"""Motion-LoRA strength per frame: the LoRA's low-rank update applied in the forward, per frame token.

A LoRA at one strength is a host weight patch (``add_motion_lora``): ``W + s * up @ down``. With a strength per
frame that one weight cannot serve every frame, so the update is added to each adapted layer's output instead:
``y + s_f * up @ (down @ x)`` for the tokens of frame f. Inside the temporal transformer every linear layer sees
tokens laid out ``(b h w) f c``, so a frame's strength is one value along the second axis. The layers get a
forward hook for the duration of one module call only (nothing stays on the module), which also takes them off
the stacked-weight fast path, so a run with per-frame strengths is a little slower.
"""
from __future__ import annotations

import contextlib
import uuid

import torch
import torch.nn.functional as F

FRAME_LORAS = "animatediff_frame_loras"  # the motion patcher's model_options: ((pairs, strength, per_frame), ...)
WEIGHT_LORAS = "animatediff_weight_loras"  # the LoRAs applied as weight patches: ((pairs, strength), ...)


def in_forward(motion):
    """A clone of the motion patcher whose weight-patched motion LoRAs are applied in the forward instead (the same
    strength on every frame), so that step keyframes can change their strength while sampling."""
    loras = motion.model_options.get(WEIGHT_LORAS)
    if not loras:
        return motion
    moved = motion.clone()
    for pairs, _ in loras:  # a motion module's weight patches are its motion LoRAs (add_motion_lora)
        for key in pairs:
            moved.patches.pop(key, None)
    moved.patches_uuid = uuid.uuid4()
    del moved.model_options[WEIGHT_LORAS]
    moved.model_options[FRAME_LORAS] = (*moved.model_options.get(FRAME_LORAS, ()),
                                        *((pairs, strength, (1.0,)) for pairs, strength in loras))
    return moved


def module_prefixes(config) -> list[str]:
    """The key prefix of each temporal module of a layout, in UNet order (as MotionModule.in_unet_order)."""
    down = [f"down_blocks.{i}.motion_modules.{j}" for i, block in enumerate(config.down) for j in range(len(block))]
    mid = [f"mid_block.motion_modules.{j}" for j in range(len(config.mid))]
    up = [f"up_blocks.{i}.motion_modules.{j}" for i, block in enumerate(config.up) for j in range(len(block))]
    return down + mid + up


def by_slot(loras, config, slot_names: list[str]) -> dict[str, list[tuple[str, torch.Tensor, torch.Tensor, float, tuple]]]:
    """{slot name: [(layer path inside the temporal module, up, down, strength, per-frame strengths)]}: each LoRA
    key (``down_blocks.0.motion_modules.1.temporal_transformer....to_q.weight``) matched to the slot its module
    sits in (``slot_names``: the module's slots in UNet order, from placement.plan)."""
    where = dict(zip(module_prefixes(config), slot_names))
    found: dict[str, list] = {}
    for pairs, strength, per_frame in loras:
        for key, (up, down) in pairs.items():
            prefix, rest = key.split(".temporal_transformer.", 1)
            found.setdefault(where[prefix], []).append(
                ("temporal_transformer." + rest[: -len(".weight")], up, down, strength, per_frame))
    return found


@contextlib.contextmanager
def applied(module, entries, clip: int):
    """Hooks on ``module``'s adapted layers for one call. ``entries``: (layer path, up, down, strength, per-frame
    strengths ``[(chunks frames)]`` in UNet batch order); ``clip``: the frames per clip the module attends over."""
    handles = []
    try:
        for path, up, down, strength, frame_strengths in entries:
            layer = module.get_submodule(path)
            handles.append(layer.register_forward_hook(_hook(up, down, strength, frame_strengths, clip)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(up, down, strength, frame_strengths, clip):
    def hook(layer, inputs, output):
        x = inputs[0]  # (b h w) f c
        per_token = frame_strengths.view(-1, 1, clip, 1)  # b 1 f 1
        hw = x.shape[0] // per_token.shape[0]
        per_token = per_token.expand(-1, hw, -1, -1).reshape(-1, clip, 1).to(x.dtype)
        delta = F.linear(F.linear(x, down.to(x.device, x.dtype)), up.to(x.device, x.dtype))
        return output + delta * (per_token * strength)
    return hook

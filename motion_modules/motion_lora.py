"""Motion LoRAs: low-rank updates of a motion module's layers (formats.md §3).

Published v2 camera LoRAs name their pairs ``...attention_blocks.<a>.processor.to_q_lora.{down,up}.weight``;
MotionDirector-trained ones also adapt ``to_out`` (as ``to_out.processor.0_lora``) and the feed-forward layers.
Each pair updates one weight: ``W += strength * up @ down``, no rank or alpha normalisation.
"""
from __future__ import annotations

import re

from torch import Tensor

from .formats import MotionModuleError

LORA_KEY = re.compile(r"^(?P<target>.+?)\.(?P<side>down|up)\.weight$")


def target_key(key: str) -> str:
    """The motion-module weight a LoRA tensor adapts: drop ``processor.`` and ``_lora``, ``to_out`` -> ``to_out.0``."""
    match = LORA_KEY.match(key.replace("processor.", "").replace("_lora", ""))
    if not match:
        raise ValueError(key)
    target = match["target"]
    if target.endswith(".to_out"):
        target += ".0"
    return target + ".weight"


def lora_pairs(sd: dict[str, Tensor], name: str) -> dict[str, tuple[Tensor, Tensor]]:
    """{motion-module weight key: (up, down)} from a motion-LoRA state dict."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if "_lora." not in key or "motion_modules." not in key:
            continue
        side = LORA_KEY.match(key)["side"]
        pairs.setdefault(target_key(key), {})[side] = value
    if not pairs:
        raise MotionModuleError(f"{name}: no motion-LoRA layers in this file (keys like "
                                f"'...motion_modules.0...processor.to_q_lora.down.weight'). Is it a motion LoRA?")
    broken = [k for k, p in pairs.items() if set(p) != {"up", "down"}]
    if broken:
        raise MotionModuleError(f"{name}: LoRA layers without both up and down weights ({broken[:2]}); the file is damaged.")
    return {k: (p["up"], p["down"]) for k, p in pairs.items()}


def check_fits(pairs: dict[str, tuple[Tensor, Tensor]], module_sd: dict[str, Tensor], name: str, family: str) -> None:
    """Refuse a LoRA whose layers are not all in the module, or have other shapes, with what it was made for."""
    missing = [k for k in pairs if k not in module_sd]
    if missing:
        mid = [k for k in missing if k.startswith("mid_block.")]
        hint = (f"it adapts a mid block, so it was made for AnimateDiff v2 (or another module with a mid block), "
                f"and {family} has none") if mid else "it was made for another motion-module layout"
        raise MotionModuleError(f"Motion LoRA {name} does not fit the {family} module: {hint} "
                                f"(e.g. {missing[0]}). Use it with the module it was trained for.")
    wrong = [k for k, (up, down) in pairs.items() if (up.shape[0], down.shape[1]) != tuple(module_sd[k].shape[:2])]
    if wrong:
        k = wrong[0]
        raise MotionModuleError(f"Motion LoRA {name} does not fit the {family} module: layer {k} is "
                                f"{tuple(module_sd[k].shape)} but the LoRA makes {(pairs[k][0].shape[0], pairs[k][1].shape[1])}; "
                                f"it was made for another base (SD1.5 vs SDXL).")

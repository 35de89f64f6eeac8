"""Motion LoRAs: low-rank updates of a motion module's layers (formats.md §3).

Published v2 camera LoRAs name their pairs ``...attention_blocks.<a>.processor.to_q_lora.{down,up}.weight``;
MotionDirector-trained ones also adapt ``to_out`` (as ``to_out.processor.0_lora``) and the feed-forward layers.
Each pair updates one weight: ``W += strength * up @ down``, no rank normalisation. A file that also holds an
``alpha`` per pair (``...to_q_lora.alpha``, the convention of kohya-style LoRAs) means ``alpha / rank`` times that
product; the scale is folded into ``up`` here, so every caller applies plain ``up @ down``.
"""
from __future__ import annotations

import math
import re

from torch import Tensor

from .formats import MotionModuleError, check_finite

LORA_KEY = re.compile(r"^(?P<target>.+?)\.(?P<side>down|up)\.weight$")
ALPHA_KEY = re.compile(r"^(?P<stem>.+?)(?:\.(?:down|up))?\.alpha$")


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
    """{motion-module weight key: (up, down)} from a motion-LoRA state dict: every pair 2-D, finite, of one rank,
    with its alpha (if any) folded into ``up``."""
    sides: dict[str, dict[str, tuple[str, Tensor]]] = {}
    alphas: dict[str, tuple[str, Tensor]] = {}
    for key, value in sd.items():
        if "_lora." not in key or "motion_modules." not in key:
            continue
        alpha = ALPHA_KEY.match(key)
        if alpha:
            alphas[target_key(alpha["stem"] + ".down.weight")] = (key, value)
            continue
        match = LORA_KEY.match(key)
        if not match:
            raise MotionModuleError(f"{name}: unknown motion-LoRA tensor '{key}' (expected names ending in "
                                    "'.down.weight', '.up.weight' or '.alpha'); the file is damaged or another "
                                    "kind of LoRA.")
        target = target_key(key)
        if match["side"] in sides.get(target, {}):
            raise MotionModuleError(f"{name}: '{key}' and '{sides[target][match['side']][0]}' both adapt {target}; "
                                    "the file is damaged.")
        sides.setdefault(target, {})[match["side"]] = (key, value)
    if not sides:
        raise MotionModuleError(f"{name}: no motion-LoRA layers in this file (keys like "
                                f"'...motion_modules.0...processor.to_q_lora.down.weight'). Is it a motion LoRA?")
    broken = [k for k, p in sides.items() if set(p) != {"up", "down"}] + [a for t, (a, _) in alphas.items() if t not in sides]
    if broken:
        raise MotionModuleError(f"{name}: LoRA layers without both up and down weights ({broken[:2]}); the file is damaged.")
    pairs = {}
    for target, p in sides.items():
        (up_key, up), (down_key, down) = p["up"], p["down"]
        for key, value in (p["up"], p["down"]):
            if value.dim() != 2 or value.numel() == 0 or not value.is_floating_point():
                raise MotionModuleError(f"{name}: tensor '{key}' is {value.dtype} {list(value.shape)}; LoRA weights "
                                        "are 2-D float matrices (up [out, rank], down [rank, in]). The file is damaged "
                                        "or not a motion LoRA.")
        if up.shape[1] != down.shape[0]:
            raise MotionModuleError(f"{name}: '{up_key}' has rank {up.shape[1]} but '{down_key}' has rank "
                                    f"{down.shape[0]}; the pair cannot be applied. The file is damaged.")
        check_finite({up_key: up, down_key: down}, name)
        if target in alphas:
            alpha_key, alpha = alphas[target]
            value = float(alpha.flatten()[0]) if alpha.numel() == 1 else math.nan
            if not math.isfinite(value):
                raise MotionModuleError(f"{name}: '{alpha_key}' is {list(alpha.shape)} {alpha.flatten()[:3].tolist()}, "
                                        "not one finite number; the file is damaged.")
            up = up.float() * (value / down.shape[0])  # the published convention: scale = alpha / rank
        pairs[target] = (up, down)
    return pairs


def check_fits(pairs: dict[str, tuple[Tensor, Tensor]], module_sd: dict[str, Tensor], name: str, family: str) -> None:
    """Refuse a LoRA whose layers are not all in the module, or have other shapes, with what it was made for."""
    missing = [k for k in pairs if k not in module_sd]
    if missing:
        mid = [k for k in missing if k.startswith("mid_block.")]
        hint = (f"it adapts a mid block, so it was made for AnimateDiff v2 (or another module with a mid block), "
                f"and {family} has none") if mid else "it was made for another motion-module layout"
        raise MotionModuleError(f"Motion LoRA {name} does not fit the {family} module: {hint} "
                                f"(e.g. {missing[0]}). Use it with the module it was trained for.")
    wrong = [k for k, (up, down) in pairs.items() if (up.shape[0], down.shape[1]) != tuple(module_sd[k].shape)]
    if wrong:
        k = wrong[0]
        raise MotionModuleError(f"Motion LoRA {name} does not fit the {family} module: layer {k} is "
                                f"{tuple(module_sd[k].shape)} but the LoRA makes {(pairs[k][0].shape[0], pairs[k][1].shape[1])}; "
                                f"it was made for another base (SD1.5 vs SDXL).")

"""Motion scale per UNet block: one factor for the down, mid and up blocks, and overrides per slot.

Slots are named as the placement names them: ``input 4``, ``middle``, ``output 11`` (the host UNet's
``input_blocks[4]``, ``middle_block``, ``output_blocks[11]``). "Motion only in the low-resolution blocks" is,
for SD1.5: ``input 1: 0, input 2: 0, output 9: 0, output 10: 0, output 11: 0``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_SCALE = 10.0
GROUPS = {"input": "down", "middle": "mid", "output": "up"}
_SLOT = re.compile(r"^(?:(?P<group>input|output)\s+(?P<index>\d+)|(?P<middle>middle|mid))$")
FORMAT = "'output 9: 0, output 10: 0.5' (slots: input N, middle, output N)"


@dataclass(frozen=True)
class BlockScales:
    down: float = 1.0
    mid: float = 1.0
    up: float = 1.0
    slots: tuple[tuple[str, float], ...] = ()  # (slot name, factor): replaces its group's factor there

    def __post_init__(self):
        for name, value in [("down_scale", self.down), ("mid_scale", self.mid), ("up_scale", self.up),
                            *((f"block_scales '{k}'", v) for k, v in self.slots)]:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_SCALE):
                raise ValueError(f"{name} must be a number from 0 to {MAX_SCALE:g}; got {value!r}. 1 is the module "
                                 "as trained, 0 turns it off in those blocks.")

    @property
    def neutral(self) -> bool:
        return (self.down, self.mid, self.up) == (1.0, 1.0, 1.0) and not self.slots

    def factor(self, where: str) -> float:
        """The factor for the slot ``where`` ("input 4", "middle", "output 11")."""
        for name, value in self.slots:
            if name == where:
                return float(value)
        return float(getattr(self, GROUPS[where.split()[0]]))

    def check_slots(self, available: list[str]) -> None:
        """Refuse an override for a block that holds no motion module (a typo, or another family's layout)."""
        unknown = [name for name, _ in self.slots if name not in available]
        if unknown:
            raise ValueError(f"block_scales names '{unknown[0]}', which holds no motion module in this model; the "
                             f"slots are: {', '.join(available)}.")


def parse(text: str) -> tuple[tuple[str, float], ...]:
    """``"output 9: 0, middle: 0.5"`` -> (("output 9", 0.0), ("middle", 0.5)); empty text -> ()."""
    slots = []
    for part in re.split(r"[,\n;]", text or ""):
        if not part.strip():
            continue
        name, sep, value = part.partition(":")
        match = _SLOT.match(" ".join(name.lower().split()))
        try:
            number = float(value) if sep else math.nan
        except ValueError:
            number = math.nan
        if not match or not math.isfinite(number):
            raise ValueError(f"block_scales: cannot read {part.strip()!r}; write slot: scale pairs like {FORMAT}.")
        slot = "middle" if match["middle"] else f"{match['group']} {int(match['index'])}"
        slots.append((slot, number))
    return tuple(slots)

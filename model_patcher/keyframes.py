"""Motion keyframes over the sampling steps: motion scale, effect, motion-LoRA strength and module weights that
change as noise goes.

``start_percent`` is on the host's scale of sampling progress, as ControlNet's and the hook keyframes' are: the
model's ``percent_to_sigma`` turns it into a noise level, and a keyframe is in effect once the current sigma is at
or below its own (0 = from the first step, 1 = the end). Before the first keyframe Apply Motion Module's own values
hold. A keyframe's ``interpolation`` says how its values lead to the next keyframe's: ``hold`` keeps them until
the next one starts, ``linear`` moves them evenly (in percent) to the next one's values, reached at its start.
``scale`` and ``effect`` multiply Apply's motion_scale and effect, ``lora_strength`` every motion LoRA's strength;
``module_weights`` (one per motion module) replace Apply's weights while the keyframe is in effect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

INTERPOLATIONS = ("hold", "linear")
MAX_SCALE = 10.0


@dataclass(frozen=True)
class MotionKeyframe:
    start_percent: float
    scale: float = 1.0
    effect: float = 1.0
    interpolation: str = "hold"
    module_weights: tuple[float, ...] | None = None
    lora_strength: float = 1.0

    def __post_init__(self):
        checks = [("start_percent", self.start_percent, 1.0), ("motion_scale", self.scale, MAX_SCALE),
                  ("effect", self.effect, 1.0), ("motion_lora_strength", self.lora_strength, MAX_SCALE), *(("module_weights", w, MAX_SCALE) for w in self.module_weights or ())]
        for name, value, top in checks:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= top):
                raise ValueError(f"Motion keyframe {name} must be a number from 0 to {top:g}; got {value!r}.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"Motion keyframe interpolation must be one of {', '.join(INTERPOLATIONS)}; got "
                             f"{self.interpolation!r}.")
        if self.module_weights is not None and not self.module_weights:
            raise ValueError("Motion keyframe module_weights is empty: leave it unset, or give one weight per module.")


@dataclass(frozen=True)
class StepValues:
    """What the motion patch uses at one step: factors on Apply's scale, effect and motion-LoRA strengths, and the
    module weights."""
    scale: float = 1.0
    effect: float = 1.0
    module_weights: tuple[float, ...] | None = None
    lora_strength: float = 1.0


@dataclass(frozen=True)
class MotionKeyframes:
    """A chain of keyframes, ordered by start_percent (of two at the same percent, the one added later wins)."""
    keyframes: tuple[MotionKeyframe, ...] = ()

    def add(self, keyframe: MotionKeyframe) -> "MotionKeyframes":
        ordered = sorted([*self.keyframes, keyframe], key=lambda k: k.start_percent)  # stable: later stays later
        return MotionKeyframes(tuple(ordered))

    @property
    def sets_lora_strength(self) -> bool:
        return any(k.lora_strength != 1.0 for k in self.keyframes)

    def check_modules(self, modules: int) -> None:
        for k in self.keyframes:
            if k.module_weights is not None and len(k.module_weights) != modules:
                raise ValueError(f"Motion keyframe at start_percent {k.start_percent:g} gives {len(k.module_weights)} "
                                 f"module weights, but Apply Motion Module has {modules} motion module(s): give one "
                                 "weight per module, in the order motion_module, motion_module_2, ...")

    def at(self, sigma: float, model_sampling, weights: tuple[float, ...]) -> StepValues:
        """The values in effect at noise level ``sigma``; ``weights`` are Apply's (used where a keyframe sets none)."""
        starts = [float(model_sampling.percent_to_sigma(k.start_percent)) for k in self.keyframes]
        started = [i for i, start in enumerate(starts) if sigma <= start]
        if not started:
            return StepValues()
        i = started[-1]
        current = self.keyframes[i]
        here = StepValues(current.scale, current.effect, current.module_weights or weights, current.lora_strength)
        if current.interpolation == "hold" or i + 1 == len(self.keyframes):
            return here
        following = self.keyframes[i + 1]
        span = following.start_percent - current.start_percent
        if span <= 0:
            return here
        if sigma >= starts[i]:
            return here  # exactly at its start (the bisection below is only near-exact)
        t = min(max((percent_of(sigma, model_sampling) - current.start_percent) / span, 0.0), 1.0)
        lerp = lambda a, b: a + (b - a) * t  # noqa: E731
        target = following.module_weights or weights
        return StepValues(lerp(current.scale, following.scale), lerp(current.effect, following.effect),
                          tuple(lerp(a, b) for a, b in zip(here.module_weights, target)),
                          lerp(current.lora_strength, following.lora_strength))


def percent_of(sigma: float, model_sampling, iterations: int = 40) -> float:
    """The sampling percent whose sigma is ``sigma``: ``percent_to_sigma`` inverted by bisection (it falls as the
    percent rises, for every host schedule), so linear keyframes ramp on the same scale their starts are given in."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if float(model_sampling.percent_to_sigma(middle)) > sigma:
            low = middle
        else:
            high = middle
    return (low + high) / 2

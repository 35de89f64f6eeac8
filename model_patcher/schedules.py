"""The noise schedule each motion-module family was trained with, swapped in as the clone's ``model_sampling``
(an object patch: the host restores the checkpoint's own when the clone is unpatched).

ComfyUI's names: "linear" is linear in sqrt(beta) (diffusers' "scaled_linear"); "sqrt_linear" is linear in
beta (diffusers' "linear"), the schedule AnimateDiff's SD1.5 modules were trained with.
"""
from __future__ import annotations

from types import SimpleNamespace

import comfy.model_sampling

AUTOSELECT = "autoselect"
USE_EXISTING = "use existing"
SQRT_LINEAR = "sqrt_linear (AnimateDiff)"
LINEAR_SDXL = "linear (AnimateDiff-SDXL)"
LINEAR = "linear (HotshotXL/default)"
LCM = "lcm (AnimateLCM)"

SETTINGS = {
    SQRT_LINEAR: {"beta_schedule": "sqrt_linear", "linear_start": 0.00085, "linear_end": 0.012},
    LINEAR_SDXL: {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.020},
    LINEAR: {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012},
    # AnimateLCM's configs name diffusers-"linear" with 100 original steps; the community default (less
    # flicker) is scaled-linear, 50 original steps, with the LCM denoiser. We follow the community default.
    LCM: {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012},
}
FAMILY_DEFAULT = {
    "AnimateDiff v1": SQRT_LINEAR, "AnimateDiff v2": SQRT_LINEAR, "AnimateDiff v3": SQRT_LINEAR,
    "AnimateLCM": LCM, "AnimateDiff SDXL beta": LINEAR_SDXL, "HotshotXL": LINEAR,
}
CHOICES = [AUTOSELECT, USE_EXISTING, *SETTINGS]


def resolve(choice: str, family: str) -> str:
    if choice not in CHOICES:
        raise ValueError(f"Unknown noise schedule {choice!r}; choose one of {CHOICES}.")
    return FAMILY_DEFAULT.get(family, USE_EXISTING) if choice == AUTOSELECT else choice


def model_sampling(name: str, current) -> object | None:
    """A ``model_sampling`` object for schedule ``name``, or None to keep ``current`` (the checkpoint's own).
    Only epsilon-prediction models are switched: every motion-module family was trained as one."""
    if name == USE_EXISTING or not isinstance(current, comfy.model_sampling.EPS):
        return None
    config = SimpleNamespace(sampling_settings=SETTINGS[name])
    if name == LCM:
        from comfy_extras.nodes_model_advanced import LCM as LCMDenoiser, ModelSamplingDiscreteDistilled
        bases = (ModelSamplingDiscreteDistilled, LCMDenoiser)
    else:
        bases = (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS)
    sampling = type("AnimateDiffModelSampling", bases, {})(config)
    sampling.animatediff_motion = True  # ours: a later apply may replace it
    return sampling

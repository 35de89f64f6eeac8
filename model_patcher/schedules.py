"""The noise schedule each motion-module family was trained with, swapped in as the clone's ``model_sampling``
(an object patch: the host restores the checkpoint's own when the clone is unpatched).

ComfyUI's dynamic-VRAM loader (``comfy/model_patcher.py``: ``ModelPatcherDynamic.load`` and
``restore_loaded_backups``, default on NVIDIA from about 0.15) backs model buffers up by attribute path at a load
and writes them back by path at the next one, into whatever object sits at that path then. Both directions would
silently mix schedules: the checkpoint's ``model_sampling.sigmas`` written into ours (an AnimateDiff run sampling
with the checkpoint's schedule), or ours into the checkpoint's (a later plain run keeping AnimateDiff's). Our
object keeps its own values whatever is written into it, and after each run the loader's backups of our schedule
are dropped.

ComfyUI's names: "linear" is linear in sqrt(beta) (diffusers' "scaled_linear"); "sqrt_linear" is linear in
beta (diffusers' "linear"), the schedule AnimateDiff's SD1.5 modules were trained with.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

import comfy.model_sampling

AUTOSELECT = "autoselect"
USE_EXISTING = "use existing"
SQRT_LINEAR = "sqrt_linear (AnimateDiff)"
LINEAR_SDXL = "linear (AnimateDiff-SDXL)"
LINEAR = "linear (HotshotXL/default)"
LCM = "lcm (AnimateLCM)"
LCM_I2V = "lcm (AnimateLCM-I2V)"

SETTINGS = {
    SQRT_LINEAR: {"beta_schedule": "sqrt_linear", "linear_start": 0.00085, "linear_end": 0.012},
    LINEAR_SDXL: {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.020},
    LINEAR: {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012},
    # AnimateLCM's configs name diffusers-"linear" with 100 original steps; the community default (less
    # flicker) is scaled-linear, 50 original steps, with the LCM denoiser. We follow the community default.
    LCM: {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012},
    # AnimateLCM-I2V's inference-i2v.yaml: diffusers-"linear" (our sqrt_linear) to 0.014, 200 original steps.
    LCM_I2V: {"beta_schedule": "sqrt_linear", "linear_start": 0.00085, "linear_end": 0.014},
}
LCM_ORIGINAL_STEPS = {LCM_I2V: 200}  # the others keep the host's LCM default (50)
FAMILY_DEFAULT = {
    "AnimateDiff v1": SQRT_LINEAR, "AnimateDiff v2": SQRT_LINEAR, "AnimateDiff v3": SQRT_LINEAR,
    "AnimateLCM": LCM, "AnimateDiff SDXL beta": LINEAR_SDXL, "HotshotXL": LINEAR,
    "PIA": SQRT_LINEAR, "AnimateLCM-I2V": LCM_I2V,
}
CHOICES = [AUTOSELECT, USE_EXISTING, *SETTINGS]
SCHEDULE_BUFFERS = ("sigmas", "log_sigmas")


class OwnSchedule:
    """Mixin of our ``model_sampling`` classes: a write of a schedule buffer (the host's loaders set buffers with
    ``register_buffer``) takes the device and dtype it is given and keeps this object's values."""

    def register_buffer(self, name, tensor, persistent=True):
        own = self.__dict__.get("own_schedule")
        if own is not None and name in own and tensor is not None:
            tensor = own[name].to(device=tensor.device, dtype=tensor.dtype)
        super().register_buffer(name, tensor, persistent)


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
    attributes = {}
    if name in (LCM, LCM_I2V):
        from comfy_extras.nodes_model_advanced import LCM as LCMDenoiser, ModelSamplingDiscreteDistilled
        bases = (ModelSamplingDiscreteDistilled, LCMDenoiser)
        attributes = {"original_timesteps": LCM_ORIGINAL_STEPS[name]} if name in LCM_ORIGINAL_STEPS else {}
    else:
        bases = (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS)
    sampling = type("AnimateDiffModelSampling", (OwnSchedule, *bases), attributes)(config)
    sampling.own_schedule = {name: getattr(sampling, name).clone() for name in SCHEDULE_BUFFERS}
    sampling.animatediff_motion = True  # ours: a later apply may replace it
    return sampling


def forget_loader_backups(patcher, sampling, path: str = "model_sampling") -> None:
    """Drop the by-path buffer backups (``backup_buffers``, a dict the dynamic-VRAM loader shares between clones)
    that hold ``sampling``'s schedule, so that no later load writes them into the checkpoint's own object."""
    backups = getattr(patcher, "backup_buffers", None)
    if not isinstance(backups, dict):
        return  # a loader without by-path backups
    for name, ours in sampling.own_schedule.items():
        backup = backups.get(f"{path}.{name}")
        if isinstance(backup, torch.Tensor) and backup.shape == ours.shape \
                and torch.equal(backup.detach().to("cpu", ours.dtype), ours):
            del backups[f"{path}.{name}"]


def keep_schedules_apart(sampling):
    """OUTER_SAMPLE wrapper: after the run (also a failed one), forget the loader's backups of our schedule."""
    def wrapper(executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            forget_loader_backups(executor.class_obj.model_patcher, sampling)
    return wrapper

"""CameraCtrl on a MODEL that carries an AnimateDiff motion module (Apply Motion Module's output).

The CameraCtrl model (pose encoder + qkv_merge layers, motion_modules/camera_ctrl.py) is a ModelPatcher of its own,
attached to the clone as an additional model, so the host loads, offloads and counts it with the UNet. Two pieces
under one key make it act:

- an APPLY_MODEL wrapper turns this call's frames into pose features: the frames are the context window's (anchor
  first where there is one) or the whole clip (image_to_video.batch_frames), grouped into the clips the motion
  modules see (context_windows.clip_frames: one window, or each of several batched ones). Each clip's poses are
  taken relative to its own first frame, as every clip CameraCtrl was trained on (and as AnimateDiff-Evolved does per
  window), so a window conditions exactly as the same frames sampled alone. Features depend on the frames and the
  size only, not on the step: the last ones are kept until the frames change, and dropped when sampling ends.
- an injection gives the first attention block of each conditioned motion module a forward that reads those
  features (``conditioned_attention``); at eject the block's own forward is back. Nothing else in the motion
  module changes (its keys, weights, LoRA patches stay as they are), and the MODEL passed in is untouched.

With several motion modules on the MODEL, CameraCtrl conditions the first (Apply Motion Module's motion_module).
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import torch
from torch import Tensor

import comfy.ops
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import PatcherInjection, WrappersMP

from ..motion_modules.camera_ctrl import (CameraCtrl, CameraCtrlError, CameraPoses, check_fits, conditioned_attention,
                                          load_camera_ctrl, plucker_embedding)
from . import context_windows, motion_patcher
from .image_to_video import batch_frames

KEY = "animatediff_camera_ctrl"
MAX_STRENGTH = 10.0
TRAINED_WITH = "AnimateDiff v3"


def load_camera_ctrl_patcher(path: str | Path) -> ModelPatcher:
    """Read a CameraCtrl file into a ModelPatcher, in the dtype the host runs UNets in on this device."""
    return motion_patcher.patcher_in_unet_dtype(load_camera_ctrl(path, ops=comfy.ops.disable_weight_init),
                                                (load_camera_ctrl_patcher, (str(path),)))


class PoseFeatures:
    """APPLY_MODEL wrapper: this call's pose features, per level in the motion modules' token layout
    [(n h w), f, c] (n clips of f frames, one cond/uncond chunk), for the conditioned attention blocks to read."""

    def __init__(self, camera: CameraCtrl, poses: CameraPoses, strength: float, pose_size: tuple[int, int]):
        self.camera, self.poses, self.strength, self.pose_size = camera, poses, strength, pose_size
        self.cache: tuple | None = None   # (key, features): the last frames' features
        self.current: list[Tensor] | None = None  # set during a UNet call only

    def features(self, frames: list[int], clip: int, height: int, width: int, device) -> list[Tensor]:
        key = (tuple(frames), clip, height, width, device)
        if self.cache is None or self.cache[0] != key:
            self.cache = None  # free the last ones before computing new ones
            config = self.camera.config
            levels = len(config.channels)
            if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
                raise CameraCtrlError(
                    f"{config.name}: the latent is {width}x{height}; CameraCtrl's pose features halve it "
                    f"{levels - 1} times, so width and height must be multiples of {8 * 2 ** (levels - 1)} pixels "
                    f"(e.g. 512x512, 384x256).")
            size = (height * config.downscale, width * config.downscale)
            weight = self.camera.encoder_conv_in.weight
            clips = [frames[i:i + clip] for i in range(0, len(frames), clip)]  # each relative to its first frame
            plucker = torch.cat([plucker_embedding(self.poses.at(c), *size, self.pose_size) for c in clips])
            with torch.no_grad():
                maps = self.camera.encode(plucker.to(device, weight.dtype), clip, motion_patcher.TEMPORAL_ATTENTION)
            tokens = []
            for m in maps:  # (n f) c h w -> (n h w) f c
                nf, c, h, w = m.shape
                tokens.append(m.reshape(nf // clip, clip, c, h * w).permute(0, 3, 1, 2).reshape(-1, clip, c))
            self.cache = (key, tokens)
        return self.cache[1]

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if self.strength == 0:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        _, frames = batch_frames(x, transformer_options)
        clip = context_windows.clip_frames(transformer_options.get("context_window"), len(frames))
        self.current = self.features(frames, clip, x.shape[-2], x.shape[-1], x.device)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.current = None

    def forget(self, executor, *args, **kwargs):
        """OUTER_SAMPLE wrapper: drop the kept features when sampling ends (they hold device memory)."""
        try:
            return executor(*args, **kwargs)
        finally:
            self.cache = None


def _posed_forward(block, merge, level: int, source: PoseFeatures, x: Tensor, attention):
    """The forward a conditioned attention block has while injected: CameraCtrl's when this call has features."""
    pose = source.current[level] if source.current is not None else None
    if pose is None:
        return type(block).forward(block, x, attention)
    if x.shape[0] % pose.shape[0] or x.shape[1:] != pose.shape[1:]:
        raise CameraCtrlError(
            f"{source.camera.config.name}: pose features {list(pose.shape)} do not fit the motion module's tokens "
            f"{list(x.shape)} here. Another node changes the frames or the size between CameraCtrl and the UNet; "
            "apply CameraCtrl last, right before the sampler.")
    return conditioned_attention(block, merge, x, pose, source.strength, attention)


def _injection(source: PoseFeatures) -> PatcherInjection:
    def blocks(patcher: ModelPatcher):
        motion = patcher.get_additional_models_with_key(motion_patcher.KEY)[0].model
        camera = patcher.get_additional_models_with_key(KEY)[0].model
        return [(motion.get_submodule(path), merge, camera.config.level_of(path)) for path, merge in camera.merges()]

    def inject(patcher: ModelPatcher) -> None:
        for block, merge, level in blocks(patcher):
            block.forward = functools.partial(_posed_forward, block, merge, level, source)

    def eject(patcher: ModelPatcher) -> None:
        for block, _, _ in blocks(patcher):
            block.__dict__.pop("forward", None)  # the class's forward again

    return PatcherInjection(inject=inject, eject=eject)


def _finite(value, name: str, low: float, high: float) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"Apply CameraCtrl Poses: {name} must be a number from {low:g} to {high:g}; got {value!r}.")
    return float(value)


def apply_camera_ctrl(model: ModelPatcher, camera: ModelPatcher, poses: CameraPoses, strength: float = 1.0,
                      pose_size: tuple[int, int] = (1280, 720)) -> ModelPatcher:
    """A clone of ``model`` whose motion module follows ``poses``; a second apply on the result replaces the first."""
    node = "Apply CameraCtrl Poses"
    found = model.get_additional_models_with_key(motion_patcher.KEY)
    if not found:
        raise ValueError(f"{node}: this MODEL has no motion module. Connect the MODEL output of Apply Motion Module "
                         "(with AnimateDiff v3's v3_sd15_mm.ckpt loaded by Load Motion Module).")
    if not isinstance(getattr(camera, "model", None), CameraCtrl):
        raise ValueError(f"{node}: camera_ctrl must come from Load CameraCtrl (AnimateDiff).")
    if not isinstance(poses, CameraPoses) or len(poses) == 0:
        raise ValueError(f"{node}: no camera poses; give a pose file or pose text.")
    strength = _finite(strength, "strength", 0.0, MAX_STRENGTH)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pose_size):
        raise ValueError(f"{node}: pose_width and pose_height must be whole numbers above 0; got {pose_size!r}.")
    motion_config = found[0].model.config
    check_fits(camera.model.config, motion_config)
    if motion_config.family != TRAINED_WITH:
        logging.warning("CameraCtrl was trained with %s (v3_sd15_mm.ckpt); '%s' is %s, so the camera may follow "
                        "the poses less well.", TRAINED_WITH, motion_config.extra.get("name"), motion_config.family)
    source = PoseFeatures(camera.model, poses, strength, tuple(pose_size))
    patched = model.clone()
    for wrapper_type in (WrappersMP.APPLY_MODEL, WrappersMP.OUTER_SAMPLE):
        patched.remove_wrappers_with_key(wrapper_type, KEY)
    patched.set_additional_models(KEY, [camera.clone()])
    patched.set_injections(KEY, [_injection(source)])
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, source)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, source.forget)
    return patched

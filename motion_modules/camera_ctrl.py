"""CameraCtrl (He et al., 2024, "CameraCtrl: Enabling Camera Control for Text-to-Video Generation",
arXiv:2404.02101; hehao13/CameraCtrl, main branch): a camera path for an AnimateDiff v3 clip.

Facts this file follows (read in hehao13/CameraCtrl ``cameractrl/models/pose_adaptor.py``,
``attention_processor.py``, ``unet.py``, ``inference.py``, ``configs/train_cameractrl/adv3_256_384_cameractrl_
relora.yaml``; and in AnimateDiff-Evolved's CameraCtrl loader):

- **Poses** come as RealEstate10K text: a first line with the source video's URL, then one line per frame of 19
  numbers: timestamp, fx fy cx cy (normalised by the frame's width and height), two unused numbers (0 0), and the
  3x4 world-to-camera matrix, row-major. The intrinsics are for the original video (1280x720 unless told): for a
  clip of another aspect ratio the focal length of the wider side is rescaled as if the video were resized to the
  clip's height (or width) and cropped.
- **Plücker embedding**, per frame and per pixel (pixel centres, ``+ 0.5``): the camera-to-world pose relative to
  the clip's first frame (``w2c[0] @ c2w[k]``, so frame 0 is the identity), the ray direction ``d = R @ normalise(
  ((u - cx) / fx, (v - cy) / fy, 1))`` and origin ``o = t``; the six channels are ``(o x d, d)``. It is computed at
  the image's pixel size.
- **Pose encoder** (``CameraPoseEncoder(downscale_factor=8, channels=[320, 640, 1280, 1280], nums_rb=2, cin=384,
  ksize=1, sk=True, use_conv=False, temporal_attention_nhead=8, temporal_position_encoding_max_len=16)``): pixel
  unshuffle by 8 (6 -> 384 channels at the latent's size), a 3x3 ``encoder_conv_in``, then per level two units,
  each a residual conv unit (``x + block2(relu(block1(x)))``, ``block1`` 3x3, ``block2`` 1x1; the first unit of
  levels 1.. halves the size with a 2x2 average first and, where the width changes, projects with a 1x1
  ``in_conv``) followed by a temporal transformer block with one self-attention (AnimateDiff's, its own 16-frame
  positional encoding). Each level's output is one feature map: level l at 1/2^l of the latent's size, with the
  width of the UNet's down block l.
- **Where the features go**: into the first attention block (``attention_blocks.0``) of every motion module of the
  down blocks (level l in down block l) and the up blocks (level L-1-l in up block l; CameraCtrl's
  ``decoder_add_posecond``), and the mid block (last level) where a module has one. There the attention input ``h``
  (after the module's norm, ``proj_in``, the block's LayerNorm and the positional encoding) becomes
  ``h + scale * qkv_merge(h + pose)`` for queries, keys and values alike (``PoseAdaptorAttnProcessor`` with
  ``query_condition`` and ``key_value_condition``); ``qkv_merge`` is a Linear C -> C, zero at the start of training.
- Only the pose encoder and the ``qkv_merge`` layers were trained; the motion module is AnimateDiff v3's
  ``v3_sd15_mm.ckpt`` unchanged, inside SD1.5 with the v3 domain-adapter LoRA merged.

Published files (keys and shapes read in the code above; the files themselves were not at hand):

- ``CameraCtrl.ckpt`` (hehao13/CameraCtrl): a pickle ``{"epoch", "global_step", "pose_encoder_state_dict":
  {encoder_* tensors}, "attention_processor_state_dict": {<module>.processor.qkv_merge.weight/bias},
  "optimizer_state_dict"}`` as ``train_camera_control.py`` saves it;
- ``CameraCtrl_pruned.safetensors`` (Kosinkadink/CameraCtrl, the file AnimateDiff-Evolved asks for): the same
  tensors in one flat dictionary.

Pure torch, no host imports; ``ops`` lets the host pass its own layer classes.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import MOTION_KEY, MotionModuleError, _load_pickle, _unwrap, assign, check_finite, read_state_dict
from .motion_module import MotionModuleConfig
from .temporal_transformer import AttentionFn, TemporalTransformerBlock, VersatileAttention, linear, sdpa_attention

PLUCKER_CHANNELS = 6                 # (o x d, d) per pixel
POSE_NUMBERS = 19                    # timestamp, fx fy cx cy, 0 0, 3x4 world-to-camera
DEFAULT_POSE_SIZE = (1280, 720)      # RealEstate10K's videos (inference.py --original_pose_width/height)
MAX_POSE_FRAMES = 4096               # the longest clip the nodes take
MAX_POSE_TEXT = 4 * 1024 * 1024      # bytes: 4096 lines of 19 numbers fit in well under 1 MB
DEFAULT_MAX_FRAMES = 16              # the pose encoder's positional encoding (temporal_position_encoding_max_len)
HEADS = 8                            # temporal_attention_nhead (not in the keys)

ENCODER_PREFIX = "encoder_"
POSE_ENCODER_ENTRY = "pose_encoder_state_dict"                 # CameraCtrl.ckpt's two weight dictionaries
ATTENTION_ENTRY = "attention_processor_state_dict"
MERGE_KEY = re.compile(r"^((?:down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.motion_modules\.(\d+)\.temporal_transformer"
                       r"\.transformer_blocks\.0\.attention_blocks\.0)\.processor\.qkv_merge\.(weight|bias)$")
UNIT_KEY = re.compile(r"^encoder_down_conv_blocks\.(\d+)\.(\d+)\.block1\.weight$")


class CameraCtrlError(MotionModuleError):
    """A CameraCtrl file or pose list this version cannot use; the message names it, the reason and the fix."""


# ---------------------------------------------------------------------------------------------------- poses

@dataclass(frozen=True)
class CameraPoses:
    """One camera per frame: ``intrinsics`` [F, 4] (fx, fy, cx, cy, normalised) and ``world_to_camera`` [F, 4, 4],
    both float64 as parsed."""

    intrinsics: Tensor
    world_to_camera: Tensor
    source: str = "poses"

    def __len__(self) -> int:
        return self.intrinsics.shape[0]

    def at(self, frames) -> "CameraPoses":
        """The poses of clip frames ``frames``; past the last pose the last one holds (the camera stops)."""
        index = torch.tensor([min(int(f), len(self) - 1) for f in frames], dtype=torch.long)
        return CameraPoses(self.intrinsics[index], self.world_to_camera[index], self.source)


def parse_poses(text: str, source: str = "pose text") -> CameraPoses:
    """RealEstate10K pose lines -> CameraPoses. Blank lines and lines starting with '#' are skipped, and so is a
    first line that is not numbers (the source video's URL, which CameraCtrl skips too). Every error names
    ``source`` and the line."""
    if len(text) > MAX_POSE_TEXT:
        raise CameraCtrlError(f"{source}: {len(text):,} characters; a pose list for {MAX_POSE_FRAMES} frames is well "
                              f"under {MAX_POSE_TEXT // (1024 * 1024)} MB. This is not a CameraCtrl pose file.")
    rows, first = [], True
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if first and not _is_number(fields[0]):
            first = False
            continue  # the URL line
        first = False
        if len(rows) == MAX_POSE_FRAMES:
            raise CameraCtrlError(f"{source}, line {number}: more than {MAX_POSE_FRAMES} poses; give at most one per "
                                  "frame of the clip (the last pose holds for frames past the end).")
        rows.append(_pose_numbers(fields, source, number))
    if not rows:
        raise CameraCtrlError(f"{source}: no poses. Give one line per frame: timestamp fx fy cx cy 0 0 and the 12 "
                              "numbers of the 3x4 world-to-camera matrix (RealEstate10K / CameraCtrl pose files).")
    values = torch.tensor(rows, dtype=torch.float64)
    world_to_camera = torch.eye(4, dtype=torch.float64).repeat(len(rows), 1, 1)
    world_to_camera[:, :3, :] = values[:, 7:].view(-1, 3, 4)
    return CameraPoses(values[:, 1:5].clone(), world_to_camera, source)


def read_pose_file(path: str | Path) -> CameraPoses:
    """A pose file (RealEstate10K / CameraCtrl ``assets/pose_files/*.txt``) -> CameraPoses; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CameraCtrlError(f"{path.name}: no such pose file.")
    if path.stat().st_size > MAX_POSE_TEXT:
        raise CameraCtrlError(f"{path.name}: {path.stat().st_size:,} bytes; a pose list for {MAX_POSE_FRAMES} frames "
                              f"is well under {MAX_POSE_TEXT // (1024 * 1024)} MB. This is not a CameraCtrl pose file.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CameraCtrlError(f"{path.name}: not a text file (it is not UTF-8). A pose file holds lines of numbers: "
                              "timestamp fx fy cx cy 0 0 and a 3x4 world-to-camera matrix.") from None
    return parse_poses(text, path.name)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _pose_numbers(fields: list[str], source: str, number: int) -> list[float]:
    where = f"{source}, line {number}"
    if len(fields) != POSE_NUMBERS:
        raise CameraCtrlError(f"{where}: {len(fields)} values, but a pose line has {POSE_NUMBERS}: timestamp, fx fy cx "
                              "cy (normalised), 0 0, then the 12 numbers of the 3x4 world-to-camera matrix, row by row.")
    values = []
    for field_ in fields:
        try:
            value = float(field_)
        except ValueError:
            raise CameraCtrlError(f"{where}: '{field_[:40]}' is not a number.") from None
        if not math.isfinite(value):
            raise CameraCtrlError(f"{where}: '{field_[:40]}' is not a finite number; every pose value must be one.")
        values.append(value)
    if values[1] <= 0 or values[2] <= 0:
        raise CameraCtrlError(f"{where}: focal lengths fx={values[1]:g}, fy={values[2]:g}; both must be above 0 "
                              "(normalised by the frame's width and height, e.g. 0.47 and 0.84).")
    rotation = torch.tensor(values[7:], dtype=torch.float64).view(3, 4)[:, :3]
    if abs(float(torch.linalg.det(rotation))) < 1e-6:
        raise CameraCtrlError(f"{where}: the 3x3 rotation part of the world-to-camera matrix is singular (its "
                              "determinant is 0), so the camera cannot be placed; check the matrix's 12 numbers.")
    return values


def plucker_embedding(poses: CameraPoses, height: int, width: int,
                      pose_size: tuple[int, int] = DEFAULT_POSE_SIZE) -> Tensor:
    """Per-pixel Plücker coordinates of each frame's camera rays, relative to the first pose given:
    [F, 6, height, width] float32, channels (o x d, d). ``pose_size``: (width, height) of the video the
    intrinsics were taken from."""
    if pose_size[0] <= 0 or pose_size[1] <= 0:
        raise CameraCtrlError(f"{poses.source}: the original video size must be positive; got {pose_size}.")
    fx, fy, cx, cy = poses.intrinsics.float().unbind(-1)
    pose_ratio, clip_ratio = pose_size[0] / pose_size[1], width / height
    if pose_ratio > clip_ratio:  # the poses' video is wider: as if resized to the clip's height, sides cropped
        fx = fx * (height * pose_ratio) / width
    else:
        fy = fy * (width / pose_ratio) / height
    fx, fy, cx, cy = fx * width, fy * height, cx * width, cy * height  # in pixels
    camera_to_world = torch.linalg.inv(poses.world_to_camera)
    relative = (poses.world_to_camera[:1] @ camera_to_world).float()  # frame 0 -> identity
    rotation, origin = relative[:, :3, :3], relative[:, :3, 3]
    u = torch.arange(width, dtype=torch.float32) + 0.5   # pixel centres
    v = torch.arange(height, dtype=torch.float32) + 0.5
    x = ((u[None, None, :] - cx[:, None, None]) / fx[:, None, None]).expand(-1, height, -1)  # f h w
    y = ((v[None, :, None] - cy[:, None, None]) / fy[:, None, None]).expand(-1, -1, width)
    directions = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # f h w 3, in the camera
    directions = directions / directions.norm(dim=-1, keepdim=True)
    rays = torch.einsum("fij,fhwj->fhwi", rotation, directions)   # in the world (the first camera)
    moments = torch.linalg.cross(origin[:, None, None, :].expand_as(rays), rays, dim=-1)
    return torch.cat([moments, rays], dim=-1).permute(0, 3, 1, 2).contiguous()  # f 6 h w


# ------------------------------------------------------------------------------------------------ the model

@dataclass(frozen=True)
class CameraCtrlConfig:
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each level = of the UNet's down blocks
    units: int = 2                                       # conv + attention units per level (nums_rb)
    downscale: int = 8                                   # pixel unshuffle: input channels = 6 * downscale^2
    kernel: int = 1                                      # in_conv / block2 kernel (ksize)
    max_frames: int = DEFAULT_MAX_FRAMES                 # the encoder's positional encoding: frames per clip
    merges: dict = field(default_factory=dict, compare=False)  # module path -> width, for each qkv_merge
    name: str = "CameraCtrl"

    def level_of(self, path: str) -> int:
        """Which feature level a module's qkv_merge gets: down block l -> l, up block l -> L-1-l, mid -> L-1."""
        kind, index = path.split(".")[0], path.split(".")[1]
        last = len(self.channels) - 1
        return int(index) if kind == "down_blocks" else last - int(index) if kind == "up_blocks" else last


class PoseUnit(nn.Module):
    """``x + block2(relu(block1(x)))`` after an optional 2x2 average (``down``) and 1x1 width change (``in_conv``)."""

    def __init__(self, channels_in: int, channels: int, down: bool, kernel: int, ops=nn):
        super().__init__()
        self.down = down
        self.in_conv = ops.Conv2d(channels_in, channels, kernel, padding=kernel // 2) if channels_in != channels else None
        self.block1 = ops.Conv2d(channels, channels, 3, padding=1)
        self.block2 = ops.Conv2d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


def pose_attention_block(channels: int, max_len: int, ops=nn) -> TemporalTransformerBlock:
    """AnimateDiff's transformer block with one self-attention (``attention_block_types: ["Temporal_Self"]``)."""
    block = TemporalTransformerBlock(channels, HEADS, max_len, ops)
    del block.attention_blocks[1]
    del block.norms[1]
    return block


class CameraPoseEncoder(nn.Module):
    """Plücker embeddings -> one feature map per level. Keys ``encoder_conv_in.*``, ``encoder_down_conv_blocks.<l>.
    <u>.*``, ``encoder_down_attention_blocks.<l>.<u>.*`` as published."""

    def __init__(self, config: CameraCtrlConfig, ops=nn):
        super().__init__()
        self.config = config
        widths = config.channels
        self.encoder_conv_in = ops.Conv2d(PLUCKER_CHANNELS * config.downscale ** 2, widths[0], 3, padding=1)
        self.encoder_down_conv_blocks = nn.ModuleList(
            nn.ModuleList(PoseUnit(widths[max(level - 1, 0)] if unit == 0 else width, width, unit == 0 and level > 0,
                                   config.kernel, ops) for unit in range(config.units))
            for level, width in enumerate(widths))
        self.encoder_down_attention_blocks = nn.ModuleList(
            nn.ModuleList(pose_attention_block(width, config.max_frames, ops) for _ in range(config.units))
            for width in widths)

    def encode(self, plucker: Tensor, frames: int, attention: AttentionFn = sdpa_attention) -> list[Tensor]:
        """``plucker`` [(n f), 6, H, W] for n clips of ``frames`` frames (each clip's poses relative to its own
        first frame) -> per level [(n f), C_l, H / (8 * 2^l), W / (8 * 2^l)]."""
        if frames > self.config.max_frames:
            raise CameraCtrlError(
                f"{self.config.name}: the pose encoder takes at most {self.config.max_frames} frames at once (its "
                f"positional encoding), but the motion module sees {frames}. Sample with Context Windows of "
                f"context_length {self.config.max_frames} or less (CameraCtrl was trained on 16-frame clips).")
        x = self.encoder_conv_in(F.pixel_unshuffle(plucker, self.config.downscale))
        features = []
        for convs, blocks in zip(self.encoder_down_conv_blocks, self.encoder_down_attention_blocks):
            for conv, block in zip(convs, blocks):
                x = conv(x)
                nf, c, h, w = x.shape
                # (n f) c h w -> (n h w) f c
                tokens = x.reshape(nf // frames, frames, c, h * w).permute(0, 3, 1, 2).reshape(-1, frames, c)
                tokens = block(tokens, attention)
                # (n h w) f c -> (n f) c h w
                x = tokens.reshape(nf // frames, h * w, frames, c).permute(0, 2, 3, 1).reshape(nf, c, h, w)
            features.append(x)
        return features


class CameraCtrl(CameraPoseEncoder):
    """The pose encoder plus one ``qkv_merge`` Linear per conditioned motion module, held at the published path
    (``down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.
    qkv_merge``), so ``state_dict()`` has exactly the published keys."""

    def __init__(self, config: CameraCtrlConfig, ops=nn):
        super().__init__(config, ops)
        for path, width in config.merges.items():
            holder = self
            for name in f"{path}.processor".split("."):
                if name not in holder._modules:
                    holder.add_module(name, nn.Module())
                holder = holder._modules[name]
            holder.add_module("qkv_merge", ops.Linear(width, width))

    def merges(self) -> list[tuple[str, nn.Module]]:
        """(motion-module attention path, its qkv_merge) in the file's order."""
        return [(path, self.get_submodule(f"{path}.processor.qkv_merge")) for path in self.config.merges]


def conditioned_attention(attn: VersatileAttention, merge: nn.Module, x: Tensor, pose: Tensor, scale: float,
                          attention: AttentionFn) -> Tensor:
    """A motion module's ``attention_blocks.0`` with CameraCtrl: ``h = x + pe``; q, k and v all read
    ``h + scale * qkv_merge(h + pose)`` (PoseAdaptorAttnProcessor). ``x``: (b h w) f c, fresh (the LayerNorm's
    output); ``pose``: the same tokens for one cond/uncond chunk, [(n h w), f, c] with b = chunks * n."""
    x = x.add_(attn.pos_encoder.encoding(x.shape[1]).to(x.dtype))
    chunks = x.shape[0] // pose.shape[0]
    posed = (x.view(chunks, *pose.shape) + pose.to(x.dtype)).view(x.shape)  # every chunk gets the same poses
    weight_dtype = getattr(merge, "weight").dtype
    merged = linear(merge, posed if posed.dtype == weight_dtype else posed.to(weight_dtype)).to(x.dtype)
    x = x.add_(merged, alpha=scale)
    return linear(attn.to_out[0], attention(*attn.qkv(x), attn.heads))


# -------------------------------------------------------------------------------------------------- loading

def read_camera_ctrl(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a CameraCtrl file in one flat dictionary: a flat file as it is, ``CameraCtrl.ckpt``'s two
    weight dictionaries merged (the shared reader keeps only top-level tensors, so the pickle is opened again)."""
    path = Path(path)
    sd = read_state_dict(path)
    if not any(k.startswith(ENCODER_PREFIX) for k in sd) and path.suffix.lower() != ".safetensors":
        obj = _load_pickle(path)  # already read once above without error: a weights_only pickle
        if isinstance(obj, dict) and isinstance(obj.get(POSE_ENCODER_ENTRY), dict):
            sd = {**_unwrap(obj[POSE_ENCODER_ENTRY], path.name),
                  **(_unwrap(obj[ATTENTION_ENTRY], path.name) if isinstance(obj.get(ATTENTION_ENTRY), dict) else {})}
    return sd


def detect(sd: dict[str, Tensor], name: str) -> CameraCtrlConfig:
    """The shape of a CameraCtrl state dict, or CameraCtrlError saying what the file is."""
    encoder = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
    merges = {k: v for k, v in sd.items() if "qkv_merge" in k}
    if not encoder and not merges:
        raise CameraCtrlError(f"{name}: this file is {_what_else(sd)}, not a CameraCtrl model (no encoder_* pose "
                              "encoder and no qkv_merge keys). Load CameraCtrl_pruned.safetensors or CameraCtrl.ckpt.")
    if not encoder:
        raise CameraCtrlError(f"{name}: has qkv_merge layers but no pose encoder (encoder_* keys); CameraCtrl needs "
                              "both. The file is incomplete: use CameraCtrl_pruned.safetensors or CameraCtrl.ckpt.")
    if not merges:
        raise CameraCtrlError(f"{name}: has a pose encoder but no qkv_merge layers (the part that goes into the "
                              "motion modules). The file is incomplete: use CameraCtrl_pruned.safetensors or "
                              "CameraCtrl.ckpt.")
    conv_in = _shape(sd, "encoder_conv_in.weight", 4, name)
    downscale = math.isqrt(conv_in[1] // PLUCKER_CHANNELS)
    if PLUCKER_CHANNELS * downscale ** 2 != conv_in[1] or downscale < 1:
        raise CameraCtrlError(f"{name}: encoder_conv_in takes {conv_in[1]} channels; CameraCtrl's takes 6 Plücker "
                              "channels pixel-unshuffled (6 x 8 x 8 = 384). This is another kind of model.")
    units: dict[int, dict[int, int]] = defaultdict(dict)
    for key in encoder:
        m = UNIT_KEY.match(key)
        if m:
            units[int(m.group(1))][int(m.group(2))] = _shape(sd, key, 4, name)[0]
    levels = sorted(units)
    counts = {len(units[level]) for level in levels}
    if not levels or levels != list(range(len(levels))) or len(counts) != 1:
        raise CameraCtrlError(f"{name}: the pose encoder's levels/units {dict(units)} are not numbered 0..n with the "
                              "same number of units each; the file is damaged.")
    widths = tuple(units[level][0] for level in levels)
    if any(set(units[level].values()) != {widths[level]} for level in levels) or widths[0] != conv_in[0]:
        raise CameraCtrlError(f"{name}: the pose encoder's widths {dict(units)} do not agree within a level or with "
                              f"encoder_conv_in ({conv_in[0]}); the file is damaged.")
    if any(k.startswith("encoder_down_conv_blocks.") and ".skep." in k for k in encoder):
        raise CameraCtrlError(f"{name}: a pose encoder with skip convolutions (skep, sk=False), a variant that was "
                              "not published with CameraCtrl for AnimateDiff; this version does not know it.")
    kernel = _shape(sd, "encoder_down_conv_blocks.0.0.block2.weight", 4, name)[-1]
    pe = sd.get("encoder_down_attention_blocks.0.0.attention_blocks.0.pos_encoder.pe")
    config = CameraCtrlConfig(widths, counts.pop(), downscale, kernel,
                              pe.shape[1] if pe is not None and pe.dim() == 3 else DEFAULT_MAX_FRAMES, {}, name)
    for key in merges:
        m = MERGE_KEY.match(key)
        if m is None:
            raise CameraCtrlError(f"{name}: qkv_merge key '{key}' is not on an AnimateDiff motion module's first "
                                  "attention block; this CameraCtrl is for another video model (e.g. CameraCtrl for "
                                  "Stable Video Diffusion, the repository's svd branch), not for AnimateDiff.")
        path = m.group(1)
        if m.group(5) == "weight":
            shape = _shape(sd, key, 2, name)
            level = config.level_of(path)
            width = widths[level] if 0 <= level < len(widths) else None
            bias = sd.get(f"{path}.processor.qkv_merge.bias")
            if shape[0] != shape[1] or shape[0] != width or bias is None or list(bias.shape) != [width]:
                raise CameraCtrlError(f"{name}: {path}'s qkv_merge is {list(shape)}, but its block's pose features "
                                      f"are {width} wide (a [{width}, {width}] weight and a [{width}] bias); the file "
                                      "is damaged or from another model.")
            config.merges[path] = width
    return config


def _shape(sd: dict[str, Tensor], key: str, dims: int, name: str) -> tuple[int, ...]:
    value = sd.get(key)
    if value is None:
        raise CameraCtrlError(f"{name}: no '{key}'; the pose encoder is incomplete, so the file is damaged or another "
                              "kind of model.")
    if value.dim() != dims:
        raise CameraCtrlError(f"{name}: '{key}' has shape {list(value.shape)}, not {dims}-D; the file is damaged.")
    return tuple(value.shape)


def _what_else(sd: dict[str, Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "a Stable Diffusion checkpoint (load it with Load Checkpoint)"
    if any(MOTION_KEY.match(k) for k in keys):
        return "an AnimateDiff motion module (load it with Load Motion Module; CameraCtrl goes with AnimateDiff v3's)"
    if any(k.startswith("controlnet_") for k in keys):
        return "a ControlNet or SparseCtrl model"
    return f"another kind of file (first keys: {', '.join(keys[:3]) or 'no tensors at all'})"


def check_fits(config: CameraCtrlConfig, motion: MotionModuleConfig) -> None:
    """Refuse a motion module that lacks a module CameraCtrl conditions, or has another width there."""
    motion_name = motion.extra.get("name", motion.family)
    for path, width in config.merges.items():
        m = MERGE_KEY.match(f"{path}.processor.qkv_merge.weight")
        index, j = int(m.group(2) or m.group(3) or 0), int(m.group(4))
        kind = path.split(".")[0]
        blocks = {"down_blocks": motion.down, "up_blocks": motion.up, "mid_block": (motion.mid,)}[kind]
        have = blocks[index][j] if index < len(blocks) and j < len(blocks[index]) else None
        if have != width:
            raise CameraCtrlError(
                f"{config.name} conditions the motion module at {path.split('.temporal_transformer')[0]} ({width} "
                f"channels), but "
                f"'{motion_name}' ({motion.family}, {motion.base}) " + (f"has {have} channels there" if have else
                "has no module there") + ". CameraCtrl was trained with AnimateDiff v3 for SD1.5 (v3_sd15_mm.ckpt): "
                "load that module in Load Motion Module.")


def build(sd: dict[str, Tensor], config: CameraCtrlConfig, ops=nn) -> CameraCtrl:
    """The model holding the file's tensors themselves (built on the meta device, then assigned); tensors other than
    the pose encoder and the qkv_merge layers (an optimizer state, motion modules) are left out."""
    weights = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX) or MERGE_KEY.match(k)}
    try:
        check_finite(weights, config.name)
    except MotionModuleError as e:
        raise CameraCtrlError(str(e)) from None
    with torch.device("meta"):
        model = CameraCtrl(config, ops)
    return assign(model, weights, config.name, "CameraCtrl", pe_optional=True, error=CameraCtrlError)


def load_camera_ctrl(path: str | Path, ops=nn) -> CameraCtrl:
    name = Path(path).name
    sd = read_camera_ctrl(path)
    return build(sd, detect(sd, name), ops)

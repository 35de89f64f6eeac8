"""Reading motion-module files safely and telling what they are.

The published files (formats.md in the team's shared docs) are ``.ckpt``/``.pt``/``.pth`` pickles or
``.safetensors``, fp32/fp16/bf16, flat or wrapped in ``{"state_dict": ...}``, sometimes with ``module.``
prefixes or non-tensor entries. Every AnimateDiff family shares one key grammar; the family is read from
which blocks exist, the channel widths and the positional-encoding length. Files of other kinds that users
pick by mistake are named in the error, with where they belong.
"""
from __future__ import annotations

import pickle
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .diffusers_format import from_diffusers, is_diffusers_layout
from .motion_module import ANIMATELCM_I2V, PIA, PIA_INPUT_CHANNELS, MotionModule, MotionModuleConfig
from .temporal_transformer import PositionalEncoding, sinusoidal_encoding


class MotionModuleError(ValueError):
    """A file that cannot be used as a motion module; the message names the file, the reason and the fix."""


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
MOTION_KEY = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.motion_modules\.(\d+)\.")
NORM_KEY = re.compile(r"^(?:(down|up)_blocks\.(\d+)|mid_block)\.motion_modules\.(\d+)\.temporal_transformer\.norm\.weight$")
HOTSHOT_KEY = re.compile(r"^((?:down|up)_blocks\.\d+)\.temporal_attentions\.(\d+)\.")
ANIMATELCM_MAX_FRAMES = 64  # AnimateLCM files carry no encoding; its code uses a 64-long table

SD15 = dict(down=((320, 320), (640, 640), (1280, 1280), (1280, 1280)),
            up=((1280,) * 3, (1280,) * 3, (640,) * 3, (320,) * 3))
SDXL = dict(down=((320, 320), (640, 640), (1280, 1280)), up=((1280,) * 3, (640,) * 3, (320,) * 3))

# The published layouts, for building files (tests, the demo job, training from scratch).
LAYOUTS = {
    "AnimateDiff v1": MotionModuleConfig("AnimateDiff v1", "SD1.5", mid=(), max_frames=24, **SD15),
    "AnimateDiff v2": MotionModuleConfig("AnimateDiff v2", "SD1.5", mid=(1280,), max_frames=32, **SD15),
    "AnimateDiff v3": MotionModuleConfig("AnimateDiff v3", "SD1.5", mid=(), max_frames=32, **SD15),
    "AnimateLCM": MotionModuleConfig("AnimateLCM", "SD1.5", mid=(1280,), max_frames=ANIMATELCM_MAX_FRAMES,
                                     pe_in_file=False, **SD15),
    "AnimateDiff SDXL beta": MotionModuleConfig("AnimateDiff SDXL beta", "SDXL", mid=(), max_frames=32,
                                                norm_across_frames=True, **SDXL),
    "HotshotXL": MotionModuleConfig("HotshotXL", "SDXL", mid=(), max_frames=24, **SDXL),
    # Image to video: PIA was trained from v2 with a 32-frame table; whether pia.ckpt has a mid block is not
    # published, so detect() takes either. AnimateLCM-I2V is AnimateLCM (no table in the file) + img_encoder.
    PIA: MotionModuleConfig(PIA, "SD1.5", mid=(), max_frames=32, **SD15),
    ANIMATELCM_I2V: MotionModuleConfig(ANIMATELCM_I2V, "SD1.5", mid=(1280,), max_frames=ANIMATELCM_MAX_FRAMES,
                                       pe_in_file=False, **SD15),
}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, unwrapped; pickles load with ``weights_only`` so no code runs.

    Messages name the file, never its folder: the suffix is checked before the file is looked at, and only
    the name is echoed, so the reply tells a client nothing about other paths on the server.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise MotionModuleError(f"{path.name}: unknown file type {path.suffix!r}; motion modules are {', '.join(SUFFIXES)} files.")
    if not path.is_file():
        raise MotionModuleError(f"{path.name}: no such file.")
    if path.stat().st_size == 0:
        raise MotionModuleError(f"{path.name}: the file is empty (0 bytes). Download it again.")
    try:
        if path.suffix.lower() == ".safetensors":
            obj = load_file(path)
        else:
            obj = _load_pickle(path)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise MotionModuleError(
            f"{path.name}: refused to load. The pickle holds objects other than tensors, and loading it could run "
            f"code ({_without_folder(reason, path)}). Use a .safetensors copy of this model, or only load .ckpt "
            f"files from sources you trust after converting them to .safetensors.") from None
    except Exception as e:  # truncated zip, bad header, not a checkpoint at all: all read as "damaged file"
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise MotionModuleError(
            f"{path.name}: cannot be read as a {path.suffix} checkpoint ({type(e).__name__}: "
            f"{_without_folder(detail, path)}). The file is probably truncated (an interrupted download) or not a "
            "model file; download it again.") from None
    return _unwrap(obj, path.name)


def _without_folder(text: str, path: Path) -> str:
    """``text`` with the file's full path cut down to its name (library messages may quote the path)."""
    return text.replace(str(path.resolve()), path.name).replace(str(path), path.name)


def _load_pickle(path: Path):
    try:  # mmap keeps a single copy of the weights: the module takes the mapped tensors as they are
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 (non-zip) pickles


# Bounds on walking what a pickle built: a file may hold a dict that contains itself (a loop), nests without
# end, or holds millions of entries. Published files wrap at most twice ({"state_dict": ...}, {"module": ...})
# and hold about a thousand tensors (a full SD checkpoint, which is named and refused, a few thousand).
MAX_WRAPPING = 8
MAX_ENTRIES = 100_000


def _unwrap(obj, name: str) -> dict[str, Tensor]:
    wrappers = set()
    while isinstance(obj, dict):
        if isinstance(obj.get("state_dict"), dict):
            inner = obj["state_dict"]
        elif len(obj) == 1 and isinstance(next(iter(obj.values())), dict):  # e.g. {"module": {...}}
            inner = next(iter(obj.values()))
        else:
            break
        wrappers.add(id(obj))
        if id(inner) in wrappers or len(wrappers) > MAX_WRAPPING:
            problem = "contains itself" if id(inner) in wrappers else f"is wrapped more than {MAX_WRAPPING} times"
            raise MotionModuleError(f"{name}: refused to load: its dictionary of weights {problem}, which no "
                                    "published file does. The file is damaged or was made to stall the loader; "
                                    "download the model again from its publisher.")
        obj = inner
    if not isinstance(obj, dict):
        raise MotionModuleError(f"{name}: holds a {type(obj).__name__}, not a dictionary of weights.")
    if len(obj) > MAX_ENTRIES:
        raise MotionModuleError(f"{name}: holds {len(obj):,} entries; a motion module has about a thousand. "
                                "It is not a model file this node can use.")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}  # drops e.g. animatediff_config
    # AnimateDiff's own train.py saves the DDP-wrapped UNet: every key starts with "module.".
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    # --- hook: diffusers MotionAdapter files (diffusion_pytorch_model.safetensors) -> published names ---
    if is_diffusers_layout(tensors):
        try:
            tensors = from_diffusers(tensors)
        except ValueError as e:
            raise MotionModuleError(f"{name}: a diffusers MotionAdapter file of a layout this version does not "
                                    f"know ({e}).") from None
    # --- end hook (see diffusers_format.py) ---
    # HotshotXL names its modules temporal_attentions.N and its table positional_encoding.
    if any(HOTSHOT_KEY.match(k) for k in tensors):
        tensors = {HOTSHOT_KEY.sub(r"\1.motion_modules.\2.temporal_transformer.", k)
                   .replace("pos_encoder.positional_encoding", "pos_encoder.pe"): v for k, v in tensors.items()}
        tensors["__hotshot__"] = torch.empty(0)  # remembered for detect(); dropped before loading
    return tensors


def _not_a_motion_module(sd: dict[str, Tensor]) -> str | None:
    """What a file that is not a motion module is, and where it belongs; None for a motion module."""
    keys = list(sd)
    def has(pred) -> bool:
        return any(pred(k) for k in keys)
    if has(lambda k: k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))):
        return "a Stable Diffusion checkpoint. Put it in models/checkpoints and load it with Load Checkpoint"
    if has(lambda k: k.startswith(("controlnet_cond_embedding", "controlnet_down_blocks"))):
        return ("a SparseCtrl model (a ControlNet for AnimateDiff v3). Put it in models/controlnet and load it with "
                "Load SparseCtrl (AnimateDiff), then give it keyframe images with Apply SparseCtrl (AnimateDiff)")
    if has(lambda k: "qkv_merge" in k):
        return ("a CameraCtrl model (pose encoder), not a motion module. Load it with Load CameraCtrl (AnimateDiff) "
                "and give it poses with Apply CameraCtrl Poses; load v3_sd15_mm.ckpt here")
    lora = has(lambda k: "_lora." in k or ".lora_" in k or k.startswith(("lora_unet_", "lora_te")) or ".lora_A." in k)
    if lora and has(lambda k: "motion_modules." in k):
        return "a motion LoRA. Put it in models/animatediff_motion_lora; it is applied on top of a motion module"
    if lora:
        return ("a LoRA for the image model (the AnimateDiff v3 domain adapter is one). Put it in models/loras and "
                "apply it with Load LoRA")
    if not has(MOTION_KEY.match):
        sample = ", ".join(keys[:3]) or "no tensors at all"
        return f"not an AnimateDiff motion module (no 'motion_modules' keys; first keys: {sample})"
    return None


def detect(sd: dict[str, Tensor], name: str) -> MotionModuleConfig:
    """Family, base and shape of a motion-module state dict, or MotionModuleError saying what the file is."""
    what = _not_a_motion_module(sd)
    if what:
        raise MotionModuleError(f"{name}: this file is {what}.")
    widths: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
    for key, value in sd.items():
        m = NORM_KEY.match(key)
        if m:
            if value.dim() != 1 or value.numel() == 0:
                raise MotionModuleError(f"{name}: tensor '{key}' has shape {list(value.shape)}, but a norm weight is "
                                        "a list of channel scales; the file is damaged, download it again.")
            kind, index, j = m.group(1) or "mid", int(m.group(2) or 0), int(m.group(3))
            widths[(kind, index)][j] = value.shape[0]

    def blocks(kind: str) -> tuple[tuple[int, ...], ...]:
        found = sorted(i for k, i in widths if k == kind)
        if found != list(range(len(found))):
            raise MotionModuleError(f"{name}: {kind} blocks {found} are not numbered 0..n; the file is damaged.")
        return tuple(tuple(widths[(kind, i)][j] for j in sorted(widths[(kind, i)])) for i in found)

    down, up, mid = blocks("down"), blocks("up"), blocks("mid")
    base = {4: "SD1.5", 3: "SDXL"}.get(len(down))
    if base is None or len(up) != len(down):
        raise MotionModuleError(f"{name}: {len(down)} down and {len(up)} up blocks match neither SD1.5 (4) nor SDXL (3).")
    encodings = {k: v for k, v in sd.items() if k.endswith("pos_encoder.pe")}
    for key, value in encodings.items():  # [1, frames, channels]; no frames would only fail when sampling
        if value.dim() != 3 or value.shape[0] != 1 or value.shape[1] == 0 or value.shape[2] == 0:
            raise MotionModuleError(f"{name}: positional encoding '{key}' has shape {list(value.shape)}, not "
                                    "[1, frames, channels] with at least one frame; the file is damaged, download "
                                    "it again.")
    pe = next(iter(encodings.values()), None)
    image_family = _image_to_video_family(sd, name, base, down)
    if image_family:
        family = image_family
    elif "__hotshot__" in sd:
        family = "HotshotXL"
    elif base == "SDXL":
        family = "AnimateDiff SDXL beta"
    elif pe is None:
        family = "AnimateLCM"
    elif mid:
        family = "AnimateDiff v2"
    else:
        family = "AnimateDiff v1" if pe.shape[1] == 24 else "AnimateDiff v3"
    layout = LAYOUTS[family]
    return MotionModuleConfig(
        family, base, down=down, mid=mid[0] if mid else (), up=up,
        max_frames=pe.shape[1] if pe is not None else ANIMATELCM_MAX_FRAMES,
        heads=layout.heads, norm_across_frames=layout.norm_across_frames, pe_in_file=pe is not None,
        extra={"name": name})


def _image_to_video_family(sd: dict[str, Tensor], name: str, base: str, down) -> str | None:
    """PIA (a top-level conv_in) or AnimateLCM-I2V (img_encoder.*), checked against the base and the first block's
    width; None for the other families."""
    family = PIA if "conv_in.weight" in sd else ANIMATELCM_I2V if any(k.startswith("img_encoder.") for k in sd) else None
    if family is None:
        return None
    if base != "SD1.5":
        raise MotionModuleError(f"{name}: a {family} file with {base}-shaped motion modules; {family} exists only for "
                                "SD1.5, so the file is damaged or not what its keys say.")
    if family == PIA:
        width = down[0][0]
        weight, bias = sd["conv_in.weight"], sd.get("conv_in.bias")
        if list(weight.shape) != [width, PIA_INPUT_CHANNELS, 3, 3] or bias is None or list(bias.shape) != [width]:
            raise MotionModuleError(
                f"{name}: conv_in.weight has shape {list(weight.shape)} and conv_in.bias "
                f"{list(bias.shape) if bias is not None else 'is missing'}; PIA's input layer is [{width}, "
                f"{PIA_INPUT_CHANNELS}, 3, 3] (latent, mask and image latent into the first block's {width} channels) "
                f"with a [{width}] bias. A whole UNet or another model's file is not a PIA module.")
    return family


def check_finite(tensors: dict[str, Tensor], name: str) -> None:
    """Refuse NaN/inf weights (they would give an all-NaN clip reported as success): one pass, no copies, so
    memory-mapped tensors stay mapped."""
    for key, value in tensors.items():
        if value.is_floating_point() and not value.is_meta and not _all_finite(value):
            raise MotionModuleError(f"{name}: tensor '{key}' holds NaN/inf values; the file is damaged, download "
                                    "it again.")


def _all_finite(value: Tensor) -> bool:
    """``torch.isfinite(value).all()`` without its temporaries (on the CPU an abs copy and three masks, 7 bytes
    per float32 value, which the allocator then keeps: issue 16). A sum is NaN or inf whenever a term is, so
    only a non-finite sum (a bad value, or finite values that overflowed) needs the values looked at."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def build_module(sd: dict[str, Tensor], config: MotionModuleConfig, ops=nn) -> MotionModule:
    """The module holding the given tensors themselves (no copy): built on the meta device, then assigned."""
    name = config.extra.get("name", "motion module")
    image_input = {PIA: ("conv_in.",), ANIMATELCM_I2V: ("img_encoder.",)}.get(config.family, ())
    weights = {k: v for k, v in sd.items() if MOTION_KEY.match(k) or k.startswith(image_input)}
    check_finite(weights, name)
    with torch.device("meta"):
        module = MotionModule(config, ops)
    return assign(module, weights, name, config.family, pe_optional=not config.pe_in_file)


def assign(module: nn.Module, sd: dict[str, Tensor], name: str, layout: str, pe_optional: bool,
           error: type[MotionModuleError] = MotionModuleError) -> nn.Module:
    """``module``, built on the meta device, holding ``sd``'s tensors themselves; keys and shapes must be
    ``layout``'s exactly. Positional encodings a file may leave out (``pe_optional``) are regenerated: they are a
    fixed sinusoid."""
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise error(f"{name}: tensor shapes do not match the {layout} layout ({e}).") from None
    if pe_optional:
        missing = [k for k in missing if not k.endswith("pos_encoder.pe")]
    if missing or unexpected:
        raise error(f"{name}: keys do not match the {layout} layout (missing: {missing[:3]}, unexpected: "
                    f"{unexpected[:3]}). The file is damaged or a variant this version does not know.")
    for encoding in module.modules():
        if isinstance(encoding, PositionalEncoding) and encoding.pe.is_meta:
            encoding.pe = sinusoidal_encoding(encoding.pe.shape[1], encoding.pe.shape[-1])
    return module.eval().requires_grad_(False)


def load_motion_module(path: str | Path, ops=nn) -> MotionModule:
    sd = read_state_dict(path)
    return build_module(sd, detect(sd, Path(path).name), ops)


def published_state_dict(module: MotionModule) -> dict[str, Tensor]:
    """Keys and tensors exactly as the published files lay them out (HotshotXL saved in AnimateDiff names)."""
    sd = module.state_dict()
    if not module.config.pe_in_file:
        sd = {k: v for k, v in sd.items() if not k.endswith("pos_encoder.pe")}
    return sd

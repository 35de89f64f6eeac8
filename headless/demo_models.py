"""Clearly labelled random-weight stand-ins for the real model files, so the whole path runs on a machine that
has none: a full SD1.5 checkpoint (UNet, CLIP-L, VAE with the real key layout, built from the host's own model
classes) and an AnimateDiff v2 motion module in the published layout. They make noise, not pictures."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .extension import import_extension_module

CHECKPOINT = "RANDOM-WEIGHTS_sd15_for-testing.safetensors"
MOTION_MODULE = "RANDOM-WEIGHTS_mm_sd_v15_v2_for-testing.safetensors"
LABEL = {"description": "RANDOM WEIGHTS with the real key layout, made for testing the pipeline; produces noise."}


def _random_like(name: str, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Weights whose activations neither vanish nor explode: 1/sqrt(fan_in) matrices, unit norms, zero biases."""
    if t.dim() == 1:  # every 1-D weight here is a norm's scale (in_layers.0, out.0, norm1, ...)
        return (torch.ones if name.endswith("weight") else torch.zeros)(t.shape, dtype=torch.float16)
    fan_in = math.prod(t.shape[1:])
    return (torch.randn(t.shape, generator=generator) / math.sqrt(fan_in)).half()


def _randomize(meta_sd: dict, prefix: str, generator: torch.Generator, keep: dict | None = None) -> dict:
    keep = keep or {}
    return {prefix + k: keep[k] if k in keep else _random_like(k, v, generator) for k, v in meta_sd.items()}


def sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet_config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2] * 4,
                       channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                       transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                       use_spatial_transformer=True, use_linear_in_transformer=False, context_dim=768, legacy=False)
    vae_config = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        unet = UNetModel(**unet_config, operations=comfy.ops.disable_weight_init, device="meta").state_dict()
        vae = AutoencoderKL(ddconfig=vae_config, embed_dim=4).state_dict()
        clip = comfy.sd1_clip.SDClipModel(device="meta").state_dict()
    generator = torch.Generator().manual_seed(seed)
    position_ids = {"transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    return {**_randomize(unet, "model.diffusion_model.", generator),
            **_randomize(vae, "first_stage_model.", generator),
            **_randomize({k: v for k, v in clip.items() if "text_projection" not in k and "logit_scale" not in k},
                         "cond_stage_model.", generator, keep=position_ids)}


def motion_module_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    mm = import_extension_module("motion_modules")
    with torch.device("meta"):
        meta = mm.published_state_dict(mm.MotionModule(mm.LAYOUTS["AnimateDiff v2"]))
    generator = torch.Generator().manual_seed(seed)
    return {k: mm.sinusoidal_encoding(v.shape[1], v.shape[2]).half() if k.endswith("pos_encoder.pe")
            else _random_like(k, v, generator) for k, v in meta.items()}


def _save(sd: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file(sd, tmp, metadata=LABEL)
    os.replace(tmp, path)  # never leave a half-written model where a loader would pick it up


def ensure_random_models(models_dir: Path) -> dict[str, Path]:
    """Write the stand-ins under models_dir (checkpoints/, animatediff_models/) unless they exist already."""
    paths = {"checkpoint": Path(models_dir) / "checkpoints" / CHECKPOINT,
             "motion_module": Path(models_dir) / "animatediff_models" / MOTION_MODULE}
    for kind, path in paths.items():
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(sd15_state_dict() if kind == "checkpoint" else motion_module_state_dict(), path)
    return paths


def pick_models(models_dir: Path) -> tuple[dict[str, str], bool]:
    """A real checkpoint and motion module from models_dir when there are some, else the random stand-ins
    (created once). Returns ({"checkpoint": name, "motion_module": name}, whether random ones are used)."""
    folders = {"checkpoint": "checkpoints", "motion_module": "animatediff_models"}
    found = {}
    for kind, folder in folders.items():
        files = sorted(p.name for p in (Path(models_dir) / folder).glob("*")
                       if p.suffix in (".safetensors", ".ckpt", ".pt", ".pth") and not p.name.startswith("RANDOM-WEIGHTS"))
        if files:
            found[kind] = files[0]
    if len(found) == len(folders):
        return found, False
    paths = ensure_random_models(models_dir)
    return {kind: paths[kind].name for kind in folders}, True

"""SparseCtrl models and files for tests: the published key names and shapes (formats.md §2.7) at any width."""
from __future__ import annotations

import torch

from adm.motion_modules.sparse_ctrl import RGB, SCRIBBLE, SparseCtrlConfig, SparseCtrlModel

# Matches tests/unets.py's tiny SD1.5 UNet (widths 32/64/128/128, context 32).
TINY = dict(channels=(32, 64, 128, 128), context_dim=32, embedding_channels=(8, 16, 32, 32))
FULL = dict(channels=(320, 640, 1280, 1280), context_dim=768, embedding_channels=(16, 32, 96, 256))


def config(kind: str = RGB, **overrides) -> SparseCtrlConfig:
    fields = dict(TINY, kind=kind, condition_channels=4 if kind == RGB else 3, name=f"tiny_sparsectrl_{kind}.ckpt")
    fields.update(overrides)
    return SparseCtrlConfig(**fields)


def random_model(cfg: SparseCtrlConfig, seed: int = 0, zero_scale: float = 0.5) -> SparseCtrlModel:
    """Random weights as a trained model has them: norms around 1, zero convs and motion-module output
    projections non-zero (they start at zero in training), so every path carries signal."""
    torch.manual_seed(seed)
    model = SparseCtrlModel(cfg).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            if name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                torch.nn.init.normal_(p, std=0.05)
        elif name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            torch.nn.init.normal_(p, std=zero_scale / p[0].numel() ** 0.5)
        else:  # variance-keeping, so the condition's content carries through the depth
            torch.nn.init.normal_(p, std=(1.0 / p[0].numel()) ** 0.5)
    return model


def state_dict(cfg: SparseCtrlConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in random_model(cfg, seed).state_dict().items()}


def save(path, sd: dict[str, torch.Tensor], wrap: str = "flat") -> None:
    """As the published .ckpt (flat, or {"controlnet": ..., "animatediff_config": ...} as AnimateDiff's loader
    expects) or as .safetensors."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif wrap == "controlnet":
        torch.save({"controlnet": sd, "animatediff_config": {"note": "dummy"}}, path)
    else:
        torch.save(sd, path)


__all__ = ["FULL", "RGB", "SCRIBBLE", "TINY", "config", "random_model", "save", "state_dict"]

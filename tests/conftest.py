"""Test set-up: the repository is imported as the package ``adm`` (the folder name is arbitrary, as in
ComfyUI's custom_nodes), and the host tree (COMFYUI_DIR, default .host/ComfyUI) is put on sys.path."""
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", ROOT / ".host" / "ComfyUI")).resolve()

if not (COMFYUI_DIR / "comfy").is_dir():
    raise pytest.UsageError(f"No ComfyUI tree at {COMFYUI_DIR}: run `bash scripts/setup.sh` first, "
                            "or set COMFYUI_DIR to your ComfyUI folder.")
sys.path.insert(0, str(COMFYUI_DIR))
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (unets.py)

# Register the repository as package "adm" without running its __init__ (which registers nodes with the
# host); tests import the layer they test, e.g. `from adm.motion_modules import ...`.
_pkg = types.ModuleType("adm")
_pkg.__path__ = [str(ROOT)]
sys.modules.setdefault("adm", _pkg)

# The host picks CUDA unless told otherwise; on a machine without a GPU it must be told.
from comfy.cli_args import args as _host_args  # noqa: E402

if not torch.cuda.is_available():
    _host_args.cpu = True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

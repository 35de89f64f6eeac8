"""The extension's packages, for command-line tools. The repository is a package only when ComfyUI imports it
(under whatever its folder is called), so a tool run as ``python -m headless`` registers it under a fixed name
first; when headless is itself imported as ``<package>.headless`` (tests), that package is used, so every
class exists once."""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "animatediff_motion"


def import_extension_module(name: str) -> types.ModuleType:
    """``import_extension_module("motion_modules")`` -> the extension's ``motion_modules`` package."""
    parent = (__package__ or "").rpartition(".")[0]
    if not parent:
        parent = NAME
        if NAME not in sys.modules:
            package = types.ModuleType(NAME)
            package.__path__ = [str(ROOT)]
            sys.modules[NAME] = package
    return importlib.import_module(f"{parent}.{name}")

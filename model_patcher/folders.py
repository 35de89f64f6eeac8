"""Where motion modules and motion LoRAs live. Our own folder keys (so nothing collides with other packs), whose
default paths are the folders the other AnimateDiff packs use (``models/animatediff_models``,
``models/animatediff_motion_lora``); files that other packs or extra_model_paths.yaml register under those
shared keys are listed too, so nobody moves files."""
from __future__ import annotations

import os

import folder_paths

from ..motion_modules.formats import SUFFIXES

MOTION_MODULES = "adm_motion_modules"
MOTION_LORAS = "adm_motion_loras"
SHARED = {MOTION_MODULES: "animatediff_models", MOTION_LORAS: "animatediff_motion_lora"}


def register() -> None:
    for key, shared in SHARED.items():
        folder_paths.add_model_folder_path(key, os.path.join(folder_paths.models_dir, shared))
        paths, extensions = folder_paths.folder_names_and_paths[key]
        folder_paths.folder_names_and_paths[key] = (paths, extensions | set(SUFFIXES))


def _keys(key: str) -> list[str]:
    return [k for k in (key, SHARED[key]) if k in folder_paths.folder_names_and_paths]


def names(key: str) -> list[str]:
    found = {n for k in _keys(key) for n in folder_paths.get_filename_list(k)}
    return sorted(n for n in found if n.lower().endswith(SUFFIXES))


def full_path(key: str, name: str) -> str:
    for k in _keys(key):
        path = folder_paths.get_full_path(k, name)
        if path:
            return path
    folders = [p for k in _keys(key) for p in folder_paths.get_folder_paths(k)]
    raise FileNotFoundError(f"'{name}' not found in {folders}. Put the file in one of these folders.")

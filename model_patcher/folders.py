"""Where motion modules live. Our own folder key (so nothing collides with other packs), whose default path
is ``models/animatediff_models``, the folder the other AnimateDiff packs use; files that other packs or
extra_model_paths.yaml register under ``animatediff_models`` are listed too, so nobody moves files."""
from __future__ import annotations

import os

import folder_paths

from ..motion_modules.formats import SUFFIXES

MOTION_MODULES = "adm_motion_modules"
SHARED = "animatediff_models"


def register() -> None:
    folder_paths.add_model_folder_path(MOTION_MODULES, os.path.join(folder_paths.models_dir, SHARED))
    paths, extensions = folder_paths.folder_names_and_paths[MOTION_MODULES]
    folder_paths.folder_names_and_paths[MOTION_MODULES] = (paths, extensions | set(SUFFIXES))


def _keys() -> list[str]:
    return [key for key in (MOTION_MODULES, SHARED) if key in folder_paths.folder_names_and_paths]


def motion_module_names() -> list[str]:
    names = {n for key in _keys() for n in folder_paths.get_filename_list(key)}
    return sorted(n for n in names if n.lower().endswith(SUFFIXES))


def motion_module_path(name: str) -> str:
    for key in _keys():
        path = folder_paths.get_full_path(key, name)
        if path:
            return path
    folders = [p for key in _keys() for p in folder_paths.get_folder_paths(key)]
    raise FileNotFoundError(f"Motion module '{name}' not found in {folders}. Put the file in one of these folders.")

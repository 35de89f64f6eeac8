"""What this ComfyUI offers of the host features the extension relies on, checked by feature, never by version.

When ComfyUI loads the extension, :func:`log_report` logs one line: the host version (read from
``comfyui_version.py``, for the reader only), the features in use and the missing ones with what each costs.
A node whose feature is missing calls :func:`require` in its execute and refuses with that feature named,
instead of failing mid-sampling with a traceback.

This module imports nothing of the extension (the report must reach the log even when the nodes fail to
import on an old host) and imports host modules only inside the probes.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REQUIRED, FALLBACK, NEWER = "required", "fallback", "newer"


class HostFeatureMissing(RuntimeError):
    """A node needs a host feature this ComfyUI does not have (``.feature`` names it)."""

    def __init__(self, message: str, feature: str):
        super().__init__(message)
        self.feature = feature


@dataclass(frozen=True)
class Feature:
    name: str                  # the key for require() and the log line
    kind: str                  # REQUIRED: nodes refuse without it; FALLBACK: we work around it; NEWER: noted only
    what: str                  # where it lives in the host, for messages
    nodes: str                 # who needs it
    if_missing: str            # what happens without it, for the log line
    first: str                 # the first release that has it, for the advice (never used to decide)
    probe: Callable[[], bool]
    modules: tuple[str, ...] = ()  # host modules that exist only with the feature


def _module(name: str):
    return importlib.import_module(name)


def _has_patcher_extensions() -> bool:
    ext = _module("comfy.patcher_extension")
    patcher = _module("comfy.model_patcher").ModelPatcher
    wrappers = ("OUTER_SAMPLE", "APPLY_MODEL", "DIFFUSION_MODEL")
    methods = ("set_injections", "add_wrapper_with_key", "remove_wrappers_with_key", "set_additional_models")
    return (hasattr(ext, "PatcherInjection") and all(hasattr(ext.WrappersMP, w) for w in wrappers)
            and all(callable(getattr(patcher, m, None)) for m in methods))


def _has_timestep_embed_patch() -> bool:
    # The UNet hands each block to transformer_options["patches"]["forward_timestep_embed_patch"] handlers;
    # the hook is inside a function, so its source is the only place that says whether it is there.
    openaimodel = _module("comfy.ldm.modules.diffusionmodules.openaimodel")
    return "forward_timestep_embed_patch" in inspect.getsource(openaimodel.forward_timestep_embed)


def _context_handler():
    return _module("comfy.context_windows").IndexListContextHandler


def _has_context_windows() -> bool:
    windows = _module("comfy.context_windows")
    return all(hasattr(windows, n) for n in
               ("IndexListContextHandler", "get_matching_context_schedule", "get_matching_fuse_method"))


def _handler_takes(option: str) -> Callable[[], bool]:
    return lambda: option in inspect.signature(_context_handler().__init__).parameters


FEATURES = (
    Feature("model patcher extensions", REQUIRED,
            "comfy.patcher_extension (WrappersMP, PatcherInjection) and ModelPatcher.set_injections / "
            "add_wrapper_with_key / set_additional_models",
            "every node that samples with a motion module", "the extension cannot work", "0.3.10",
            _has_patcher_extensions),
    Feature("timestep-embed patches", REQUIRED,
            "forward_timestep_embed_patch in comfy/ldm/modules/diffusionmodules/openaimodel.py",
            "Apply Motion Module (AnimateDiff)", "Apply Motion Module refuses", "0.3.10",
            _has_timestep_embed_patch),
    Feature("context windows", REQUIRED,
            "comfy/context_windows.py with IndexListContextHandler",
            "Context Windows (AnimateDiff)", "Context Windows node refuses", "0.3.51",
            _has_context_windows, ("comfy.context_windows",)),
    Feature("training progress", FALLBACK,
            "comfy.utils.ProgressBar(total, node_id=...)",
            "Train Motion Module (AnimateDiff)", "training's progress bar without node_id", "0.3.45",
            lambda: "node_id" in inspect.signature(_module("comfy.utils").ProgressBar.__init__).parameters),
    Feature("weight adapters", FALLBACK,
            "comfy.weight_adapter (LoRAAdapter)",
            "Load Motion LoRA (AnimateDiff)", "motion LoRAs use the older ('lora', ...) weight patches", "0.3.30",
            lambda: hasattr(_module("comfy.weight_adapter.lora"), "LoRAAdapter"), ("comfy.weight_adapter",)),
    Feature("workflow templates", FALLBACK,
            "example_workflows/ of custom nodes served by app/custom_node_manager.py",
            "the Templates menu", "no example workflows in the Templates menu: open them from example_workflows/",
            "0.3.11", lambda: "example_workflows" in inspect.getsource(
                _module("app.custom_node_manager").CustomNodeManager.add_routes), ("app.custom_node_manager",)),
    Feature("context-window anchor frame", NEWER,
            "IndexListContextHandler(causal_window_fix=...)", "Context Windows", "", "0.20 (2026)",
            _handler_takes("causal_window_fix")),
    Feature("host FreeNoise", NEWER,
            "IndexListContextHandler(freenoise=...)", "Context Windows, Sampling Options", "",
            "a release after 0.3.75",
            _handler_takes("freenoise")),
)
BY_NAME = {f.name: f for f in FEATURES}


def available(name: str) -> bool:
    """Whether this host has the feature (any error while probing counts as not having it)."""
    if name not in BY_NAME:
        raise KeyError(f"unknown host feature {name!r}; known: {', '.join(BY_NAME)}")
    try:
        return bool(BY_NAME[name].probe())
    except Exception:  # ImportError, AttributeError, KeyError, OSError (no source), ...: the host differs
        return False


def host_version() -> str:
    """'ComfyUI 0.3.75 (comfyui_version.py)', or what the tree says when it has no version file."""
    spec = importlib.util.find_spec("comfy")  # a folder without __init__.py in some trees: no __file__
    if spec is None or not spec.submodule_search_locations:
        return "ComfyUI (comfy not importable)"
    root = Path(list(spec.submodule_search_locations)[0]).resolve().parent
    path = root / "comfyui_version.py"
    match = re.search(r"""__version__\s*=\s*["']([^"']+)""", path.read_text()) if path.is_file() else None
    if match:
        return f"ComfyUI {match.group(1)} ({path.name})"
    return f"ComfyUI of unknown version (no {path.name})"


def missing_reason(name: str) -> str | None:
    """None when the host has the feature, else one sentence saying what is missing and what to do."""
    if available(name):
        return None
    feature = BY_NAME[name]
    return (f"{feature.nodes} needs ComfyUI's {feature.name} ({feature.what}); this host, {host_version()}, "
            f"does not have it. Update ComfyUI to a version that has it ({feature.first} or newer).")


def require(name: str) -> None:
    """Raise HostFeatureMissing (a RuntimeError) naming the node, the missing feature and the fix; for node
    execute methods, before any work."""
    reason = missing_reason(name)
    if reason:
        raise HostFeatureMissing(reason, name)


def feature_of_module(module: str) -> str | None:
    """The feature a host module belongs to ('comfy.context_windows' -> 'context windows'), else None."""
    for feature in FEATURES:
        if any(module == m or module.startswith(m + ".") for m in feature.modules):
            return feature.name
    return None


def report_line() -> str:
    using, missing = [], []
    for feature in FEATURES:
        if available(feature.name):
            using.append(feature.name)
        elif feature.kind != NEWER:  # a newer host's option we do not need is not "missing"
            missing.append(f"{feature.name} ({feature.if_missing})")
    return (f"AnimateDiff Motion: {host_version()}; using: {', '.join(using) or 'nothing'}; "
            f"missing: {', '.join(missing) or 'nothing'}")


def log_report() -> str:
    """Log the one-line report (the host's logger prints INFO to its console and log) and return it."""
    line = report_line()
    logging.getLogger("animatediff_motion").log(
        logging.WARNING if any(not available(f.name) for f in FEATURES if f.kind == REQUIRED) else logging.INFO,
        line)
    return line

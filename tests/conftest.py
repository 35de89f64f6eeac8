"""Test set-up: the repository is imported as the package ``adm`` (the folder name is arbitrary, as in
ComfyUI's custom_nodes), and the host tree (COMFYUI_DIR, default .host/ComfyUI) is put on sys.path."""
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", ROOT / ".host" / "ComfyUI")).resolve()

if not (COMFYUI_DIR / "comfy").is_dir():
    raise pytest.UsageError(f"No ComfyUI tree at {COMFYUI_DIR}: run `bash scripts/setup.sh` first, "
                            "or set COMFYUI_DIR to your ComfyUI folder.")
sys.path.insert(0, str(COMFYUI_DIR))
# ComfyUI's utils/ package, imported first as main.py does: the host's nodes.py puts comfy/ at the head of
# sys.path, after which `import utils` would find comfy/utils.py (app/custom_node_manager.py needs the package).
if (COMFYUI_DIR / "utils" / "__init__.py").is_file():
    import utils  # noqa: E402,F401
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (unets.py)

# Register the repository as package "adm" without running its __init__ (which registers nodes with the
# host); tests import the layer they test, e.g. `from adm.motion_modules import ...`.
_pkg = types.ModuleType("adm")
_pkg.__path__ = [str(ROOT)]
sys.modules.setdefault("adm", _pkg)


@contextmanager
def removed_afterwards(*paths):
    """Stand-ins that one test module needs (about 1 GB each) are deleted when it ends: kept all session, they
    made CI's disk overflow (7 GB of random weights beside a 6 GB venv). The SD1.5 checkpoint and the v2
    module, which every module uses, stay cached across runs."""
    try:
        yield
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _fresh_host_filename_cache(monkeypatch):
    """Each test starts with an empty host file-list cache: tests point the host's model folders at their own
    tmp_path, and a cached list that names a deleted folder makes folder_paths.cached_filename_list_ raise
    (it calls os.path.getmtime on every cached folder)."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})


class _RootIsNotATestPackage:
    """pytest would collect the repository root as a test package (it has an ``__init__.py``) and import that
    file as a module named after the checkout's folder: with a folder name that is not an identifier
    (``git clone`` gives ``animatediff-motion``) the relative import in it fails and every test errors, and
    with any name it registers the nodes a second time under that name. Collect the root as a plain folder."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path).resolve() == ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # Registered as a plugin, not as a conftest hook: conftest hooks only apply below tests/, and the root
    # folder is collected before anything under it.
    config.pluginmanager.register(_RootIsNotATestPackage(), "adm-root-is-not-a-test-package")


# The host picks CUDA unless told otherwise; on a machine without a GPU it must be told.
from comfy.cli_args import args as _host_args  # noqa: E402

if not torch.cuda.is_available():
    _host_args.cpu = True


# Tests that need a host feature this ComfyUI lacks (context windows on a 2024 tree) skip with the feature
# check's reason instead of failing: an ImportError of a module that only exists with the feature (at
# collection or at run time), or a node's refusal (HostFeatureMissing). Only when the host really lacks it.
from adm.model_patcher import host_features  # noqa: E402


def _host_lacks(exc: BaseException | None) -> str | None:
    """The skip reason when exc comes from a host feature this host does not have, else None."""
    if isinstance(exc, host_features.HostFeatureMissing):
        name = exc.feature
    elif isinstance(exc, ImportError) and exc.name:
        name = host_features.feature_of_module(exc.name)
    else:
        return None
    return host_features.missing_reason(name) if name else None


class _HostFeatureModule(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as error:
            reason = _host_lacks(error.__cause__ or error.__context__)
            if reason:
                pytest.skip(f"host lacks a feature: {reason}", allow_module_level=True)
            raise


def pytest_pycollect_makemodule(module_path, parent):
    return _HostFeatureModule.from_parent(parent, path=module_path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    reason = _host_lacks(call.excinfo.value) if report.failed and call.excinfo else None
    if reason:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: host lacks a feature: {reason}")
    return report


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""The start-up self-check (model_patcher/host_features.py) on the real host, features taken away by monkeypatch;
the test set-up's feature skips; and a checkout whose folder name is not a Python identifier."""
import logging
import os
import subprocess
import sys

import pytest

import comfy.model_patcher
from adm.model_patcher import host_features
from conftest import COMFYUI_DIR, ROOT


def test_the_probes_agree_with_the_host_files():
    # Whatever tree COMFYUI_DIR is (the matrix runs this on each), the probes see what the files say.
    assert host_features.available("context windows") == (COMFYUI_DIR / "comfy" / "context_windows.py").is_file()
    assert host_features.available("weight adapters") == (COMFYUI_DIR / "comfy" / "weight_adapter").is_dir()
    utils = (COMFYUI_DIR / "comfy" / "utils.py").read_text()
    assert host_features.available("training progress") == ("def __init__(self, total, node_id=None)" in utils)
    assert host_features.available("workflow templates") == (COMFYUI_DIR / "app" / "custom_node_manager.py").is_file()
    assert host_features.available("model patcher extensions") and host_features.available("timestep-embed patches")


def test_the_line_names_the_version_what_is_used_and_what_is_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "comfy.context_windows", None)  # import now raises ImportError
    with caplog.at_level(logging.INFO, logger="animatediff_motion"):
        line = host_features.log_report()
    assert caplog.messages == [line]
    version = (COMFYUI_DIR / "comfyui_version.py")
    assert line.startswith("AnimateDiff Motion: ComfyUI " + ("" if version.is_file() else "of unknown version"))
    if version.is_file():
        assert host_features.host_version().split()[1] in version.read_text()
    assert "using: model patcher extensions, timestep-embed patches" in line
    assert "missing: context windows (Context Windows node refuses)" in line
    assert line.count("\n") == 0 and caplog.records[0].levelno == logging.WARNING


def test_require_refuses_naming_the_node_the_feature_and_the_fix(monkeypatch):
    monkeypatch.delattr(comfy.model_patcher.ModelPatcher, "set_injections")
    assert "model patcher extensions (the extension cannot work)" in host_features.report_line()
    with pytest.raises(host_features.HostFeatureMissing,
                       match=r"every node that samples with a motion module needs ComfyUI's model patcher extensions "
                             r"\(.*set_injections.*\); this host, ComfyUI .*, does not have it\. Update ComfyUI to a "
                             r"version that has it") as refused:
        host_features.require("model patcher extensions")
    assert isinstance(refused.value, RuntimeError) and refused.value.feature == "model patcher extensions"
    monkeypatch.undo()
    host_features.require("model patcher extensions")  # the real host has it: no error


def test_a_probe_that_breaks_counts_as_missing_and_unknown_names_are_refused(monkeypatch):
    def no_source(obj):
        raise OSError("could not get source code")  # as for a host installed without .py files

    monkeypatch.setattr(host_features.inspect, "getsource", no_source)
    assert not host_features.available("timestep-embed patches")
    with pytest.raises(KeyError, match="unknown host feature 'context window'.*context windows"):
        host_features.available("context window")


def test_the_context_node_refuses_on_a_host_without_context_windows():
    reason = host_features.missing_reason("context windows")
    if reason is None:
        pytest.skip("this host has context windows; the refusal fires on the 2024-12 tree of the host matrix "
                    "(tests/e2e/test_host_matrix.py)")
    from adm.nodes.context import ContextWindows
    with pytest.raises(RuntimeError, match=r"(?s)context_windows\.py.*Update ComfyUI"):
        ContextWindows().apply(None, 16, 4, "standard_uniform", "pyramid", False)


# ----------------------------------------------------------------- the test set-up's skips for missing features

def test_a_missing_host_feature_skips_a_test_with_the_feature_checks_reason(pytester, monkeypatch):
    # The repository's test set-up, loaded under another name (this folder's own conftest is "conftest").
    pytester.makeconftest(f"""
import importlib.util
spec = importlib.util.spec_from_file_location("adm_tests_conftest", {str(ROOT / "tests" / "conftest.py")!r})
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
globals().update({{k: v for k, v in vars(setup).items() if k.startswith("pytest_")}})
""")
    pytester.makepyfile(
        test_module_needs_it="import comfy.context_windows\ndef test_a(): pass\n",
        test_call_needs_it="""
from adm.model_patcher import host_features
def test_refused(): host_features.require("context windows")
def test_other_import_errors_still_fail(): import comfy.no_such_module
""")
    monkeypatch.setitem(sys.modules, "comfy.context_windows", None)  # the host "lacks" context windows
    monkeypatch.setenv("COMFYUI_DIR", str(COMFYUI_DIR))  # absolute: the run's folder is another
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2, failed=1)
    result.stdout.fnmatch_lines(["*SKIPPED*host lacks a feature: Context Windows (AnimateDiff) needs ComfyUI's "
                                 "context windows*Update ComfyUI*0.3.51 or newer*"])


# ----------------------------------------------------------------- checkouts whose folder is not an identifier

def test_the_suite_runs_from_a_folder_named_like_the_git_clone(tmp_path):
    # `git clone <repository URL>` makes animatediff-motion/; pytest used to import the root __init__.py (with
    # its relative import) as a module of that name, and every test errored.
    checkout = tmp_path / "animatediff-motion"
    (checkout / "tests").mkdir(parents=True)
    for name in ("pyproject.toml", "__init__.py", "tests/conftest.py", "tests/unets.py"):
        (checkout / name).write_bytes((ROOT / name).read_bytes())
    (checkout / "model_patcher").symlink_to(ROOT / "model_patcher")  # for the conftest's host_features import
    (checkout / "tests" / "test_one.py").write_text("def test_one():\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=checkout, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COMFYUI_DIR": str(COMFYUI_DIR)})
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]

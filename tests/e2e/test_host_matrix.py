"""Host test matrix: the older ComfyUI trees scripts/host-tree.sh provisions (scripts/setup.sh calls it) run the
host part of the suite (tests/host, tests/unit) and the demo workflow through their own server, each in a
subprocess with that tree's Python (.host/NAME/venv). The default tree (.host/ComfyUI, 0.3.75) runs the whole
suite in this process. Measured on 2 cores: about 1.5 min of tests and 40 s of demo a tree."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from adm.headless.demo_models import CHECKPOINT, MOTION_MODULE
from conftest import COMFYUI_DIR, ROOT

pytestmark = pytest.mark.e2e

# Tree name (scripts/host-tree.sh) -> what its self-check line must say.
TREES = {
    "0.3.52": ("AnimateDiff Motion: ComfyUI 0.3.52 (comfyui_version.py); using: model patcher extensions, "
               "timestep-embed patches, context windows, training progress, weight adapters, workflow templates; "
               "missing: nothing"),
    "2024-12": ("AnimateDiff Motion: ComfyUI of unknown version (no comfyui_version.py); using: model patcher "
                "extensions, timestep-embed patches; missing: context windows (Context Windows node refuses), "
                "training progress (training's progress bar without node_id), weight adapters (motion LoRAs use the "
                "older ('lora', ...) weight patches), workflow templates (no example workflows in the Templates "
                "menu: open them from example_workflows/)"),
}
HOST_TESTS = ["tests/host", "tests/unit"]  # the whole host part: ~1.5 min a tree on 2 cores
REFUSAL_TEST = "test_the_context_node_refuses_on_a_host_without_context_windows"
LACKS = "host lacks a feature: Context Windows (AnimateDiff) needs ComfyUI's context windows"
TESTS_TIMEOUT, DEMO_TIMEOUT = 1200, 600


def tree(name):
    comfyui, python = ROOT / ".host" / name / "ComfyUI", ROOT / ".host" / name / "venv" / "bin" / "python"
    if not (ROOT / ".host" / name / ".done").is_file():
        if os.environ.get("COMFYUI_DIR"):
            pytest.skip(f"tree {name} not provisioned (scripts/setup.sh skips the matrix when COMFYUI_DIR is set); "
                        f"`bash scripts/host-tree.sh {name}` makes it")
        pytest.fail(f"tree {name} not provisioned: run `bash scripts/setup.sh` (or scripts/host-tree.sh {name})")
    return comfyui, python


def run(cmd, timeout, **env):
    try:
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as ex:
        out = ex.stdout.decode(errors="replace") if isinstance(ex.stdout, bytes) else ex.stdout or ""
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish within {timeout} s; last output:\n{out[-4000:]}")


@pytest.mark.parametrize("name", TREES)
def test_the_host_tests_pass_on_the_tree(name, tmp_path):
    comfyui, python = tree(name)
    report = tmp_path / "junit.xml"
    done = run([python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}",
                *HOST_TESTS], TESTS_TIMEOUT, COMFYUI_DIR=str(comfyui))
    assert done.returncode == 0, f"tests on the {name} tree failed:\n{done.stdout[-6000:]}"
    cases = {case.get("name"): case for case in ET.parse(report).iter("testcase")}
    skips = [s.get("message", "") for case in cases.values() for s in case.iter("skipped")]
    if (comfyui / "comfy" / "context_windows.py").is_file():
        assert not any(LACKS in s for s in skips)
    else:  # the tests that need windows skip with the feature check's reason, and the node refuses instead
        assert any(LACKS in s for s in skips), skips
        assert cases[REFUSAL_TEST].find("skipped") is None


def link_models(models, comfyui):
    """The e2e stand-in models (made once) as links in the tree's models folders, where demo looks."""
    for folder, name in (("checkpoints", CHECKPOINT), ("animatediff_models", MOTION_MODULE)):
        link = comfyui / "models" / folder / name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)  # a dangling link
            link.symlink_to(models / folder / name)


@pytest.mark.parametrize("name", TREES)
def test_the_demo_renders_through_the_trees_server_which_logs_the_self_check(name, tmp_path, e2e_models):
    comfyui, python = tree(name)
    link_models(e2e_models, comfyui)
    log = tmp_path / "server.log"
    done = run([python, "-m", "headless", "demo", "--comfyui", comfyui, "--out", tmp_path / "out",
                f"--server-log={log}", "--set", "Frames.batch_size=4", "--set", "KSampler.steps=2"], DEMO_TIMEOUT)
    server_log = log.read_text(errors="replace") if log.exists() else ""
    assert done.returncode == 0, f"demo on the {name} tree failed:\n{done.stdout[-3000:]}\n{server_log[-3000:]}"
    assert any(p.suffix in (".mp4", ".webp", ".gif") for p in (tmp_path / "out").rglob("*")), done.stdout
    lines = [line for line in server_log.splitlines() if "AnimateDiff Motion: " in line]
    assert lines and lines[0].endswith(TREES[name]), lines or server_log[-3000:]
    assert "custom_nodes/animatediff-motion" in server_log  # loaded from a folder name that is no identifier


def test_the_default_tree_logs_the_self_check_when_it_loads_the_extension():
    # ComfyUI's own start-up check: loads the custom nodes, then exits.
    done = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--disable-auto-launch"],
                          cwd=COMFYUI_DIR, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    lines = [line for line in output.splitlines() if "AnimateDiff Motion: ComfyUI " in line]
    assert len(lines) == 1 and "; using: model patcher extensions, timestep-embed patches" in lines[0], output[-3000:]

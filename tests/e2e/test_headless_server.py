"""The headless runner against the real ComfyUI server: a graph of core nodes that needs no model files."""
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from headless import ServerError, WorkflowError, run_workflow, start_server  # noqa: E402
from headless.server import default_comfyui_dir  # noqa: E402

pytestmark = pytest.mark.e2e

START_TIMEOUT = 300


def api_graph(width=16, height=8, batch=2, prefix="adm_e2e/api"):
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch,
                                                      "color": 0x3366FF},
              "_meta": {"title": "Canvas"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def ui_graph(prefix="adm_e2e/ui"):
    """The same graph as the editor saves it, with a note and a muted node beside it."""
    return {
        "last_node_id": 4, "last_link_id": 2, "version": 0.4, "groups": [], "config": {}, "extra": {},
        "nodes": [
            {"id": 1, "type": "EmptyImage", "mode": 0, "title": "Canvas",
             "inputs": [{"name": "width", "type": "INT", "widget": {"name": "width"}, "link": None}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
             "properties": {"cnr_id": "comfy-core", "Node name for S&R": "EmptyImage"},
             "widgets_values": [24, 12, 1, 0]},
            {"id": 2, "type": "SaveImage", "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": [],
             "properties": {"cnr_id": "comfy-core"}, "widgets_values": [prefix]},
            {"id": 3, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["a note"]},
            {"id": 4, "type": "SaveImage", "mode": 2, "inputs": [{"name": "images", "type": "IMAGE", "link": 2}],
             "outputs": [], "widgets_values": ["muted"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 1, 0, 4, 0, "IMAGE"]],
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    host_args = [f"--output-directory={base / 'server-output'}", f"--temp-directory={base / 'server-temp'}"]
    with start_server(default_comfyui_dir(), host_args=host_args, timeout=START_TIMEOUT) as url:
        yield url


def test_api_workflow_outputs_are_downloaded(server, tmp_path):
    paths = run_workflow(server, api_graph(), ["Canvas.width=20"], out_dir=tmp_path, timeout=120)
    assert len(paths) == 2
    for path in paths:
        assert path.parent == tmp_path / "adm_e2e" and path.suffix == ".png" and path.is_file()
        with Image.open(path) as image:
            assert image.size == (20, 8)
            assert image.convert("RGB").getpixel((0, 0)) == (0x33, 0x66, 0xFF)


def test_ui_workflow_is_converted_against_the_real_object_info(server, tmp_path):
    paths = run_workflow(server, ui_graph(), out_dir=tmp_path, timeout=120)
    assert [p.parent for p in paths] == [tmp_path / "adm_e2e"]
    with Image.open(paths[0]) as image:
        assert image.size == (24, 12)
        assert "workflow" in image.info  # the editor's graph is embedded, as the browser would do


def test_a_cached_rerun_still_returns_its_outputs(server, tmp_path):
    graph = api_graph(width=9, height=9, batch=1, prefix="adm_e2e/cached")
    first = run_workflow(server, graph, out_dir=tmp_path / "a", timeout=120)
    again = run_workflow(server, graph, out_dir=tmp_path / "b", timeout=120)
    assert len(first) == len(again) == 1 and again[0].is_file()


def test_validation_error_names_node_class_and_input_and_server_goes_on(server, tmp_path):
    with pytest.raises(WorkflowError) as info:
        run_workflow(server, api_graph(), ["1.width=0"], out_dir=tmp_path, timeout=120)
    error = info.value
    assert error.kind == "validation"
    assert "node 1 (EmptyImage)" in str(error) and "'width'" in str(error) and "smaller than min" in str(error)
    assert error.data["node_errors"]["1"]["class_type"] == "EmptyImage"

    with pytest.raises(WorkflowError) as info:  # fails while running, not at validation
        run_workflow(server, api_graph(), ['2.images="not an image"'], out_dir=tmp_path, timeout=120)
    assert info.value.kind == "execution"
    assert str(info.value).startswith("Execution failed at node 2 (SaveImage)")

    paths = run_workflow(server, api_graph(batch=1, prefix="adm_e2e/after"), out_dir=tmp_path, timeout=120)
    assert len(paths) == 1 and paths[0].is_file()


def test_timeout_cancels_and_reports(server, tmp_path):
    with pytest.raises(WorkflowError) as info:
        run_workflow(server, api_graph(batch=1, prefix="adm_e2e/late"), out_dir=tmp_path, timeout=0.001)
    assert info.value.kind == "timeout" and "Timed out after 0.001 s" in str(info.value)
    assert run_workflow(server, api_graph(batch=1, prefix="adm_e2e/next"), out_dir=tmp_path, timeout=120)


def test_unknown_override_target_is_refused_before_queueing(server, tmp_path):
    with pytest.raises(WorkflowError, match="matches no node"):
        run_workflow(server, api_graph(), ["KSampler.seed=1"], out_dir=tmp_path, timeout=30)


def test_start_server_reports_a_host_that_exits(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(ServerError) as info:
        with start_server(default_comfyui_dir(), host_args=["--no-such-flag"], timeout=START_TIMEOUT, log_path=log):
            pass
    text = str(info.value)
    assert "exited during start-up" in text and str(log) in text and "--no-such-flag" in text


def test_cli_exit_code_on_a_bad_graph_and_server_is_stopped(tmp_path):
    """The CLI starts its own server, renders the validation error without a traceback, exits 1, and stops
    the server."""
    workflow = tmp_path / "bad.json"
    workflow.write_text(json.dumps(api_graph(width=0)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "headless", "run", str(workflow), "--out", str(tmp_path / "out"), "--timeout", "120",
         f"--host-arg=--output-directory={tmp_path / 'server-output'}",
         f"--host-arg=--temp-directory={tmp_path / 'server-temp'}", "--startup-timeout", str(START_TIMEOUT),
         "--server-log", str(tmp_path / "server.log")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=START_TIMEOUT + 180)
    assert proc.returncode == 1, proc.stderr
    assert "node 1 (EmptyImage)" in proc.stderr and "'width'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert f"server log kept at {tmp_path / 'server.log'}" in proc.stderr
    url = re.search(r"on (http://127\.0\.0\.1:\d+)", proc.stderr).group(1)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url + "/system_stats", timeout=5)

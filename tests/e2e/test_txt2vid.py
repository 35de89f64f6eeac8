"""Text-to-video through the real ComfyUI server: the shipped workflow, posted over HTTP, decoded from disk."""
import json
from pathlib import Path

import numpy as np
import pytest

from adm.headless.client import run_workflow
from adm.headless.demo_models import CHECKPOINT, MOTION_MODULE, ensure_random_models
from adm.headless.errors import WorkflowError
from adm.headless.server import start_server
from adm.motion_modules import LAYOUTS
from adm.video import read_video
from conftest import COMFYUI_DIR, ROOT

pytestmark = pytest.mark.e2e
WORKFLOWS = ROOT / "workflows"
SMALL = ["6.width=64", "6.height=64", "6.batch_size=8", "7.steps=3", "9.format=webp",
         f"1.ckpt_name={CHECKPOINT}", f"2.model_name={MOTION_MODULE}"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # Random stand-ins with the real layouts, cached across runs (they take ~20 s to make).
    models_dir = ROOT / ".host" / "test-models"
    ensure_random_models(models_dir)
    bad = models_dir / "animatediff_models"
    (bad / "not_a_motion_module.safetensors").write_bytes((models_dir / "checkpoints" / CHECKPOINT).read_bytes()[:4096])
    return models_dir


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "extra_model_paths.yaml"
    config.write_text(f"adm_tests:\n  base_path: {models}\n  checkpoints: checkpoints\n"
                      f"  animatediff_models: animatediff_models\n")
    output = tmp_path_factory.mktemp("server-output")
    with start_server(COMFYUI_DIR, host_args=[f"--extra-model-paths-config={config}",
                                              f"--output-directory={output}"]) as url:
        yield url


def run(server, tmp_path, workflow="txt2vid_api.json", overrides=()):
    files = run_workflow(server, json.loads((WORKFLOWS / workflow).read_text()), [*SMALL, *overrides],
                         out_dir=tmp_path, timeout=600)
    videos = [f for f in files if f.suffix in (".webp", ".mp4", ".gif")]
    assert len(videos) == 1, files
    return read_video(videos[0])


def test_txt2vid_writes_a_clip_whose_frames_come_from_the_motion_module(server, tmp_path):
    frames, fps = run(server, tmp_path / "animated")
    assert frames.shape == (8, 64, 64, 3) and fps == pytest.approx(8)
    # The same graph without the motion module: KSampler takes the checkpoint's model directly.
    still, _ = run(server, tmp_path / "still", overrides=['7.model=["1", 0]'])
    assert still.shape == frames.shape
    assert np.abs(frames.astype(int) - still.astype(int)).mean() > 1.0


def test_ui_format_workflow_gives_the_same_clip_as_the_api_format(server, tmp_path):
    api, _ = run(server, tmp_path / "api")
    ui, _ = run(server, tmp_path / "ui", workflow="txt2vid.json")
    assert np.array_equal(api, ui)


def test_mp4_output_decodes_with_the_frame_count_and_size(server, tmp_path):
    frames, fps = run(server, tmp_path, overrides=["9.format=mp4"])
    assert frames.shape == (8, 64, 64, 3) and fps == pytest.approx(8)


def test_bad_inputs_are_refused_readably_and_the_server_keeps_serving(server, tmp_path):
    with pytest.raises(WorkflowError, match=r"not_a_motion_module\.safetensors.*(truncated|cannot be read)"):
        run(server, tmp_path, overrides=["2.model_name=not_a_motion_module.safetensors"])
    limit = LAYOUTS["AnimateDiff v2"].max_frames
    with pytest.raises(WorkflowError, match=rf"{limit + 1} frames.*at most {limit}.*context windows"):
        run(server, tmp_path, overrides=[f"6.batch_size={limit + 1}", "6.width=16", "6.height=16"])
    frames, _ = run(server, tmp_path / "after")
    assert frames.shape[0] == 8

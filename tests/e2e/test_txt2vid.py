"""Text-to-video through the real ComfyUI server: the shipped workflow, posted over HTTP, decoded from disk."""
import json

import numpy as np
import pytest

from adm.headless.client import run_workflow
from adm.headless.demo_models import CHECKPOINT, MOTION_MODULE
from adm.headless.errors import WorkflowError
from adm.motion_modules import LAYOUTS
from adm.video import read_video
from conftest import ROOT

pytestmark = pytest.mark.e2e
API, UI = ROOT / "api_workflows", ROOT / "example_workflows"
PREVIEW_SUBFOLDER = "adm_previews"  # Save Video's animated WebP preview of an MP4 or GIF (a temp output)
SMALL = ["6.width=64", "6.height=64", "6.batch_size=8", "7.steps=3", "9.format=webp",
         f"1.ckpt_name={CHECKPOINT}", f"2.model_name={MOTION_MODULE}"]


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server


def run(server, tmp_path, workflow="txt2vid_api.json", overrides=(), edit=lambda workflow: None):
    folder = API if workflow.endswith("_api.json") else UI
    graph = json.loads((folder / workflow).read_text())
    edit(graph)
    files = run_workflow(server, graph, [*SMALL, *overrides],
                         out_dir=tmp_path, timeout=600)
    videos = [f for f in files if f.suffix in (".webp", ".mp4", ".gif") and f.parent.name != PREVIEW_SUBFOLDER]
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
    assert len(list((tmp_path / PREVIEW_SUBFOLDER).glob("*.webp"))) == 1  # what the editor shows: a looping WebP


def test_an_api_workflow_saved_with_the_old_input_name_quality_still_runs(server, tmp_path):
    def old_save_video(workflow):
        workflow["9"]["inputs"]["quality"] = workflow["9"]["inputs"].pop("mp4_crf")

    frames, _ = run(server, tmp_path, overrides=["9.format=mp4"], edit=old_save_video)
    assert frames.shape == (8, 64, 64, 3)


def test_bad_inputs_are_refused_readably_and_the_server_keeps_serving(server, tmp_path):
    with pytest.raises(WorkflowError, match=r"not_a_motion_module\.safetensors.*(truncated|cannot be read)"):
        run(server, tmp_path, overrides=["2.model_name=not_a_motion_module.safetensors"])
    limit = LAYOUTS["AnimateDiff v2"].max_frames
    with pytest.raises(WorkflowError, match=rf"{limit + 1} frames.*at most {limit}.*context windows"):
        run(server, tmp_path, overrides=[f"6.batch_size={limit + 1}", "6.width=16", "6.height=16"])
    frames, _ = run(server, tmp_path / "after")
    assert frames.shape[0] == 8


def test_long_clip_workflow_samples_in_context_windows(server, tmp_path):
    frames, _ = run(server, tmp_path, "txt2vid_long_api.json", overrides=["6.batch_size=20", "10.context_length=16"])
    assert frames.shape == (20, 64, 64, 3)


def test_long_clip_without_windows_is_refused_with_the_fix(server, tmp_path):
    with pytest.raises(WorkflowError, match="Context Windows node"):
        run(server, tmp_path, overrides=["6.batch_size=40", "6.width=16", "6.height=16"])


def test_motion_lora_workflow_changes_the_clip(server, tmp_path, e2e_motion_lora):
    plain, _ = run(server, tmp_path / "plain")
    with_lora, _ = run(server, tmp_path / "lora", "motion_lora_api.json", overrides=[f"10.lora_name={e2e_motion_lora}"])
    assert with_lora.shape == plain.shape
    assert np.abs(with_lora.astype(int) - plain.astype(int)).mean() > 0.5


def test_prompt_travel_workflow_samples_per_frame_prompts_in_windows(server, tmp_path):
    keyframes = '"0": "a red fox in the snow",\n"12": "a white owl at night"'
    frames, _ = run(server, tmp_path, "prompt_travel_api.json",
                    overrides=["6.batch_size=20", "4.frames=20", f"4.text={json.dumps(keyframes)}"])
    assert frames.shape == (20, 64, 64, 3)

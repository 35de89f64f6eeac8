"""CameraCtrl through the real ComfyUI server: the shipped workflow (Load Motion Module (v3) -> Apply Motion Module ->
Apply CameraCtrl Poses with poses pasted into pose_text -> KSampler -> VAE Decode -> Save Video), posted over HTTP,
with random-weight stand-ins of v3_sd15_mm.ckpt and CameraCtrl_pruned.safetensors in the real layouts."""
import json
import math
import os
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adm.headless.client import run_workflow
from adm.headless.convert import ui_to_api
from adm.headless.demo_models import CHECKPOINT, LABEL, MOTION_MODULE, _random_like
from adm.motion_modules import LAYOUTS
from adm.motion_modules.camera_ctrl import CameraCtrl, CameraCtrlConfig
from adm.motion_modules.temporal_transformer import sinusoidal_encoding
from adm.video import read_video
from conftest import ROOT, removed_afterwards

pytestmark = pytest.mark.e2e
API, UI = ROOT / "api_workflows", ROOT / "example_workflows"
NAME = "cameractrl"
V3_MODULE = "RANDOM-WEIGHTS_v3_sd15_mm_for-testing.safetensors"
CAMERA_CTRL = "RANDOM-WEIGHTS_CameraCtrl_pruned_for-testing.safetensors"
FRAMES = 16
ATTENTION = "temporal_transformer.transformer_blocks.0.attention_blocks.0"
SMALL = ["8.width=64", "8.height=64", f"8.batch_size={FRAMES}", "9.steps=1", "11.format=webp",
         f"1.ckpt_name={CHECKPOINT}", f"2.model_name={V3_MODULE}", f"4.camera_ctrl_name={CAMERA_CTRL}"]


def v3_module_file(v2_path, path):
    """AnimateDiff v3's layout is v2's without the mid block (formats.py LAYOUTS: same widths, 32-frame encoding),
    so the random v2 stand-in minus its mid_block keys is a v3 file (cached)."""
    if path.exists():
        return
    sd = {k: v for k, v in load_file(v2_path).items() if not k.startswith("mid_block.")}
    tmp = path.with_name(path.name + ".partial")
    save_file(sd, tmp, metadata=LABEL)
    os.replace(tmp, path)


def camera_ctrl_file(path):
    """CameraCtrl_pruned.safetensors' layout at full size: the pose encoder with the published widths and one
    qkv_merge on every v3 down- and up-block motion module, as CameraCtrl's own model lays its keys out; random
    weights scaled as the other stand-ins, the fixed sinusoidal tables as in the files (cached)."""
    if path.exists():
        return
    v3 = LAYOUTS["AnimateDiff v3"]
    merges = {f"{kind}.{i}.motion_modules.{j}.{ATTENTION}": width
              for kind, blocks in (("down_blocks", v3.down), ("up_blocks", v3.up))
              for i, block in enumerate(blocks) for j, width in enumerate(block)}
    with torch.device("meta"):
        meta = CameraCtrl(CameraCtrlConfig(merges=merges)).state_dict()
    g = torch.Generator().manual_seed(2)
    sd = {k: sinusoidal_encoding(v.shape[1], v.shape[2]).half() if k.endswith("pos_encoder.pe")
          else _random_like(k, v, g) for k, v in meta.items()}
    tmp = path.with_name(path.name + ".partial")
    save_file(sd, tmp, metadata=LABEL)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def server(e2e_server, e2e_models):
    folder = e2e_models / "animatediff_models"  # where Load CameraCtrl reads from, as Load Motion Module
    with removed_afterwards(folder / V3_MODULE, folder / CAMERA_CTRL):
        v3_module_file(folder / MOTION_MODULE, folder / V3_MODULE)
        camera_ctrl_file(folder / CAMERA_CTRL)
        yield e2e_server


def workflow():
    return json.loads((API / f"{NAME}_api.json").read_text())


def run(server, out_dir, graph):
    files = run_workflow(server, graph, SMALL, out_dir=out_dir, timeout=900)
    videos = [f for f in files if f.suffix == ".webp" and f.parent.name != "adm_previews"]
    assert len(videos) == 1, files
    return read_video(videos[0])[0]


def orbit_poses(frames, turn):
    """RealEstate10K lines (no URL line) of a camera that stays put and turns ``turn`` radians a frame about y."""
    lines = []
    for k in range(frames):
        c, s = math.cos(turn * k), math.sin(turn * k)
        matrix = (c, 0, -s, 0, 0, 1, 0, 0, s, 0, c, 0)
        lines.append(" ".join(f"{v:.9f}" for v in (k, 0.474812461, 0.844111024, 0.5, 0.5, 0, 0, *matrix)))
    return "\n".join(lines)


def test_the_shipped_poses_are_one_per_frame():
    graph = workflow()
    poses = [line for line in graph["5"]["inputs"]["pose_text"].splitlines() if line.strip()]
    assert len(poses) == graph["8"]["inputs"]["batch_size"] == FRAMES
    assert all(len(line.split()) == 19 for line in poses)


def test_cameractrl_workflow_renders_16_frames_that_follow_the_poses(server, tmp_path):
    frames = run(server, tmp_path / "shipped", workflow())
    assert frames.shape == (FRAMES, 64, 64, 3)
    turned = workflow()
    turned["5"]["inputs"]["pose_text"] = orbit_poses(FRAMES, -0.05)  # turning left instead of forward and right
    other = run(server, tmp_path / "turned", turned)
    assert other.shape == frames.shape
    per_frame = np.abs(frames.astype(int) - other.astype(int)).mean(axis=(1, 2, 3))
    assert per_frame.mean() > 0.5, per_frame  # the poses reach the clip
    # Every pose is relative to the first, so frame 0's camera is the same in both: the later frames, whose
    # cameras differ, must differ more than frame 0 does (the camera path, not a seed, made the change).
    assert per_frame[1:].mean() > per_frame[0], per_frame


def test_ui_workflow_is_the_same_graph_as_the_api_workflow(server):
    with urllib.request.urlopen(server + "/object_info", timeout=60) as response:
        object_info = json.load(response)
    ui = json.loads((UI / f"{NAME}.json").read_text())
    assert ui_to_api(ui, object_info) == workflow()

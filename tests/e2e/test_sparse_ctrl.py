"""SparseCtrl through the real ComfyUI server: the shipped rgb workflow (first and last frame given as images),
with a random-weight SparseCtrl file in the published SD1.5 layout, from images on disk to a saved clip."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from adm.headless.client import run_workflow
from adm.headless.demo_models import CHECKPOINT, LABEL, MOTION_MODULE
from adm.motion_modules.sparse_ctrl import RGB, SparseCtrlConfig, SparseCtrlModel
from adm.video import read_video
from conftest import ROOT, removed_afterwards

pytestmark = pytest.mark.e2e
SPARSE_CTRL = "RANDOM-WEIGHTS_v3_sd15_sparsectrl_rgb_for-testing.safetensors"
FRAMES = 8
SMALL = ["6.width=64", "6.height=64", f"6.batch_size={FRAMES}", "7.steps=2", "9.format=webp",
         f"1.ckpt_name={CHECKPOINT}", f"2.model_name={MOTION_MODULE}", f"10.sparsectrl_name={SPARSE_CTRL}",
         f"13.frames={FRAMES}", f'13.keyframes="0, {FRAMES - 1}"']


def random_sparse_ctrl(path):
    """The published rgb layout at SD1.5 size (formats.md §2.7), fp16 random weights scaled as the demo's
    stand-ins (1/sqrt(fan_in), unit norms, zero biases)."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        meta = SparseCtrlModel(SparseCtrlConfig(kind=RGB)).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, t in meta.items():
        if key.endswith("pos_encoder.pe"):
            continue  # optional in the files: regenerated on load
        if t.dim() == 1:
            sd[key] = (torch.ones if key.endswith("weight") else torch.zeros)(t.shape, dtype=torch.float16)
        else:
            sd[key] = (torch.randn(t.shape, generator=g) / math.sqrt(math.prod(t.shape[1:]))).half()
    tmp = path.with_name(path.name + ".partial")
    save_file(sd, tmp, metadata=LABEL)
    tmp.replace(path)


@pytest.fixture(scope="module")
def server(e2e_server, e2e_models, e2e_dirs):
    """The session's server (its extra_model_paths names the controlnet folder) with the stand-in SparseCtrl
    and two keyframe images."""
    controlnets = e2e_models / "controlnet"
    controlnets.mkdir(exist_ok=True)
    with removed_afterwards(controlnets / SPARSE_CTRL):
        if not (controlnets / SPARSE_CTRL).exists():
            random_sparse_ctrl(controlnets / SPARSE_CTRL)
        for name, colour in (("sparsectrl_first.png", (200, 40, 40)), ("sparsectrl_last.png", (40, 40, 200))):
            Image.new("RGB", (64, 64), colour).save(e2e_dirs["input"] / name)
        yield e2e_server


def run(server, out_dir, overrides=()):
    graph = json.loads((ROOT / "api_workflows" / "sparsectrl_rgb_api.json").read_text())
    files = run_workflow(server, graph, [*SMALL, *overrides], out_dir=out_dir, timeout=900)
    videos = [f for f in files if f.suffix == ".webp" and f.parent.name != "adm_previews"]
    assert len(videos) == 1, files
    return read_video(videos[0])[0]


def test_rgb_keyframes_workflow_renders_a_clip_the_keyframes_change(server, tmp_path):
    frames = run(server, tmp_path / "sparsectrl")
    assert frames.shape == (FRAMES, 64, 64, 3)
    # The same graph with KSampler taking the prompts directly: no SparseCtrl.
    plain = run(server, tmp_path / "plain", overrides=['7.positive=["4", 0]', '7.negative=["5", 0]'])
    assert np.abs(frames.astype(int) - plain.astype(int)).mean() > 0.5

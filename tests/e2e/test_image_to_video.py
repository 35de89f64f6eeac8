"""Image to video through the real ComfyUI server: the shipped PIA and AnimateLCM-I2V workflows (Load Image ->
image input node on Apply Motion Module's MODEL -> KSampler -> VAE Decode -> Save Video), posted over HTTP, from a
start image in the input folder, with random-weight stand-ins of pia.ckpt and AnimateLCM-I2V.ckpt in the real
layouts."""
import json
import os
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from adm.headless.client import run_workflow
from adm.headless.convert import ui_to_api
from adm.headless.demo_models import CHECKPOINT, LABEL, MOTION_MODULE, _random_like
from adm.motion_modules import LAYOUTS, MotionModule, published_state_dict
from adm.video import read_video
from conftest import ROOT, removed_afterwards

pytestmark = pytest.mark.e2e
API, UI = ROOT / "api_workflows", ROOT / "example_workflows"
INPUT = "image_to_video_input.png"  # the file the workflows' Load Image names
FILES = {"PIA": "RANDOM-WEIGHTS_pia_for-testing.safetensors",
         "AnimateLCM-I2V": "RANDOM-WEIGHTS_AnimateLCM-I2V_for-testing.safetensors"}
WORKFLOWS = {"PIA": "pia", "AnimateLCM-I2V": "lcm_i2v"}
SMALL = ["8.width=64", "8.height=64", "8.batch_size=8", "9.steps=1", "11.format=webp", f"1.ckpt_name={CHECKPOINT}"]


def image_to_video_file(family, v2_path, path):
    """The random v2 stand-in's motion modules plus the family's own weights, in the published layout (cached)."""
    if path.exists():
        return
    motion = load_file(v2_path)
    with torch.device("meta"):
        extra = {k: v for k, v in published_state_dict(MotionModule(LAYOUTS[family])).items()
                 if k.startswith(("conv_in.", "img_encoder."))}
    g = torch.Generator().manual_seed(1)
    sd = {**motion, **{k: _random_like(k, v, g) for k, v in extra.items()}}
    if family == "AnimateLCM-I2V":
        sd = {k: v for k, v in sd.items() if not k.endswith("pos_encoder.pe")}  # as AnimateLCM's files
    tmp = path.with_name(path.name + ".partial")
    save_file(sd, tmp, metadata=LABEL)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def server(e2e_server, e2e_models):
    folder = e2e_models / "animatediff_models"
    with removed_afterwards(*(folder / name for name in FILES.values())):
        for family, name in FILES.items():
            image_to_video_file(family, folder / MOTION_MODULE, folder / name)
        yield e2e_server


def start_image(folder, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels[16:48, 16:48] = (255, 200, 40)  # a square, so the image has structure
    Image.fromarray(pixels).save(folder / INPUT)


def run(server, tmp_path, family, overrides=()):
    graph = json.loads((API / f"{WORKFLOWS[family]}_api.json").read_text())
    files = run_workflow(server, graph, [*SMALL, f"2.model_name={FILES[family]}", *overrides],
                         out_dir=tmp_path, timeout=600)
    videos = [f for f in files if f.suffix == ".webp"]
    assert len(videos) == 1, files
    frames, _ = read_video(videos[0])
    return frames


def test_pia_workflow_animates_the_start_image(server, e2e_dirs, tmp_path):
    start_image(e2e_dirs["input"], 0)
    first = run(server, tmp_path / "a", "PIA")
    assert first.shape == (8, 64, 64, 3)
    start_image(e2e_dirs["input"], 1)
    other = run(server, tmp_path / "b", "PIA")
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 0.5  # the image reaches the clip


def test_animatelcm_i2v_workflow_animates_the_start_image(server, e2e_dirs, tmp_path):
    start_image(e2e_dirs["input"], 0)
    frames = run(server, tmp_path, "AnimateLCM-I2V")
    assert frames.shape == (8, 64, 64, 3)


@pytest.mark.parametrize("name", WORKFLOWS.values())
def test_ui_workflows_are_the_same_graphs_as_the_api_workflows(server, name):
    with urllib.request.urlopen(server + "/object_info", timeout=60) as response:
        object_info = json.load(response)
    ui = json.loads((UI / f"{name}.json").read_text())
    assert ui_to_api(ui, object_info) == json.loads((API / f"{name}_api.json").read_text())

"""Hostile prompts against the real server: each is refused with a message naming the input, the server keeps
answering after it, a good prompt still renders, and the plain model samples bit-identically to before."""
import json
import math
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adm.headless.client import run_workflow
from adm.headless.demo_models import CHECKPOINT, MOTION_MODULE
from adm.headless.errors import WorkflowError
from adm.motion_modules import published_state_dict
from adm.video import read_video
from conftest import ROOT
from unets import tiny_motion_patcher

pytestmark = pytest.mark.e2e
WORKFLOWS = ROOT / "api_workflows"
SMALL = ["6.width=64", "6.height=64", "6.batch_size=8", "7.steps=2", "9.format=webp",
         f"1.ckpt_name={CHECKPOINT}", f"2.model_name={MOTION_MODULE}"]
PLAIN = ['7.model=["1", 0]']  # KSampler takes the checkpoint's own model


@pytest.fixture(scope="module")
def hostile_files(e2e_models):
    folder = e2e_models / "animatediff_models"
    looped = {}
    looped["state_dict"] = looped
    torch.save(looped, folder / "hostile_contains_itself.ckpt")
    weights = {k: v.clone() for k, v in published_state_dict(tiny_motion_patcher().model).items()}
    next(v for k, v in weights.items() if k.endswith("proj_out.weight"))[0, 0] = math.nan
    save_file(weights, str(folder / "hostile_nan_weights.safetensors"))


def run(server, tmp_path, overrides=(), workflow="txt2vid_api.json"):
    base = SMALL if workflow != "vid2vid_api.json" else SMALL[-3:]  # its node 6 is Load Video
    files = run_workflow(server, json.loads((WORKFLOWS / workflow).read_text()), [*base, *overrides],
                         out_dir=tmp_path, timeout=600)
    (video,) = [f for f in files if f.suffix == ".webp"]
    return read_video(video)[0]


def answers(server):
    with urllib.request.urlopen(f"{server}/system_stats", timeout=30) as reply:
        return reply.status == 200


HOSTILE = [
    ("txt2vid_api.json", ["2.model_name=hostile_contains_itself.ckpt"], r"hostile_contains_itself\.ckpt.*contains itself"),
    ("txt2vid_api.json", ["2.model_name=hostile_nan_weights.safetensors"], r"hostile_nan_weights\.safetensors.*NaN/inf"),
    ("txt2vid_api.json", ["3.motion_scale=NaN"], r"motion_scale must be a number from 0 to 10"),
    ("txt2vid_api.json", ["3.effect=NaN"], r"effect must be a number from 0 to 1"),
    ("txt2vid_api.json", ['3.motion_scale_per_frame="1, 1e400"'], r"motion_scale must be.*inf"),
    ("prompt_travel_api.json", ["4.frames=4", "4.text=0: a cat"], r"frames is 4, but the latent batch has 8"),
    ("vid2vid_api.json", ["6.video=../../../../etc/passwd"], r"passwd"),
    ("vid2vid_api.json", ["6.path=/etc/passwd"], r"ADM_VIDEO_FOLDERS"),
]


def test_hostile_prompts_are_refused_and_the_server_keeps_serving(e2e_server, hostile_files, tmp_path):
    server = e2e_server
    plain_before = run(server, tmp_path / "plain_before", PLAIN)
    for n, (workflow, overrides, message) in enumerate(HOSTILE):
        with pytest.raises(WorkflowError, match=message):
            run(server, tmp_path / f"bad{n}", overrides, workflow)
        assert answers(server), overrides
    animated = run(server, tmp_path / "good")
    assert animated.shape == (8, 64, 64, 3)
    assert np.array_equal(run(server, tmp_path / "plain_after", PLAIN), plain_before)

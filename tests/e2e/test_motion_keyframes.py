"""Step keyframes with two motion modules through the real ComfyUI server: the shipped workflow, posted over HTTP."""
import json

import numpy as np
import pytest

from adm.headless.client import run_workflow
from adm.headless.demo_models import CHECKPOINT, MOTION_MODULE
from adm.video import read_video
from conftest import ROOT

pytestmark = pytest.mark.e2e
WORKFLOW = ROOT / "api_workflows" / "motion_keyframes_api.json"
# Tiny clip; both loaders take the random test module (the shipped file names v2 and v3 modules).
SMALL = ["6.width=64", "6.height=64", "6.batch_size=8", "7.steps=3", "9.format=webp", f"1.ckpt_name={CHECKPOINT}",
         f"2.model_name={MOTION_MODULE}", f"10.model_name={MOTION_MODULE}"]


def run(server, out_dir, overrides=()):
    files = run_workflow(server, json.loads(WORKFLOW.read_text()), [*SMALL, *overrides], out_dir=out_dir, timeout=600)
    videos = [f for f in files if f.suffix == ".webp" and f.parent.name != "adm_previews"]
    assert len(videos) == 1, files
    return read_video(videos[0])[0]


def test_step_keyframes_with_two_modules_run_and_reach_the_sampler(e2e_server, tmp_path):
    keyed = run(e2e_server, tmp_path / "keyed")
    assert keyed.shape == (8, 64, 64, 3)
    # The same graph with both keyframes at motion_scale 0: no motion from the first step, a clearly other clip
    # (the random test module changes a clip by more than 1 level on average, see test_txt2vid).
    still = run(e2e_server, tmp_path / "still", ["11.motion_scale=0", "12.motion_scale=0"])
    assert still.shape == keyed.shape
    assert np.abs(keyed.astype(int) - still.astype(int)).mean() > 1.0

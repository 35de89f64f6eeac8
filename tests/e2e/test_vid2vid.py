"""Video-to-video through the real ComfyUI server: a clip with sound in the input folder, the shipped workflow
(Load Video -> VAE Encode -> KSampler with the motion module -> VAE Decode -> Save Video), posted over HTTP."""
import json
import urllib.request

import numpy as np
import pytest

from adm.headless.client import run_workflow
from adm.headless.convert import ui_to_api
from adm.headless.demo_models import CHECKPOINT, MOTION_MODULE
from adm.video import iter_frames, probe, read_audio, write_video
from conftest import ROOT

pytestmark = pytest.mark.e2e
API, UI = ROOT / "api_workflows", ROOT / "example_workflows"
SOURCE = "vid2vid_input.mp4"  # the file the workflows' Load Video names
RATE = 44100
SMALL = [f"1.ckpt_name={CHECKPOINT}", f"2.model_name={MOTION_MODULE}", "7.steps=1", "6.shortest_side=64"]


@pytest.fixture(scope="module")
def folders(e2e_dirs):
    return e2e_dirs["input"], e2e_dirs["output"]


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server


def source_clip(folder):
    """8 frames, 64x64, 8 fps, each a different colour, with 1 s of a 440 Hz tone."""
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    for i in range(8):
        frames[i] = (30 * i, 255 - 30 * i, 128)
        frames[i, 8 * i:8 * i + 16, 8:24] = 255  # a square moving down
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)).astype(np.float32)[None]
    return write_video(frames, folder / SOURCE, "mp4", 8, audio=(tone, RATE))


def test_vid2vid_keeps_the_sources_frame_count_size_rate_and_sound(server, folders, tmp_path):
    source = probe(source_clip(folders[0]))
    assert (source["frames"], source["width"], source["fps"], source["has_audio"]) == (8, 64, 8.0, True)
    files = run_workflow(server, json.loads((API / "vid2vid_api.json").read_text()), SMALL,
                         out_dir=tmp_path, timeout=600)
    videos = [f for f in files if f.suffix == ".mp4"]
    assert len(videos) == 1, files
    info = probe(videos[0])
    assert (info["frames"], info["width"], info["height"]) == (8, 64, 64)
    assert info["fps"] == pytest.approx(8) and info["has_audio"]
    assert len(list(iter_frames(videos[0]))) == 8
    sound, rate = read_audio(videos[0])
    assert rate == RATE and sound.shape == (1, RATE)  # the source's 8 frames at 8 fps = 1 s of its sound
    spectrum = np.abs(np.fft.rfft(sound[0, 2048:-2048]))
    assert np.argmax(spectrum) * RATE / (RATE - 4096) == pytest.approx(440, abs=3)


def test_ui_workflow_is_the_same_graph_as_the_api_workflow(server):
    with urllib.request.urlopen(server + "/object_info", timeout=60) as response:
        object_info = json.load(response)
    ui = json.loads((UI / "vid2vid.json").read_text())
    api = json.loads((API / "vid2vid_api.json").read_text())
    assert ui_to_api(ui, object_info) == api

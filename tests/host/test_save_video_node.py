"""ADM_SaveVideo called the way the host calls it: output folder, counter, subfolders, metadata, ui dict."""
import json
import os

import folder_paths
import numpy as np
import pytest
import torch

from adm.nodes.save_video import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, SaveVideo
from adm.video import read_metadata, read_video

PROMPT = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}}
EXTRA_PNGINFO = {"workflow": {"nodes": [{"id": 3, "type": "KSampler"}], "links": []}}


@pytest.fixture
def output_dir(tmp_path):
    previous = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    yield tmp_path / "output"
    folder_paths.set_output_directory(previous[0])
    folder_paths.set_temp_directory(previous[1])


def images(n=8, h=48, w=64):
    """A float IMAGE batch in 0..1: a horizontal gradient with a bright square moving right."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    batch = torch.zeros(n, h, w, 3)
    for i in range(n):
        batch[i, ..., 0] = x / w
        batch[i, ..., 1] = y / h
        batch[i, ..., 2] = 0.5
        batch[i, 10:22, 4 + 4 * i:16 + 4 * i] = torch.tensor([0.9, 0.8, 0.2])
    return batch


def save(**overrides):
    kwargs = dict(images=images(), frame_rate=8.0, loop_count=0, filename_prefix="AnimateDiff", format="mp4",
                  pingpong=False, mp4_crf=18, prompt=PROMPT, extra_pnginfo=EXTRA_PNGINFO)
    kwargs.update(overrides)
    return SaveVideo().save(**kwargs)


def test_registration_and_schema():
    assert NODE_CLASS_MAPPINGS == {"ADM_SaveVideo": SaveVideo}
    assert NODE_DISPLAY_NAME_MAPPINGS == {"ADM_SaveVideo": "Save MP4/GIF/WebP (AnimateDiff)"}
    assert SaveVideo.OUTPUT_NODE is True
    assert SaveVideo.CATEGORY == "AnimateDiff Motion/video"
    assert SaveVideo.RETURN_TYPES == ("STRING",) and SaveVideo.DESCRIPTION
    assert callable(getattr(SaveVideo, SaveVideo.FUNCTION))
    spec = SaveVideo.INPUT_TYPES()
    required = spec["required"]
    assert list(required) == ["images", "frame_rate", "loop_count", "filename_prefix", "format", "pingpong"]
    assert list(spec["optional"]) == ["mp4_crf", "audio"]  # mp4_crf stays the sixth widget, where "quality" was
    for name, (kind, options) in required.items():
        assert options.get("tooltip"), name
    assert required["images"][0] == "IMAGE"
    assert required["frame_rate"][1]["default"] == 8
    assert required["loop_count"][1]["default"] == 0
    assert required["filename_prefix"][1]["default"] == "AnimateDiff"
    assert required["format"][0] == ["mp4", "gif", "webp"] and required["format"][1]["default"] == "mp4"
    assert required["pingpong"][1]["default"] is False
    crf = spec["optional"]["mp4_crf"]
    assert crf[0] == "INT" and (crf[1]["min"], crf[1]["default"], crf[1]["max"]) == (0, 18, 51)
    assert "lower = better" in crf[1]["tooltip"] and "MP4 only" in crf[1]["tooltip"]
    assert spec["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_saves_in_the_output_folder_with_an_incrementing_counter(output_dir, fmt):
    first = save(format=fmt)
    second = save(format=fmt)
    names = [f"AnimateDiff_00001_.{fmt}", f"AnimateDiff_00002_.{fmt}"]
    assert sorted(os.listdir(output_dir)) == names  # no temporary files left
    for result, name in zip((first, second), names):
        saved = {"filename": name, "subfolder": "", "type": "output"}
        assert saved in result["ui"].get("video", result["ui"]["images"])
        assert result["result"] == (os.path.join(str(output_dir), name),)
    frames, fps = read_video(first["result"][0])
    assert frames.shape == (8, 48, 64, 3)
    assert fps == pytest.approx(8, rel=1e-2)


def test_subfolder_in_prefix(output_dir):
    result = save(filename_prefix="clips/run1/cat", format="gif")
    entry = result["ui"]["video"][0]
    assert entry == {"filename": "cat_00001_.gif", "subfolder": os.path.join("clips", "run1"), "type": "output"}
    assert os.path.isfile(output_dir / "clips" / "run1" / "cat_00001_.gif")


def test_prefix_outside_the_output_folder_is_refused(output_dir):
    with pytest.raises(Exception, match="outside the output folder"):
        save(filename_prefix="../escape")


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_prompt_and_workflow_are_embedded(output_dir, fmt):
    metadata = read_metadata(save(format=fmt)["result"][0])
    assert json.loads(metadata["prompt"]) == PROMPT
    assert json.loads(metadata["workflow"]) == EXTRA_PNGINFO["workflow"]


def test_disable_metadata_is_respected(output_dir, monkeypatch):
    from comfy.cli_args import args

    monkeypatch.setattr(args, "disable_metadata", True)
    for fmt in ("mp4", "gif", "webp"):
        metadata = read_metadata(save(format=fmt)["result"][0])
        assert "prompt" not in metadata and "workflow" not in metadata


def test_no_hidden_inputs_saves_without_metadata(output_dir):
    path = save(format="webp", prompt=None, extra_pnginfo=None)["result"][0]
    assert read_metadata(path) == {}


def test_pingpong_loop_and_pixels(output_dir):
    batch = images()
    path = save(images=batch, format="webp", pingpong=True, loop_count=2)["result"][0]
    frames, _ = read_video(path)
    expected = (batch * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(frames, np.concatenate([expected, expected[-2:0:-1]]))
    from adm.video import probe
    assert probe(path)["loop"] == 2


def test_mp4_crf_lower_is_better_and_bigger(output_dir):
    good = save(mp4_crf=10)["result"][0]
    small = save(mp4_crf=40)["result"][0]
    assert os.path.getsize(small) < os.path.getsize(good)


def test_api_workflows_with_the_old_input_name_quality_keep_their_value(output_dir):
    """The host passes a node only its declared inputs, so a prompt saved with "quality" reaches save() without
    mp4_crf; the value is taken from the node's entry in the (hidden) prompt."""
    old = {"9": {"class_type": "ADM_SaveVideo", "inputs": {"quality": 40}}}
    size = {crf: os.path.getsize(save(mp4_crf=crf, prompt=old)["result"][0]) for crf in (18, 40)}
    legacy = os.path.getsize(save(mp4_crf=None, prompt=old, unique_id="9")["result"][0])
    assert abs(legacy - size[40]) < (size[18] - size[40]) / 10
    without = os.path.getsize(save(mp4_crf=None, prompt=old, unique_id="3")["result"][0])  # not this node's entry
    assert abs(without - size[18]) < (size[18] - size[40]) / 10
    hostile = {"9": {"class_type": "ADM_SaveVideo", "inputs": {"quality": 999}}}  # outside the old input's range
    out_of_range = os.path.getsize(save(mp4_crf=None, prompt=hostile, unique_id="9")["result"][0])
    assert abs(out_of_range - size[18]) < (size[18] - size[40]) / 10


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_the_node_preview_is_an_animated_looping_webp(output_dir, fmt):
    """The editor plays an "animated" WebP in an <img> (autoplay, silent, looping) but puts MP4 (and GIF) into a
    paused <video> element, so the node shows a WebP: the saved one, or a copy in the temp folder."""
    from adm.video import probe

    result = save(format=fmt, pingpong=True)
    ui = result["ui"]
    assert ui["animated"] == (True,)
    (preview,) = ui["images"]
    assert preview["filename"].endswith(".webp")
    root = output_dir if fmt == "webp" else folder_paths.get_temp_directory()
    assert preview["type"] == ("output" if fmt == "webp" else "temp")
    path = os.path.join(root, preview["subfolder"], preview["filename"])
    info = probe(path)
    assert info["loop"] == 0 and info["frames"] == 14 and info["fps"] == pytest.approx(8, rel=1e-2)
    if fmt != "webp":
        assert ui["video"] == [{"filename": f"AnimateDiff_00001_.{fmt}", "subfolder": "", "type": "output"}]


def test_empty_batch_is_a_clear_error_and_saves_nothing(output_dir):
    with pytest.raises(ValueError, match="empty batch"):
        save(images=torch.zeros(0, 48, 64, 3))
    assert os.listdir(output_dir) == []


def test_out_of_range_values_and_alpha_are_handled(output_dir):
    batch = images(n=4)
    batch[0, 0, 0] = torch.tensor([-1.0, 2.0, 0.5])
    rgba = torch.cat([batch, torch.ones(4, 48, 64, 1)], dim=-1)
    frames, _ = read_video(save(images=rgba, format="webp")["result"][0])
    assert frames.shape == (4, 48, 64, 3)
    assert tuple(frames[0, 0, 0]) == (0, 255, 128)

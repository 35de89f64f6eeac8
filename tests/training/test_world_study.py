"""The small world's study (issue 15) end to end in miniature: every model trains, every row samples through
the host's KSampler with the extension's patching, every metric comes out a number, and the files decode. The
figures themselves need the full run (``python -m headless world``)."""
import dataclasses
import json
import math

import pytest
import torch

from adm.video.decode import read_video
from adm.world import models, scenes, study

pytestmark = pytest.mark.training


def _numbers(value, where=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)):
        yield where, value


def test_mini_study_measures_every_row_and_writes_its_files(tmp_path):
    results = study.run(tmp_path, study.MINI, log=lambda text: None)
    assert set(results["table"]) == {"base + module", "personalized + module", "personalized alone", "base alone"}
    for row in results["table"].values():
        assert {"direction_accuracy", "cosine", "speed_ratio", "appearance_change", "ocean_share"} <= set(row)
    assert {"context windows (64 frames, 16/4)", "FreeInit (2 iterations)", "motion LoRA pan left", "motion scale",
            "GroupNorm across frames", "prompt travel (red -> green at frame 8)", "SparseCtrl keyframe (frame 0/5/10/15)",
            "SparseCtrl keyframe at 40 of 48 frames, windows 16/4"} == set(results["features"])
    keyframe = results["features"]["SparseCtrl keyframe (frame 0/5/10/15)"]
    assert set(keyframe) == {"pull_at_keyframe", "pull_far", "distance_ratio", "object_error_px"}
    assert set(results["features"]["motion scale"]) == {"0.0", "0.5", "1.0", "1.5"}
    bad = [(where, v) for where, v in _numbers(results) if not math.isfinite(v)]
    assert not bad, f"metrics that are not numbers: {bad}"

    assert json.loads((tmp_path / "study.json").read_text())["table"].keys() == results["table"].keys()
    table = (tmp_path / "study.md").read_text()
    assert "| personalized + module |" in table and "motion LoRA" in table and "| SparseCtrl keyframe" in table
    gifs = sorted((tmp_path / "gifs").glob("*.gif"))
    assert len(gifs) >= 5
    frames, _ = read_video(gifs[0])
    assert frames.shape[0] == 16 and frames.shape[-1] == 3

    # The models are kept: building the world again trains nothing (no progress bar asked for, no file rewritten).
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "models").iterdir()}
    trained = []
    study.build_world(tmp_path, study.MINI, log=lambda text: None, bar=lambda name: trained.append(name))
    assert not trained and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "models").iterdir()} == stamps
    # Another LoRA setting trains the LoRA again and nothing it does not depend on; another base setting, all of it.
    study.build_world(tmp_path, dataclasses.replace(study.MINI, lora_steps=3), log=lambda text: None,
                      bar=lambda name: trained.append(name))
    assert trained == ["motion LoRA (pan left)"]
    trained.clear()
    study.build_world(tmp_path, dataclasses.replace(study.MINI, base_steps=2), log=lambda text: None,
                      bar=lambda name: trained.append(name))
    assert trained == ["base model", "personalized model", "motion module", "motion LoRA (pan left)", "SparseCtrl (rgb)"]


def test_world_latents_decode_exactly_and_captions_tokenize():
    images, captions = scenes.image_batch(seed=3, count=4)
    latent = models.to_latent(images)
    assert latent.shape == (4, 12, scenes.SIZE // 2, scenes.SIZE // 2)
    assert torch.allclose(models.to_pixels(latent), images, atol=1e-6)  # exact but for float rounding
    fmt = models.WorldLatent()
    assert torch.allclose(fmt.process_out(fmt.process_in(latent)), latent, atol=1e-6)
    ids = models.tokenize(captions + [""])
    assert ids.shape == (5, models.TOKENS) and (ids[-1, 1:] == models.PAD).all()
    with pytest.raises(ValueError, match="'dog' not in the world's vocabulary"):
        models.tokenize(["a red dog on a plain background"])

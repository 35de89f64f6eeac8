"""Training data: videos + captions -> clips (frames, stride, crop, range), skipped files, the sharded sampler,
the latent cache. Pure: no host model, tiny files made here."""
import logging
import os
import random

import numpy as np
import pytest
import torch

from adm.training.dataset import (ClipSpec, DatasetError, LatentCache, ShardedSampler, VideoDataset, clip_indices,
                                  fit_frame, read_captions_csv)
from adm.video import write_video


def numbered_frames(count: int, height: int = 24, width: int = 32, red: int = 8) -> np.ndarray:
    """Frame i is a flat grey of level 8 * i (distinct frames, so GIF/WebP keep them all), with a red band of
    ``red`` columns on the left."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i] = 8 * i
        frames[i, :, :red] = (255, 0, 0)
    return frames


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "videos"
    write_video(numbered_frames(30), root / "1001.webp", "webp", fps=8)           # lossless: exact levels
    write_video(numbered_frames(12), root / "walk" / "dog.gif", "gif", fps=8)
    write_video(numbered_frames(20, 48, 64, red=2), root / "wide.mp4", "mp4", fps=8)
    (root / "walk" / "dog.txt").write_text("a dog walks\n")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (root / "captions.csv").write_text("videoid,name,page_dir\n1001,grey fades in,x\nwalk/dog.gif,csv loses,x\n"
                                       "9999,a video nobody downloaded,x\n")
    return root


def test_captions_come_from_the_csv_or_a_txt_beside_the_video_and_problems_are_listed(folder, caplog):
    with caplog.at_level(logging.WARNING):
        data = VideoDataset(folder, ClipSpec(frames=4, stride=2, width=16, height=16))
    captions = {v.name: v.caption for v in data.videos}
    assert captions == {"1001.webp": "grey fades in", "walk/dog.gif": "a dog walks", "wide.mp4": ""}
    assert {v.name: v.frames for v in data.videos} == {"1001.webp": 30, "walk/dog.gif": 12, "wide.mp4": 20}
    skipped = dict(data.skipped)
    assert set(skipped) == {"broken.mp4", "9999"} and "no such video" in skipped["9999"]
    report = data.report()
    assert "3 videos" in report and "1 without a caption" in report and "broken.mp4" in report
    assert "broken.mp4" in caplog.text  # the log lists every skipped file


def test_a_clip_has_the_frames_of_the_recipe_cropped_and_in_minus_one_to_one(folder):
    spec = ClipSpec(frames=4, stride=3, width=16, height=16, caption_dropout=0.0)
    data = VideoDataset(folder, spec)
    index = [v.name for v in data.videos].index("1001.webp")
    clip = data.load(index, random.Random(5))
    start = clip.indices[0]
    assert clip.indices == (start, start + 3, start + 6, start + 9) and 0 <= start <= 30 - 10
    assert clip.pixels.shape == (4, 3, 16, 16) and clip.pixels.dtype == torch.float32
    assert clip.pixels.min() >= -1.0 and clip.pixels.max() <= 1.0
    # Frame i is grey 8 * i: the centre of each clip frame says which source frame it came from.
    centre = (clip.pixels[:, 1, 8, 8] + 1) / 2 * 255
    torch.testing.assert_close(centre, torch.tensor([8.0 * i for i in clip.indices]), atol=1.0, rtol=0)
    assert clip.caption == "grey fades in"
    again = data.load(index, random.Random(5))  # all randomness comes from the rng
    assert again.indices == clip.indices and torch.equal(again.pixels, clip.pixels)


def test_frame_indices_follow_the_original_sampling():
    spec = ClipSpec(frames=16, stride=4)
    starts = set()
    for seed in range(50):
        indices = clip_indices(100, spec, random.Random(seed))
        assert np.diff(indices).tolist() == [4] * 15 and indices[-1] < 100
        starts.add(indices[0])
    assert min(starts) >= 0 and max(starts) <= 100 - 61 and len(starts) > 10
    # A video shorter than the 61-frame span is squeezed: indices spread (floored) over all of it.
    assert clip_indices(20, spec, random.Random(0)) == [int(i * 19 / 15) for i in range(16)]
    assert clip_indices(100, ClipSpec(frames=4, stride=4, random_start=False), random.Random(0)) == [0, 4, 8, 12]


def test_resize_covers_the_target_then_crops_the_centre():
    frame = np.zeros((40, 80, 3), dtype=np.uint8)
    frame[:, :20] = 255          # the outer quarters are white; the centre half is black
    frame[:, 60:] = 255
    out = fit_frame(frame, 16, 16)
    assert out.shape == (3, 16, 16)
    # 40x80 -> 16x32 (short side to 16), centre 16 columns = source columns 20..60: black (but for the
    # antialiasing filter's reach at the two edges).
    assert out[..., 1:-1].max() <= -0.95 and out.mean() < -0.9
    tall = fit_frame(np.full((64, 16, 3), 255, dtype=np.uint8), 8, 16)  # non-square target: cover, then crop
    assert tall.shape == (3, 16, 8) and torch.allclose(tall, torch.ones_like(tall))


def test_wide_mp4_clips_are_center_cropped_and_long_frame_gaps_decode(folder):
    data = VideoDataset(folder, ClipSpec(frames=3, stride=9, width=16, height=16, caption_dropout=0.0,
                                         random_start=False))
    index = [v.name for v in data.videos].index("wide.mp4")
    clip = data.load(index, random.Random(0))
    assert clip.indices == (0, 9, 18) and clip.pixels.shape == (3, 3, 16, 16)
    # The red 2-pixel edge of the 64-wide frame is outside the centre crop of the 32-wide resized frame.
    assert (clip.pixels[:, 0] - clip.pixels[:, 1]).abs().max() < 0.2


def test_caption_dropout_and_flip_draw_from_the_rng(folder):
    data = VideoDataset(folder, ClipSpec(frames=2, stride=1, width=16, height=16, caption_dropout=0.5, hflip=True))
    index = [v.name for v in data.videos].index("1001.webp")
    clips = [data.load(index, random.Random(seed)) for seed in range(40)]
    dropped = sum(c.caption == "" for c in clips)
    flipped = [c for c in clips if c.flipped]
    assert 8 <= dropped <= 32 and 8 <= len(flipped) <= 32
    # The red band moves from the left to the right when flipped.
    assert all(c.pixels[0, 0, 8, -1] > c.pixels[0, 1, 8, -1] + 1 for c in flipped)
    assert all(c.pixels[0, 0, 8, 0] > c.pixels[0, 1, 8, 0] + 1 for c in clips if not c.flipped)
    never = VideoDataset(folder, ClipSpec(frames=2, stride=1, width=16, height=16, caption_dropout=0.0))
    assert all(never.load(index, random.Random(s)).caption for s in range(10))


def test_a_video_that_fails_while_training_is_skipped_and_replaced(folder):
    data = VideoDataset(folder, ClipSpec(frames=2, stride=1, width=16, height=16))
    gif = [v.name for v in data.videos].index("walk/dog.gif")
    (folder / "walk" / "dog.gif").write_bytes(b"GIF89a broken now")
    clip = data.load(gif, random.Random(3))
    assert clip.video.name != "walk/dog.gif"
    assert "walk/dog.gif" in dict(data.skipped)


def test_empty_or_missing_folders_are_refused_readably(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        VideoDataset(tmp_path / "nope")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(DatasetError, match=r"no readable videos.*1 skipped"):
        VideoDataset(tmp_path)
    with pytest.raises(DatasetError, match="multiples of 8"):
        ClipSpec(width=30)


def test_csv_column_names_can_be_given(tmp_path):
    write_video(numbered_frames(4), tmp_path / "clip_a.webp", "webp", fps=8)
    (tmp_path / "meta.csv").write_text("file,description\nclip_a.webp,a grey ramp\n")
    with pytest.raises(DatasetError, match="no caption column"):
        VideoDataset(tmp_path)
    data = VideoDataset(tmp_path, captions="meta.csv", caption_column="description")
    assert data.videos[0].caption == "a grey ramp"


def test_sampler_deals_disjoint_equal_shards_and_resumes_exactly():
    size, world = 7, 2
    samplers = [ShardedSampler(size, batch_size=2, seed=3, rank=r, world_size=world) for r in range(world)]
    epoch = [[i for _ in range(2) for i, _ in s.next_batch()] for s in samplers]  # 4 per rank: one padded epoch
    assert set(epoch[0] + epoch[1]) == set(range(7)) and len(epoch[0]) == len(epoch[1]) == 4
    assert len(set(epoch[0]) & set(epoch[1])) <= 1  # only the padding repeats a clip
    a = ShardedSampler(size, 3, seed=1)
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    expected = [(i, rng.random()) for i, rng in a.next_batch()]
    b = ShardedSampler(size, 3, seed=1)
    b.load_state_dict(state)
    assert [(i, rng.random()) for i, rng in b.next_batch()] == expected
    assert state["epoch"] == 1  # 12 clips of a 7-clip dataset: into the second epoch


def test_latent_cache_is_keyed_by_file_version_crop_and_encoder(folder, tmp_path):
    data = VideoDataset(folder, ClipSpec(frames=3, stride=2, width=16, height=16))
    clip = data.load(0, random.Random(0))
    cache = LatentCache(tmp_path / "cache", encoder="vae-a")
    assert cache.get(clip) is None
    latents = torch.randn(3, 4, 2, 2)
    cache.put(clip, latents)
    assert torch.equal(cache.get(clip), latents) and (cache.hits, cache.misses) == (1, 1)
    assert LatentCache(tmp_path / "cache", encoder="vae-b").get(clip) is None
    # Another clip sharing frames reuses them; a new frame is a miss.
    shifted = data.load(0, random.Random(0))
    shifted.indices = clip.indices[:2] + (clip.indices[2] + 1,)
    assert cache.get(shifted) is None
    shifted.indices = clip.indices
    assert cache.get(shifted) is not None
    # Editing the video (new mtime) makes every entry stale.
    path = clip.video.path
    os.utime(path, ns=(clip.video.mtime_ns + 10**9, clip.video.mtime_ns + 10**9))
    edited = VideoDataset(folder, data.spec).load(0, random.Random(0))
    assert cache.get(edited) is None


def test_clips_past_the_end_of_a_truncated_video_are_skipped_with_the_reason(tmp_path, caplog):
    import av
    full = write_video(numbered_frames(8, 16, 16), tmp_path / "cut.mp4", "mp4", fps=8)
    with av.open(full) as container:  # cut right after the 3rd video packet: 8 frames declared, 3 decode
        pos, size = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size][2]
    with open(full, "r+b") as f:
        f.truncate(pos + size)
    write_video(numbered_frames(8, 16, 16), tmp_path / "ok.webp", "webp", fps=8)
    spec = ClipSpec(frames=4, stride=2, width=16, height=16, random_start=False, caption_dropout=0.0)
    data = VideoDataset(tmp_path, spec)
    cut = [v.name for v in data.videos].index("cut.mp4")
    assert data.videos[cut].frames == 8  # the header's count; the cut shows only when decoding
    with caplog.at_level(logging.WARNING):
        clips = [data.load(cut, random.Random(seed)) for seed in range(3)]  # frames 0, 2, 4, 6: past the 3rd
    assert all(c.video.name == "ok.webp" for c in clips)  # replaced, never padded with a repeated frame
    reasons = [reason for name, reason in data.skipped if name == "cut.mp4"]
    assert len(reasons) == 1 and "truncated: only 3 of the 8 frames its header declares decode" in reasons[0]
    assert "cut.mp4" in data.report() and "truncated" in caplog.text
    short = VideoDataset(tmp_path, ClipSpec(frames=2, stride=1, width=16, height=16, random_start=False))
    assert short.load(cut, random.Random(0)).video.name == "cut.mp4"  # clips inside the readable part still load


def test_captions_csv_in_utf16_with_bom_and_utf8_with_or_without_bom_is_read(tmp_path):
    for encoding in ("utf-16", "utf-16-be", "utf-8-sig", "utf-8"):
        bom = "\ufeff" if encoding == "utf-16-be" else ""  # "utf-16" writes its own BOM; big-endian needs one
        (tmp_path / "caps.csv").write_bytes(f"{bom}file,caption\nclip_a.webp,café au lait ☕\n".encode(encoding))
        assert read_captions_csv(tmp_path / "caps.csv") == {"clip_a.webp": "café au lait ☕"}, encoding


@pytest.mark.parametrize("encoding, fragment", [("latin-1", "byte 0xe9"), ("utf-16-le", "NUL bytes"),
                                                ("utf-16-be", "NUL bytes")])
def test_captions_csv_in_other_encodings_is_refused_naming_the_file_and_the_fix(tmp_path, encoding, fragment):
    write_video(numbered_frames(4), tmp_path / "clip_a.webp", "webp", fps=8)
    (tmp_path / "caps.csv").write_bytes("file,caption\nclip_a.webp,café au lait\n".encode(encoding))
    for call in (lambda: read_captions_csv(tmp_path / "caps.csv"),
                 lambda: VideoDataset(tmp_path, ClipSpec(frames=2, width=16, height=16))):
        with pytest.raises(DatasetError) as refused:
            call()
        message = str(refused.value)
        assert str(tmp_path / "caps.csv") in message and fragment in message and "Save it as UTF-8" in message

"""video.write_video / read_video / read_metadata: GIF, WebP and MP4 round trips on small synthetic clips."""
import json
import os
import stat
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from adm.video import encode, probe, read_metadata, read_video, write_video

FORMATS = ["mp4", "gif", "webp"]


def natural_frames(n=16, h=48, w=64):
    """Deterministic 'natural-ish' clip: smooth moving colour gradients with two soft-edged shapes moving over
    them (a red disc to the lower right, a cyan square to the left). Every frame is different."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        t = i / n
        img = np.stack([60 + 120 * x / w + 50 * np.sin(2 * np.pi * (t + y / h)),
                        50 + 140 * y / h + 30 * np.cos(2 * np.pi * (x / w - t)),
                        200 - 110 * (x + y) / (w + h) + 20 * t], axis=-1)
        disc = np.hypot(x - (10 + 2.5 * i * 16 / n), y - (14 + 1.2 * i * 16 / n))
        alpha = 0.8 * np.clip((8 - disc) / 3 + 0.5, 0, 1)[..., None]
        img = img * (1 - alpha) + alpha * np.array([235, 70, 60])
        left = 44 - 1.5 * i * 16 / n
        edge = np.minimum(np.minimum(x - left, left + 10 - x), np.minimum(y - 26, 38 - y))
        alpha = 0.8 * np.clip(edge / 3 + 0.5, 0, 1)[..., None]
        img = img * (1 - alpha) + alpha * np.array([40, 190, 215])
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def few_colour_frames(n=12, offset_per_frame=0):
    """natural_frames posterised to 6 levels per channel (<= 216 colours); with offset_per_frame each frame uses
    its own shifted levels, so every frame has <= 216 colours but the clip as a whole has more than 256."""
    frames = natural_frames(n).astype(np.int32)
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        out[i] = np.minimum((frame // 51) * 50 + i * offset_per_frame, 255)
    return out.astype(np.uint8)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def pingponged(frames):
    return np.concatenate([frames, frames[-2:0:-1]])


def entries(folder):
    return sorted(os.listdir(folder))


# --- round trips --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fps", [8, 12.5, 29.97])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_frame_count_size_and_fps(tmp_path, fmt, fps):
    frames = natural_frames()
    path = write_video(frames, tmp_path / f"clip.{fmt}", fmt, fps)
    assert path == str(tmp_path / f"clip.{fmt}")
    decoded, decoded_fps = read_video(path)
    assert decoded.dtype == np.uint8
    assert decoded.shape == frames.shape
    # MP4 stores the rate exactly (Fraction time base); WebP delays are whole ms, GIF delays whole 1/100 s.
    tolerance = {"mp4": 1e-6, "webp": 5e-3, "gif": 1.5e-2}[fmt]
    assert decoded_fps == pytest.approx(fps, rel=tolerance)
    assert entries(tmp_path) == [f"clip.{fmt}"]  # no temporary file left behind


def test_webp_is_lossless_by_default(tmp_path):
    frames = natural_frames()
    decoded, _ = read_video(write_video(frames, tmp_path / "a.webp", "webp", 8))
    np.testing.assert_array_equal(decoded, frames)


def test_webp_lossy_quality_is_smaller_and_close(tmp_path):
    frames = natural_frames()
    lossless = write_video(frames, tmp_path / "a.webp", "webp", 8)
    lossy = write_video(frames, tmp_path / "b.webp", "webp", 8, quality=75)
    assert os.path.getsize(lossy) < os.path.getsize(lossless)
    assert psnr(read_video(lossy)[0], frames) > 30


@pytest.mark.parametrize("offset", [0, 3], ids=["shared-palette", "per-frame-palettes"])
def test_gif_is_exact_with_at_most_256_colours_per_frame(tmp_path, offset):
    frames = few_colour_frames(offset_per_frame=offset)
    colours_per_frame = [len(np.unique(f.reshape(-1, 3), axis=0)) for f in frames]
    assert max(colours_per_frame) <= 256
    total = len(np.unique(frames.reshape(-1, 3), axis=0))
    assert (total <= 256) == (offset == 0)
    decoded, _ = read_video(write_video(frames, tmp_path / "a.gif", "gif", 10))
    np.testing.assert_array_equal(decoded, frames)


def test_gif_with_many_colours_is_quantised_close(tmp_path):
    frames = natural_frames()
    assert len(np.unique(frames[0].reshape(-1, 3), axis=0)) > 256
    decoded, _ = read_video(write_video(frames, tmp_path / "a.gif", "gif", 8))
    assert decoded.shape == frames.shape
    assert psnr(decoded, frames) > 27  # 255-colour palette with Floyd-Steinberg dither


def test_gif_delays_alternate_to_keep_the_average_rate(tmp_path):
    # 8 fps = 12.5 centiseconds per frame, which GIF cannot store: delays alternate 120/130 ms.
    path = write_video(natural_frames(), tmp_path / "a.gif", "gif", 8)
    with Image.open(path) as im:
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            delays.append(im.info["duration"])
    assert set(delays) == {120, 130}
    assert sum(delays) == 16 * 125


def test_mp4_default_quality_psnr_at_least_35db(tmp_path):
    frames = natural_frames()
    path = write_video(frames, tmp_path / "a.mp4", "mp4", 8)
    decoded, _ = read_video(path)
    value = psnr(decoded, frames)
    print(f"mp4 default CRF {encode.DEFAULT_MP4_CRF}: PSNR {value:.2f} dB, {os.path.getsize(path)} bytes")
    assert value >= 35.0


def test_mp4_quality_is_the_crf(tmp_path):
    frames = natural_frames()
    good = write_video(frames, tmp_path / "good.mp4", "mp4", 8, quality=12)
    small = write_video(frames, tmp_path / "small.mp4", "mp4", 8, quality=35)
    assert os.path.getsize(small) < os.path.getsize(good)
    assert psnr(read_video(good)[0], frames) > psnr(read_video(small)[0], frames)


def test_mp4_frame_rate_is_stored_as_an_exact_fraction():
    assert encode.fps_fraction(8) == 8
    assert encode.fps_fraction(12.5) == Fraction(25, 2)
    assert encode.fps_fraction(29.97) == Fraction(2997, 100)
    assert encode.fps_fraction(30000 / 1001) == Fraction(30000, 1001)
    assert encode.fps_fraction(0.5) == Fraction(1, 2)


def test_mp4_odd_size_is_padded_by_repeating_the_edge(tmp_path):
    frames = natural_frames(n=8)[:, :47, :63]
    decoded, _ = read_video(write_video(frames, tmp_path / "odd.mp4", "mp4", 8))
    assert decoded.shape == (8, 48, 64, 3)
    assert psnr(decoded[:, :47, :63], frames) >= 33
    # The added column/row repeats the last one (up to compression error).
    assert np.abs(decoded[:, :47, 63].astype(int) - decoded[:, :47, 62]).mean() < 6
    assert np.abs(decoded[:, 47, :63].astype(int) - decoded[:, 46, :63]).mean() < 6


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_odd_sizes_are_kept_for_gif_and_webp(tmp_path, fmt):
    frames = natural_frames(n=4)[:, :47, :63]
    decoded, _ = read_video(write_video(frames, tmp_path / f"odd.{fmt}", fmt, 8))
    assert decoded.shape == frames.shape


def test_single_frame(tmp_path):
    frames = natural_frames(n=1)
    for fmt in FORMATS:
        decoded, _ = read_video(write_video(frames, tmp_path / f"one.{fmt}", fmt, 8))
        assert decoded.shape == frames.shape


# --- pingpong -----------------------------------------------------------------------------------------------------

def test_pingpong_appends_the_inner_frames_reversed(tmp_path):
    frames = natural_frames(n=8)
    decoded, fps = read_video(write_video(frames, tmp_path / "p.webp", "webp", 8, pingpong=True))
    assert len(decoded) == 2 * 8 - 2
    np.testing.assert_array_equal(decoded, pingponged(frames))
    np.testing.assert_array_equal(decoded[8:], frames[[6, 5, 4, 3, 2, 1]])
    assert fps == pytest.approx(8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pingpong_frame_count_every_format(tmp_path, fmt):
    frames = natural_frames(n=8)
    decoded, _ = read_video(write_video(frames, tmp_path / f"p.{fmt}", fmt, 8, pingpong=True))
    assert len(decoded) == 14
    if fmt == "mp4":
        assert psnr(decoded, pingponged(frames)) >= 33


@pytest.mark.parametrize("n", [1, 2])
def test_pingpong_short_clips_are_unchanged(tmp_path, n):
    frames = natural_frames(n=n)
    decoded, _ = read_video(write_video(frames, tmp_path / "p.webp", "webp", 8, pingpong=True))
    np.testing.assert_array_equal(decoded, frames)


# --- loop count ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loop", [0, 1, 3])
@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_loop_count_is_stored(tmp_path, fmt, loop):
    path = write_video(natural_frames(n=8), tmp_path / f"l.{fmt}", fmt, 8, loop=loop)
    assert probe(path)["loop"] == loop
    with Image.open(path) as im:
        raw = im.info.get("loop")
    if fmt == "webp":
        assert raw == loop  # WebP ANIM chunk: number of plays, 0 = forever
    else:
        # GIF NETSCAPE2.0 counts repeats after the first play: none for one play, n - 1 otherwise, 0 = forever.
        assert raw == {0: 0, 1: None, 3: 2}[loop]


def test_probe_reports_the_basics(tmp_path):
    info = probe(write_video(natural_frames(n=8), tmp_path / "a.mp4", "mp4", 12.5))
    assert info == {"format": "mp4", "width": 64, "height": 48, "frames": 8, "fps": 12.5, "duration": 0.64,
                    "has_audio": False, "loop": None}


# --- metadata -----------------------------------------------------------------------------------------------------

PROMPT = {"3": {"class_type": "KSampler", "inputs": {"seed": 42, "text": "a cat, ünïcödé ✓"}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "KSampler"}], "links": [], "version": 0.4}


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_is_readable_back(tmp_path, fmt):
    metadata = {"prompt": json.dumps(PROMPT), "workflow": json.dumps(WORKFLOW)}
    path = write_video(natural_frames(n=8), tmp_path / f"m.{fmt}", fmt, 8, metadata=metadata)
    found = read_metadata(path)
    assert json.loads(found["prompt"]) == PROMPT
    assert json.loads(found["workflow"]) == WORKFLOW


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_metadata_written_when_none_given(tmp_path, fmt):
    found = read_metadata(write_video(natural_frames(n=4), tmp_path / f"m.{fmt}", fmt, 8))
    assert "prompt" not in found and "workflow" not in found


def test_webp_metadata_uses_the_host_exif_layout(tmp_path):
    # The host's SaveAnimatedWEBP writes "prompt:<json>" in EXIF tag 0x0110 and "workflow:<json>" in 0x010F; the
    # frontend reads exactly that when an animated WebP is dropped onto the canvas.
    metadata = {"workflow": json.dumps(WORKFLOW), "prompt": json.dumps(PROMPT)}
    path = write_video(natural_frames(n=4), tmp_path / "m.webp", "webp", 8, metadata=metadata)
    with Image.open(path) as im:
        exif = im.getexif()
    assert exif[0x0110].startswith("prompt:")
    assert json.loads(exif[0x0110][len("prompt:"):]) == PROMPT
    assert exif[0x010F] == "workflow:" + json.dumps(WORKFLOW)


def test_mp4_metadata_is_container_tags(tmp_path):
    import av

    path = write_video(natural_frames(n=4), tmp_path / "m.mp4", "mp4", 8,
                       metadata={"prompt": json.dumps(PROMPT), "seed": 42})
    with av.open(path) as container:
        assert json.loads(container.metadata["prompt"]) == PROMPT
        assert container.metadata["seed"] == "42"  # non-strings are JSON-encoded


def test_mp4_colour_tags_are_bt709(tmp_path):
    import av

    with av.open(write_video(natural_frames(n=2), tmp_path / "c.mp4", "mp4", 8)) as container:
        ctx = container.streams.video[0].codec_context
        assert (ctx.colorspace, ctx.color_primaries, ctx.color_trc, ctx.color_range) == (1, 1, 1, 1)
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"


# --- atomic writes and failures -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_encoder_failure_mid_write_leaves_no_file(tmp_path, monkeypatch, fmt):
    real = encode._ENCODERS[fmt]

    def failing(frames, path, *args):
        real(frames[:2], path, *args)  # a (partial) file really gets written first ...
        assert os.path.getsize(path) > 0
        raise RuntimeError("disk on fire")  # ... then the encoder dies

    monkeypatch.setitem(encode._ENCODERS, fmt, failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_video(natural_frames(n=4), tmp_path / f"x.{fmt}", fmt, 8)
    assert entries(tmp_path) == []


def test_failure_keeps_an_existing_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "x.gif"
    target.write_bytes(b"old")

    def failing(frames, path, *args):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setitem(encode._ENCODERS, "gif", failing)
    with pytest.raises(KeyboardInterrupt):
        write_video(natural_frames(n=4), target, "gif", 8)
    assert target.read_bytes() == b"old"
    assert entries(tmp_path) == ["x.gif"]


def test_output_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_video(natural_frames(n=2), tmp_path / "p.gif", "gif", 8)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_missing_folder_is_created(tmp_path):
    path = write_video(natural_frames(n=2), tmp_path / "a" / "b" / "c.webp", "webp", 8)
    assert os.path.isfile(path)


def test_format_can_come_from_the_extension(tmp_path):
    path = write_video(natural_frames(n=2), tmp_path / "c.GIF", None, 8)
    with open(path, "rb") as f:
        assert f.read(6) == b"GIF89a"


@pytest.mark.parametrize("kwargs, message", [
    ({"frames": np.zeros((0, 48, 64, 3), np.uint8)}, r"empty batch.*\(0, 48, 64, 3\)"),
    ({"frames": np.zeros((48, 64, 3), np.uint8)}, r"\[N, H, W, 3\].*\(48, 64, 3\)"),
    ({"frames": np.zeros((2, 48, 64, 4), np.uint8)}, r"\(2, 48, 64, 4\).*frames\[\.\.\., :3\]"),
    ({"frames": np.zeros((2, 48, 64, 3), np.float32)}, r"uint8.*float32.*astype\(np.uint8\)"),
    ({"fmt": "avi"}, r"Unknown video format 'avi'.*mp4, gif, webp"),
    ({"fmt": None, "path": "noext"}, r"'.*noext'.*no extension.*pass fmt"),
    ({"fps": 0}, r"fps.*positive.*got 0"),
    ({"fps": -8}, r"got -8"),
    ({"fps": float("nan")}, r"got nan"),
    ({"fps": "fast"}, r"got 'fast'"),
    ({"fps": 1e-7}, r"fps=1e-07 is too slow"),
    ({"loop": -1}, r"loop.*got -1"),
    ({"loop": 70000}, r"loop.*65535.*got 70000"),
    ({"quality": 52}, r"quality=52.*mp4.*CRF.*0\.\.51"),
    ({"fmt": "webp", "quality": 101}, r"quality=101.*webp.*0\.\.100"),
    ({"metadata": {"a:b": "x"}}, r"'a:b'"),
    ({"fmt": "webp", "frames": np.zeros((1, 8, 16384, 3), np.uint8)}, r"16384x8.*16383"),
])
def test_bad_input_raises_a_clear_value_error_and_writes_nothing(tmp_path, kwargs, message):
    args = {"frames": natural_frames(n=2), "path": tmp_path / "bad.mp4", "fmt": "mp4", "fps": 8}
    args.update(kwargs)
    if not os.path.isabs(str(args["path"])):
        args["path"] = tmp_path / args["path"]
    with pytest.raises(ValueError, match=message):
        write_video(**args)
    assert entries(tmp_path) == []


def test_gif_quality_is_ignored(tmp_path):
    path = write_video(natural_frames(n=2), tmp_path / "q.gif", "gif", 8, quality=999)
    assert os.path.isfile(path)


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_identical_consecutive_frames_are_merged_by_gif_and_webp(tmp_path, fmt):
    # Documented limitation of Pillow's GIF writer and libwebp's animation encoder: a repeated frame becomes one
    # frame shown twice as long. Total duration is kept; MP4 keeps every frame.
    clip = natural_frames(n=3)
    frames = np.stack([clip[0], clip[0], clip[1], clip[2]])
    decoded, fps = read_video(write_video(frames, tmp_path / f"d.{fmt}", fmt, 8))
    if fmt == "webp":
        np.testing.assert_array_equal(decoded, clip)
    assert len(decoded) == 3
    assert len(decoded) / fps == pytest.approx(4 / 8, rel=0.05)
    assert len(read_video(write_video(frames, tmp_path / "d.mp4", "mp4", 8))[0]) == 4

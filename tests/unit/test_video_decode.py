"""video.iter_frames / probe / read_audio: every container kind, frame-accurate selection, resampling by timestamp,
bounded memory while streaming, sound tracks, and readable errors. Files are made here (write_video or PyAV);
each frame carries its number as a 4x4 grid of black/white blocks, so it can be identified after lossy coding."""
import ctypes
import weakref
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from adm.video import decode, iter_frames, probe, read_audio, write_video

GRID = 4  # 16 bits: frame numbers up to 65535


def coded_frames(n, size=64, first=0):
    """[n, size, size, 3] uint8; frame i shows the bits of first + i as white (1) / black (0) blocks."""
    cell = size // GRID
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        for bit in range(GRID * GRID):
            if (first + i) >> bit & 1:
                row, col = divmod(bit, GRID)
                out[i, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = 255
    return out


def frame_number(rgb):
    """The number coded_frames drew, read from the centre of each block."""
    h, w = rgb.shape[0] // GRID, rgb.shape[1] // GRID
    number = 0
    for bit in range(GRID * GRID):
        row, col = divmod(bit, GRID)
        block = rgb[row * h + h // 4:(row + 1) * h - h // 4, col * w + w // 4:(col + 1) * w - w // 4]
        if block.mean() > 127:
            number |= 1 << bit
    return number


def numbers(frames):
    return [frame_number(f) for f in frames]


def write_pyav(path, frames, fps, codec, fmt=None, pix_fmt="yuv420p", options=None, audio=None, rotation=None):
    """Encode with PyAV directly (containers write_video does not make). audio = (int16 mono samples, rate,
    codec) or None."""
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if options:
            stream.options = options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        sound = None
        if audio is not None:
            samples, sample_rate, audio_codec = audio
            sound = container.add_stream(audio_codec, rate=sample_rate, layout="mono")
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if sound is not None:
            chunk = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = sample_rate, 0, Fraction(1, sample_rate)
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return str(path)


def write_folder(folder, frames, names=None):
    folder.mkdir()
    names = names or [f"frame{i}.png" for i in range(len(frames))]  # unpadded: natural sort needed
    for rgb, name in zip(frames, names):
        Image.fromarray(rgb).save(folder / name)
    return str(folder)


CONTAINERS = {
    "mp4": lambda p, f, fps: write_video(f, p / "c.mp4", "mp4", fps),
    "webm-vp9": lambda p, f, fps: write_pyav(p / "c.webm", f, fps, "libvpx-vp9", options={"crf": "20", "b": "0"}),
    "webm-vp8": lambda p, f, fps: write_pyav(p / "c.webm", f, fps, "libvpx", options={"crf": "8", "b": "2M"}),
    "mov": lambda p, f, fps: write_pyav(p / "c.mov", f, fps, "libx264"),
    "mkv": lambda p, f, fps: write_pyav(p / "c.mkv", f, fps, "ffv1", pix_fmt="yuv444p"),
    "gif": lambda p, f, fps: write_video(f, p / "c.gif", "gif", fps),
    "webp": lambda p, f, fps: write_video(f, p / "c.webp", "webp", fps),
    "folder": lambda p, f, fps: write_folder(p / "frames", f),
}
# FFmpeg reads mov and mp4 with one demuxer (named "mp4" here), mkv and webm with another ("matroska").
FORMAT_NAMES = {"mp4": "mp4", "webm-vp9": "matroska", "webm-vp8": "matroska", "mov": "mp4", "mkv": "matroska",
                "gif": "gif", "webp": "webp", "folder": "images"}


# --- every container ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CONTAINERS)
def test_each_container_streams_every_frame_in_order_and_probes(tmp_path, kind):
    path = CONTAINERS[kind](tmp_path, coded_frames(12), 8)
    frames = iter_frames(path)
    decoded = list(frames)
    assert numbers(decoded) == list(range(12))
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in decoded)
    assert frames.fps == pytest.approx(8, rel=0.02) and frames.start_time == pytest.approx(0, abs=1e-6)
    assert frames.end_time == pytest.approx(1.5, rel=0.02)
    info = probe(path)
    assert info["format"] == FORMAT_NAMES[kind]
    assert (info["width"], info["height"], info["frames"]) == (64, 64, 12)
    assert info["fps"] == pytest.approx(8, rel=0.02) and info["duration"] == pytest.approx(1.5, rel=0.02)
    assert info["has_audio"] is False
    assert read_audio(path) is None


@pytest.mark.parametrize("kind", CONTAINERS)
def test_start_count_and_every_nth_pick_exactly_those_frames(tmp_path, kind):
    path = CONTAINERS[kind](tmp_path, coded_frames(20), 8)
    assert numbers(iter_frames(path, start=5, count=4, every_nth=2)) == [5, 7, 9, 11]
    assert numbers(iter_frames(path, start=17, count=10)) == [17, 18, 19]  # count past the end: what there is
    assert numbers(iter_frames(path, start=3, every_nth=7)) == [3, 10, 17]
    assert numbers(iter_frames(path, start=20)) == []
    frames = iter_frames(path, start=4, count=3, every_nth=3)
    list(frames)
    assert frames.fps == pytest.approx(8 / 3, rel=0.02)
    assert frames.start_time == pytest.approx(4 / 8, abs=0.006)
    assert frames.end_time == pytest.approx(4 / 8 + 3 * 3 / 8, abs=0.02)


def test_folder_is_sorted_naturally_and_ignores_other_files(tmp_path):
    names = ["frame1.png", "frame2.png", "frame10.png", "frame003.jpg", "frame11.webp"]
    frames = coded_frames(5)
    folder = write_folder(tmp_path / "f", frames[[0, 1, 3, 2, 4]].copy(), names)  # frame003 holds number 2 ...
    (tmp_path / "f" / "notes.txt").write_text("not a frame")
    (tmp_path / "f" / ".hidden.png").write_bytes(b"")
    (tmp_path / "f" / "sub").mkdir()
    got = numbers(iter_frames(folder))
    # natural order: frame1, frame2, frame003, frame10, frame11 (and never frame10 before frame2)
    assert got == [0, 1, 2, 3, 4]
    assert probe(folder)["frames"] == 5


# --- resampling by timestamp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mp4", "webm-vp9", "mkv", "gif", "webp"])
@pytest.mark.parametrize("target, expected", [
    (30, list(range(24))),                      # same rate: 1:1, despite ms (mkv/webm) or 10 ms (gif) rounding
    (10, list(range(0, 24, 3))),                # a third: every 3rd frame
    (24, [int(j * 30 / 24) for j in range(20)]),  # nearest earlier: 0 1 2 3 5 6 7 8 10 ...
    (60, [j // 2 for j in range(48)]),          # double: each frame twice
])
def test_target_fps_picks_the_nearest_earlier_frame(tmp_path, kind, target, expected):
    path = CONTAINERS[kind](tmp_path, coded_frames(24), 30)
    frames = iter_frames(path, target_fps=target)
    assert numbers(frames) == expected
    assert frames.fps == pytest.approx(target)


@pytest.mark.parametrize("kind", ["mp4", "gif", "folder"])
def test_target_fps_starts_at_start_frame_and_every_nth_comes_after(tmp_path, kind):
    path = CONTAINERS[kind](tmp_path, coded_frames(24), 8)
    assert numbers(iter_frames(path, start=5, target_fps=4)) == [5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    frames = iter_frames(path, start=5, target_fps=16, every_nth=3, count=4)
    assert numbers(frames) == [5, 6, 8, 9]  # 16 fps: 5 5 6 6 7 7 8 8 9 9 ..., every 3rd of that
    assert frames.fps == pytest.approx(16 / 3)


# --- streaming: bounded memory ------------------------------------------------------------------------------------

class _CountingFrame(decode._Frame):
    alive = set()
    peak = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ref = weakref.ref(self, _CountingFrame.alive.discard)
        _CountingFrame.alive.add(ref)
        _CountingFrame.peak = max(_CountingFrame.peak, len(_CountingFrame.alive))


@pytest.fixture
def counted(monkeypatch):
    _CountingFrame.alive.clear()
    _CountingFrame.peak = 0
    monkeypatch.setattr(decode, "_Frame", _CountingFrame)
    return _CountingFrame


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_growth_mb(work):
    """How far the process's peak resident memory rises above the current level while work() runs (Linux).
    Decoded frames live in FFmpeg's buffers, which tracemalloc does not see, so this measures the process."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back first, so new allocations show (glibc)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    before = _status_kb("VmHWM")
    result = work()
    return result, (_status_kb("VmHWM") - before) / 1024


def test_streaming_a_long_clip_holds_a_frame_or_two_however_few_are_selected(tmp_path, counted):
    n, size = 1200, 128  # all 1200 frames as RGB would be 59 MB (29 MB as decoded YUV)
    path = write_pyav(tmp_path / "long.mp4", coded_frames(n, size), 24, "libx264", options={"preset": "ultrafast"})
    list(iter_frames(path, count=2))  # warm up: codec tables, thread pools
    for kwargs, expected in [({"start": 1000, "count": 3, "every_nth": 50}, [1000, 1050, 1100]),
                             ({"every_nth": 400}, [0, 400, 800]),
                             ({"start": 10, "target_fps": 0.5, "count": 3}, [10, 58, 106])]:
        counted.peak = 0
        got, growth = peak_rss_growth_mb(lambda: numbers(iter_frames(path, **kwargs)))
        assert got == expected
        assert counted.peak <= 2, f"{counted.peak} decoded frames held at once"  # the frame + one lookahead
        assert growth < 15, f"peak memory rose by {growth:.1f} MB while streaming"
        print(f"{kwargs}: at most {counted.peak} frames held, peak RSS +{growth:.1f} MB")
    # The check can fail: keeping every frame (as a naive reader would) shows up.
    _, held = peak_rss_growth_mb(lambda: list(iter_frames(path)))
    print(f"all {n} frames kept: peak RSS +{held:.1f} MB")
    assert held > 30


def test_the_selector_drops_frames_it_does_not_use(counted):
    # 100k synthetic frames at 30 fps, resampled to 7 fps: never more than two alive, selection still exact.
    def frames():
        for i in range(100_000):
            yield decode._Frame(i, Fraction(i, 30), None, lambda i=i: i, last_end=Fraction(i + 1, 30))

    picked = [f.rgb() for f, _ in decode._select(frames(), 0, 1, Fraction(7))]
    assert picked[:8] == [int(j * 30 / 7) for j in range(8)] and len(picked) == 23334
    assert counted.peak <= 3  # the pending frame, the new one, and the one just handed out


def test_closing_early_stops_decoding_and_closes_the_file(tmp_path):
    path = write_video(coded_frames(12), tmp_path / "a.mp4", "mp4", 8)
    frames = iter_frames(path, count=2)
    assert numbers(frames) == [0, 1]
    assert frames._closed
    with iter_frames(path) as frames:
        next(frames)
    assert frames._closed


# --- rotation -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rotation, corner", [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_rotated_phone_videos_come_out_upright(tmp_path, rotation, corner):
    # FFmpeg's display matrix angle is counterclockwise: +90 turns the stored top-left corner to the bottom-left.
    stored = np.zeros((3, 32, 64, 3), np.uint8)
    stored[:, :16, :16] = 255  # white top-left corner in the stored (unrotated) frame
    path = write_pyav(tmp_path / "r.mp4", stored, 8, "libx264", rotation=rotation)
    frame = next(iter_frames(path))
    h, w = frame.shape[:2]
    corners = {"top-left": frame[:8, :8], "top-right": frame[:8, -8:], "bottom-left": frame[-8:, :8],
               "bottom-right": frame[-8:, -8:]}
    assert [name for name, block in corners.items() if block.mean() > 127] == [corner]
    info = probe(path)
    assert (info["width"], info["height"]) == (w, h) == ((32, 64) if rotation % 180 else (64, 32))


# --- audio --------------------------------------------------------------------------------------------------------

def sine(freq, seconds, rate, amplitude=0.5):
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave, rate):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.argmax(spectrum) * rate / len(wave)


@pytest.mark.parametrize("sound_seconds", [1.0, 3.0], ids=["shorter-padded", "longer-cut"])
def test_sine_muxed_into_mp4_reads_back_with_the_video_duration_and_frequency(tmp_path, sound_seconds):
    rate = 44100
    wave = np.stack([sine(440, sound_seconds, rate), sine(660, sound_seconds, rate)])
    path = write_video(coded_frames(16), tmp_path / "a.mp4", "mp4", 8, audio=(wave, rate))
    assert probe(path)["has_audio"] is True
    assert numbers(iter_frames(path)) == list(range(16))
    back, back_rate = read_audio(path)
    assert back_rate == rate and back.dtype == np.float32
    assert back.shape == (2, 2 * rate)  # exactly the video's 16 / 8 = 2 s (AAC's padding trimmed)
    heard = min(sound_seconds, 2.0)
    body = slice(int(0.1 * rate), int((heard - 0.1) * rate))
    assert peak_hz(back[0, body], rate) == pytest.approx(440, abs=2)
    assert peak_hz(back[1, body], rate) == pytest.approx(660, abs=2)
    assert np.sqrt(np.mean((back[:, body] - wave[:, body]) ** 2)) < 0.05  # in sync: no sample offset
    if sound_seconds < 2:
        assert np.abs(back[:, int(1.05 * rate):]).max() < 0.01  # padded with silence


def test_aac_resamples_rates_it_cannot_store(tmp_path):
    path = write_video(coded_frames(8), tmp_path / "a.mp4", "mp4", 8, audio=(sine(300, 1.0, 22000)[None], 22000))
    back, rate = read_audio(path)
    assert rate == 22050 and back.shape == (1, 22050)
    assert peak_hz(back[0, 2000:20000], rate) == pytest.approx(300, abs=3)


def test_audio_range_matches_the_selected_frames_sample_exactly(tmp_path):
    # Lossless PCM in Matroska: the cut must land on exactly the right samples.
    rate = 48000
    samples = (np.random.default_rng(0).uniform(-0.5, 0.5, 3 * rate) * 32767).astype(np.int16)
    path = write_pyav(tmp_path / "a.mkv", coded_frames(24), 8, "ffv1", pix_fmt="yuv444p",
                      audio=(samples, rate, "pcm_s16le"))
    frames = iter_frames(path, start=4, count=8, every_nth=2)
    assert numbers(frames) == [4, 6, 8, 10, 12, 14, 16, 18]
    assert (frames.start_time, frames.end_time) == (pytest.approx(0.5), pytest.approx(2.5))
    back, back_rate = read_audio(path, start=frames.start_time, end=frames.end_time)
    assert back_rate == rate and back.shape == (1, 2 * rate)
    np.testing.assert_array_equal(back[0], samples[rate // 2:5 * rate // 2] / np.float32(32768))
    # Past the end of the track: silence to the requested length.
    tail, _ = read_audio(path, start=2.5, end=3.5)
    assert tail.shape == (1, rate) and not tail[0, rate // 2:].any()
    np.testing.assert_array_equal(tail[0, :rate // 2], samples[5 * rate // 2:] / np.float32(32768))


def test_gif_webp_and_folders_have_no_audio(tmp_path):
    for kind in ("gif", "webp", "folder"):
        path = CONTAINERS[kind](tmp_path, coded_frames(3), 8)
        assert read_audio(path) is None and probe(path)["has_audio"] is False


# --- errors -------------------------------------------------------------------------------------------------------

def test_missing_and_unreadable_files_raise_value_errors_naming_the_path_and_reason(tmp_path):
    missing = tmp_path / "nope.mp4"
    for call in (lambda p: iter_frames(p), probe, read_audio):
        with pytest.raises(ValueError, match=rf"{missing.name}.*no such file"):
            call(missing)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(ValueError, match=rf"{text.name}'.*not a video file"):
        iter_frames(text)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{empty.name}'.*empty"):
        probe(empty)
    broken_gif = tmp_path / "broken.gif"
    broken_gif.write_bytes(b"GIF89a\x10\x00")
    with pytest.raises(ValueError, match=rf"{broken_gif.name}'.*broken GIF"):
        iter_frames(broken_gif)
    audio_only = tmp_path / "sound.mkv"
    with av.open(str(audio_only), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(ValueError, match=rf"{audio_only.name}'.*no video stream"):
        iter_frames(audio_only)


def test_folder_problems_name_the_folder_and_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty'.*no image files"):
        iter_frames(empty)
    mixed = tmp_path / "mixed"
    write_folder(mixed, coded_frames(2))
    Image.fromarray(coded_frames(1, size=32)[0]).save(mixed / "frame2.png")
    with pytest.raises(ValueError, match=r"mixed'.*'frame2.png' is 32x32 but .* 64x64"):
        list(iter_frames(mixed))
    assert numbers(iter_frames(mixed, count=2)) == [0, 1]  # frames before it are fine


@pytest.mark.parametrize("kwargs, message", [
    ({"start": -1}, "start"), ({"count": 0}, "count"), ({"every_nth": 0}, "every_nth"),
    ({"target_fps": -5}, "target_fps"), ({"target_fps": float("inf")}, "target_fps"),
])
def test_bad_selection_arguments_are_refused(tmp_path, kwargs, message):
    path = write_video(coded_frames(2), tmp_path / "a.gif", "gif", 8)
    with pytest.raises(ValueError, match=message):
        iter_frames(path, **kwargs)

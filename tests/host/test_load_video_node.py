"""ADM_LoadVideo called the way the host calls it (input folder from folder_paths, validation, IS_CHANGED), and its
frames, rate and sound flowing into ADM_SaveVideo."""
import os
import time

import folder_paths
import numpy as np
import pytest
import torch
from PIL import Image

from adm.nodes.load_video import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, LoadVideo, target_size
from adm.nodes.save_video import SaveVideo
from adm.video import iter_frames, probe, read_audio, write_video

RATE = 44100


@pytest.fixture
def input_dir(tmp_path):
    previous = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(previous)


@pytest.fixture
def output_dir(tmp_path):
    previous = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder = tmp_path / "output"
    folder.mkdir()
    folder_paths.set_output_directory(str(folder))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))  # Save Video's previews
    yield folder
    folder_paths.set_output_directory(previous[0])
    folder_paths.set_temp_directory(previous[1])


def coded(n, width=64, height=64):
    """Frame i: an 8-bit code of i as black/white vertical bars, so frames can be told apart after lossy coding."""
    out = np.zeros((n, height, width, 3), np.uint8)
    bar = width // 8
    for i in range(n):
        for bit in range(8):
            if i >> bit & 1:
                out[i, :, bit * bar:(bit + 1) * bar] = 255
    return out


def number(image):
    """The code of one IMAGE frame (float [H, W, 3])."""
    bar = image.shape[1] // 8
    return sum(1 << bit for bit in range(8)
               if image[:, bit * bar + bar // 4:(bit + 1) * bar - bar // 4].mean() > 0.5)


def tone(seconds, freq=440.0):
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None]


def load(**overrides):
    kwargs = dict(video="clip.mp4", path="", start_frame=0, frame_count=0, every_nth=1, target_fps=0.0,
                  resize="none", shortest_side=512, width=512, height=512)
    kwargs.update(overrides)
    return LoadVideo().load(**kwargs)


@pytest.fixture
def clip(input_dir):
    """16 frames, 64x64, 8 fps, 2 s of 440 Hz, in the input folder as clip.mp4."""
    return write_video(coded(16), input_dir / "clip.mp4", "mp4", 8, audio=(tone(2.0), RATE))


def test_registration_and_schema(input_dir):
    assert NODE_CLASS_MAPPINGS == {"ADM_LoadVideo": LoadVideo}
    assert NODE_DISPLAY_NAME_MAPPINGS == {"ADM_LoadVideo": "Load Video as Frames (AnimateDiff)"}
    assert LoadVideo.CATEGORY == "AnimateDiff Motion/video" and LoadVideo.DESCRIPTION
    assert LoadVideo.RETURN_TYPES == ("IMAGE", "INT", "FLOAT", "AUDIO")
    assert LoadVideo.RETURN_NAMES == ("images", "frame_count", "frame_rate", "audio")
    assert len(LoadVideo.OUTPUT_TOOLTIPS) == 4 and all(LoadVideo.OUTPUT_TOOLTIPS)
    assert callable(getattr(LoadVideo, LoadVideo.FUNCTION))
    for name in ["b.webm", "a.mp4", "c.gif", "d.webp", "e.mov", "f.mkv", "still.png", "notes.txt"]:
        (input_dir / name).write_bytes(b"x")
    (input_dir / "sub.mp4").mkdir()
    spec = LoadVideo.INPUT_TYPES()
    # Everything is a required widget: the editor appends its upload button after the required inputs, so its
    # saved value ("image") comes last in widgets_values and the other widgets keep their positions.
    assert set(spec) == {"required"}
    required = spec["required"]
    assert list(required) == ["video", "path", "start_frame", "frame_count", "every_nth", "target_fps", "resize",
                              "shortest_side", "width", "height"]
    for name, (kind, options) in required.items():
        assert options.get("tooltip"), name
    assert required["video"][0] == ["a.mp4", "b.webm", "c.gif", "d.webp", "e.mov", "f.mkv"]
    assert required["video"][1]["video_upload"] is True
    assert required["frame_count"][1]["min"] == 0 and required["target_fps"][1]["default"] == 0
    assert required["resize"][0] == ["shortest side", "width x height", "none"]
    for name in ("shortest_side", "width", "height"):
        assert required[name][1]["step"] == 8 and required[name][1]["default"] % 8 == 0


def test_loads_frames_rate_and_sound(clip):
    images, count, rate, audio = load()
    assert images.dtype == torch.float32 and images.shape == (16, 64, 64, 3) and count == 16
    assert 0 <= images.min() and images.max() <= 1
    assert [number(f) for f in images] == list(range(16))
    assert rate == pytest.approx(8)
    assert set(audio) == {"waveform", "sample_rate"} and audio["sample_rate"] == RATE
    assert audio["waveform"].dtype == torch.float32 and audio["waveform"].shape == (1, 1, 2 * RATE)


def test_range_every_nth_and_target_fps_set_the_frames_rate_and_sound(clip):
    images, count, rate, audio = load(start_frame=3, frame_count=4, every_nth=2)
    assert [number(f) for f in images] == [3, 5, 7, 9] and count == 4
    assert rate == pytest.approx(4)  # every 2nd frame of 8 fps
    assert audio["waveform"].shape[-1] == RATE  # 4 frames at 4 fps = 1 s of sound, from 3/8 s on
    images, count, rate, audio = load(target_fps=4.0, frame_count=0)
    assert [number(f) for f in images] == list(range(0, 16, 2)) and rate == pytest.approx(4)
    assert audio["waveform"].shape[-1] == 2 * RATE
    images, _, rate, _ = load(target_fps=16.0, every_nth=4)
    assert [number(f) for f in images] == list(range(0, 16, 2)) and rate == pytest.approx(4)


@pytest.mark.parametrize("resize, size, expected", [
    ("none", None, (96, 64)),
    ("shortest side", 48, (72, 48)),
    ("shortest side", 40, (64, 40)),  # 96 * 40 / 64 = 60 -> nearest multiple of 8
    ("width x height", (32, 48), (32, 48)),  # cover + centre crop
])
def test_resize_modes_give_multiples_of_8(input_dir, resize, size, expected):
    write_video(coded(4, width=96, height=64), input_dir / "wide.mp4", "mp4", 8)
    kwargs = {"video": "wide.mp4", "resize": resize}
    if resize == "shortest side":
        kwargs["shortest_side"] = size
    elif resize == "width x height":
        kwargs["width"], kwargs["height"] = size
    images, *_ = load(**kwargs)
    assert images.shape == (4, expected[1], expected[0], 3)


def test_target_size_arithmetic():
    assert target_size(1920, 1080, "shortest side", 512, 0, 0) == ((912, 512), None)
    assert target_size(1080, 1920, "shortest side", 512, 0, 0) == ((512, 912), None)
    assert target_size(100, 60, "shortest side", 60, 0, 0) == ((104, 64), None)  # 60 rounds to 64
    size, box = target_size(1920, 1080, "width x height", 0, 512, 512)
    assert size == (512, 512) and box == (420.0, 0.0, 1500.0, 1080.0)
    assert target_size(64, 64, "width x height", 0, 64, 64) == ((64, 64), None)
    with pytest.raises(ValueError, match="resize mode"):
        target_size(64, 64, "stretch", 0, 64, 64)


def test_path_takes_a_folder_or_file_in_listed_folders_and_relative_paths_start_in_the_input_folder(
        input_dir, tmp_path, monkeypatch):
    folder = tmp_path / "elsewhere" / "frames"
    folder.mkdir(parents=True)
    monkeypatch.setenv("ADM_VIDEO_FOLDERS", os.pathsep.join(["/no/such/folder", str(tmp_path / "elsewhere")]))
    for i, rgb in enumerate(coded(12)):
        Image.fromarray(rgb).save(folder / f"f{i}.png")  # f10 after f9: natural order
    images, count, rate, audio = load(video="", path=str(folder), start_frame=8)
    assert [number(f) for f in images] == [8, 9, 10, 11] and count == 4
    assert rate == pytest.approx(8) and audio is None  # image folders count as 8 fps, and have no sound
    write_video(coded(5), input_dir / "mine.gif", "gif", 10)
    images, count, rate, audio = load(video="", path=' "mine.gif" ')  # relative, pasted with quotes
    assert count == 5 and rate == pytest.approx(10) and audio is None


def test_gif_and_webp_load_without_sound(input_dir):
    for fmt in ("gif", "webp"):
        write_video(coded(6), input_dir / f"a.{fmt}", fmt, 12)
        images, count, rate, audio = load(video=f"a.{fmt}")
        assert [number(f) for f in images] == list(range(6)) and rate == pytest.approx(12) and audio is None


def test_validate_inputs_reports_missing_files_and_accepts_new_ones(input_dir):
    assert "nope.mp4" in LoadVideo.VALIDATE_INPUTS(video="nope.mp4", path="")
    assert "upload it" in LoadVideo.VALIDATE_INPUTS(video="nope.mp4", path="")
    assert "/no/such/dir" in LoadVideo.VALIDATE_INPUTS(video="", path="/no/such/dir")
    assert "Video not found" in LoadVideo.VALIDATE_INPUTS(video="", path="no/such/dir")  # inside input/
    assert "No video chosen" in LoadVideo.VALIDATE_INPUTS(video="", path="")
    write_video(coded(2), input_dir / "late.mp4", "mp4", 8)  # added after the combo list was made
    assert LoadVideo.VALIDATE_INPUTS(video="late.mp4", path="") is True
    assert LoadVideo.VALIDATE_INPUTS(video="whatever", path=str(input_dir / "late.mp4")) is True


def test_is_changed_follows_the_file_and_the_folder(input_dir, clip):
    first = LoadVideo.IS_CHANGED(video="clip.mp4", path="", start_frame=0)
    assert LoadVideo.IS_CHANGED(video="clip.mp4", path="") == first
    time.sleep(0.01)
    write_video(coded(17), input_dir / "clip.mp4", "mp4", 8)
    assert LoadVideo.IS_CHANGED(video="clip.mp4", path="") != first
    folder = input_dir / "frames"
    folder.mkdir()
    Image.fromarray(coded(1)[0]).save(folder / "1.png")
    before = LoadVideo.IS_CHANGED(video="", path="frames")
    Image.fromarray(coded(2)[1]).save(folder / "2.png")
    assert LoadVideo.IS_CHANGED(video="", path="frames") != before
    assert LoadVideo.IS_CHANGED(video="gone.mp4", path="") == "missing"


def test_errors_are_readable(input_dir, clip):
    with pytest.raises(ValueError, match=r"start_frame 40 is past its last frame \(16 frames\)"):
        load(start_frame=40)
    (input_dir / "fake.mp4").write_text("not a video")
    with pytest.raises(ValueError, match=r"fake\.mp4.*not a video file"):
        load(video="fake.mp4")


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_save_video_takes_the_rate_and_sound_from_load_video(clip, output_dir, fmt):
    images, count, rate, audio = load(start_frame=2, frame_count=6, every_nth=2)  # 6 frames at 4 fps = 1.5 s
    result = SaveVideo().save(images=images, frame_rate=rate, loop_count=0, filename_prefix="vid2vid",
                              format=fmt, pingpong=False, mp4_crf=18, audio=audio)
    path = result["result"][0]
    assert sorted(os.listdir(output_dir)) == [os.path.basename(path)]  # atomic write: no temporary files left
    info = probe(path)
    assert info["frames"] == 6 and info["fps"] == pytest.approx(4, rel=0.01)
    assert [number(torch.from_numpy(f / 255.0)) for f in iter_frames(path)] == [2, 4, 6, 8, 10, 12]
    sound = read_audio(path)
    if fmt == "mp4":
        waveform, sample_rate = sound
        assert info["has_audio"] and sample_rate == RATE and waveform.shape == (1, 3 * RATE // 2)
        spectrum = np.abs(np.fft.rfft(waveform[0, 4096:-4096]))
        assert np.argmax(spectrum) * RATE / (waveform.shape[1] - 8192) == pytest.approx(440, abs=3)
    else:
        assert sound is None and not info["has_audio"]


def test_save_video_pads_short_sound_and_accepts_no_or_empty_sound(clip, output_dir):
    images = torch.from_numpy(coded(8)).float() / 255
    short = {"waveform": torch.from_numpy(tone(0.25))[None], "sample_rate": RATE}
    path = SaveVideo().save(images=images, frame_rate=8.0, loop_count=0, filename_prefix="a", format="mp4",
                            pingpong=False, mp4_crf=18, audio=short)["result"][0]
    waveform, _ = read_audio(path)
    assert waveform.shape == (1, RATE) and np.abs(waveform[0, RATE // 2:]).max() < 0.01
    for audio in (None, {"waveform": torch.zeros(1, 2, 0), "sample_rate": RATE}):
        path = SaveVideo().save(images=images, frame_rate=8.0, loop_count=0, filename_prefix="b", format="mp4",
                                pingpong=False, mp4_crf=18, audio=audio)["result"][0]
        assert not probe(path)["has_audio"]
    optional = SaveVideo.INPUT_TYPES()["optional"]
    assert optional["audio"][0] == "AUDIO" and "GIF and WebP" in optional["audio"][1]["tooltip"]

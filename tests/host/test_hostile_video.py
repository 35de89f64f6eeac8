"""The "videos" layer of the hostile-input table: every bad video input of ADM_LoadVideo, called as the host calls it
(VALIDATE_INPUTS, then load), is refused with a message that names the input and the fix, or handled and said so.
Nothing may block (FIFOs are opened by no one), nothing outside ComfyUI's folders (and ADM_VIDEO_FOLDERS) may be
read, and a refusal of a path outside them reads the same whether that path exists or not. Tiny clips: 16x16 px."""
import logging
import os

import folder_paths
import pytest
import torch

from adm.nodes.load_video import LoadVideo
from adm.video import write_video
from hostile_video import clip_frames, finishes, truncated_mp4

OUTSIDE = "outside the folders Load Video may read"
HOW_TO_ALLOW = "add its folder to the environment variable ADM_VIDEO_FOLDERS"


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """input/, output/ and temp/ under tmp_path as the host's folders, a video in input/ and one in secret/
    (outside every allowed folder); ADM_VIDEO_FOLDERS unset."""
    previous = (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
                folder_paths.get_temp_directory())
    for name in ("input", "output", "temp", "secret"):
        (tmp_path / name).mkdir()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    monkeypatch.delenv("ADM_VIDEO_FOLDERS", raising=False)
    write_video(clip_frames(4), tmp_path / "input" / "clip.mp4", "mp4", 8)
    write_video(clip_frames(4), tmp_path / "secret" / "clip.mp4", "mp4", 8)
    yield tmp_path
    folder_paths.set_input_directory(previous[0])
    folder_paths.set_output_directory(previous[1])
    folder_paths.set_temp_directory(previous[2])


def load(video="", path="", **overrides):
    kwargs = dict(video=video, path=path, start_frame=0, frame_count=0, every_nth=1, target_fps=0.0,
                  resize="none", shortest_side=512, width=512, height=512)
    kwargs.update(overrides)
    return LoadVideo().load(**kwargs)


# --- the table ----------------------------------------------------------------------------------------------------
# Each row: set-up (given the tmp folder, makes the files and returns the node's video and path inputs), where the
# refusal comes ("validate": VALIDATE_INPUTS already refuses, as the host asks before running; "load": the file
# looks fine until read), and a fragment of the message. Every refusal is also raised by load() itself, which the
# host calls without VALIDATE_INPUTS when the prompt is cached or validation is skipped.

def fifo(t):
    os.mkfifo(t / "input" / "pipe.mp4")
    return "", "pipe.mp4"


def fifo_in_list(t):
    os.mkfifo(t / "input" / "pipe.mp4")
    return "pipe.mp4", ""


def symlink(target, name="link.mp4"):
    def make(t):
        os.symlink(target if os.path.isabs(target) else t / target, t / "input" / name)
        return name, ""
    return make


def as_path(make):
    def made(t):
        video, _ = make(t)
        return "", video
    return made


def with_folders(*names):
    def make(t, monkeypatch):
        monkeypatch.setenv("ADM_VIDEO_FOLDERS", os.pathsep.join(names))
    return make


def empty_folder(t):
    (t / "input" / "frames").mkdir()
    (t / "input" / "frames" / "notes.txt").write_text("no images here")
    return "", "frames"


def zero_bytes(t):
    (t / "input" / "empty.mp4").write_bytes(b"")
    return "empty.mp4", ""


def not_a_video(t):
    (t / "input" / "notes.mp4").write_text("not a video\n" * 50)
    return "notes.mp4", ""


def truncated(t):
    truncated_mp4(t / "input" / "cut.mp4", frames=8, keep=3)
    return "cut.mp4", ""


REFUSED = [  # id, set-up, extra set-up (environment), where, message fragment
    ("fifo path", fifo, None, "validate", "is a FIFO (named pipe)"),
    ("fifo in list", fifo_in_list, None, "validate", "is a FIFO (named pipe)"),
    ("/dev/stdin", lambda t: ("", "/dev/stdin"), None, "validate", OUTSIDE),
    ("device in a listed folder", lambda t: ("", "/dev/zero"), with_folders("/dev"), "validate", "is a device"),
    ("list ../ traversal", lambda t: ("../secret/clip.mp4", ""), None, "validate", "not a file inside ComfyUI's input"),
    ("list absolute", lambda t: (str(t / "secret" / "clip.mp4"), ""), None, "validate", "not a file inside"),
    ("list ../ [output]", lambda t: ("../secret/clip.mp4 [output]", ""), None, "validate",
     "not a file inside ComfyUI's output folder"),
    ("list symlink escape", symlink("secret/clip.mp4"), None, "validate", "not a file inside ComfyUI's input"),
    ("list symlink to /dev/stdin", symlink("/dev/stdin"), None, "validate", "not a file inside"),
    ("path outside, exists", lambda t: ("", str(t / "secret" / "clip.mp4")), None, "validate", HOW_TO_ALLOW),
    ("path outside, missing", lambda t: ("", str(t / "secret" / "nope.mp4")), None, "validate", HOW_TO_ALLOW),
    ("path ../ traversal", lambda t: ("", "../secret/clip.mp4"), None, "validate", OUTSIDE),
    ("path symlink escape", as_path(symlink("secret/clip.mp4")), None, "validate", OUTSIDE),
    ("path symlinked folder escape", as_path(symlink("secret", name="linked")), None, "validate", OUTSIDE),
    ("path outside the listed folder", lambda t: ("", str(t / "secret" / "clip.mp4")), with_folders("/no/such"),
     "validate", OUTSIDE),
    ("folder with no images", empty_folder, None, "load", "the folder holds no image files"),
    ("zero-byte file", zero_bytes, None, "load", "the file is empty"),
    ("not a video", not_a_video, None, "load", "not a video file PyAV/FFmpeg can open"),
]


@pytest.mark.parametrize("make, env, where, fragment", [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED])
def test_hostile_video_inputs_are_refused(folders, monkeypatch, make, env, where, fragment):
    if make in (fifo, fifo_in_list) and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    if env is not None:
        env(folders, monkeypatch)
    video, path = make(folders)
    pipe = folders / "input" / "pipe.mp4"
    fifo_path = pipe if pipe.exists() else None
    verdict = finishes(lambda: LoadVideo.VALIDATE_INPUTS(video=video, path=path), fifo=fifo_path)
    if where == "validate":
        assert isinstance(verdict, str) and fragment in verdict
    else:
        assert verdict is True
    with pytest.raises(ValueError) as refused:
        finishes(lambda: load(video, path), fifo=fifo_path)
    assert fragment in str(refused.value)
    if fragment in (OUTSIDE, HOW_TO_ALLOW):  # the message says how to allow it, and never where the file went
        assert "Move the file into ComfyUI's input folder" in str(refused.value)
        assert HOW_TO_ALLOW in str(refused.value) and "restart" in str(refused.value)
        assert "secret" not in str(refused.value).replace(path, "")


def test_a_refused_path_reads_the_same_whether_it_exists_or_not(folders):
    existing, missing = folders / "secret" / "clip.mp4", folders / "secret" / "clap.mp4"
    assert existing.is_file() and not missing.exists()
    for call in (lambda p: LoadVideo.VALIDATE_INPUTS(video="", path=p),
                 lambda p: pytest.raises(ValueError, load, "", p).value.args[0]):
        a, b = call(str(existing)), call(str(missing))
        assert a.replace(str(existing), "<path>") == b.replace(str(missing), "<path>") and OUTSIDE in a
    assert (LoadVideo.IS_CHANGED(video="", path=str(existing)) == LoadVideo.IS_CHANGED(video="", path=str(missing))
            == "missing")


HANDLED = [  # id, set-up, extra set-up, frames loaded, text the node shows (None: a plain result)
    ("truncated mp4", truncated, None, 3, "only 3 of the 8 frames its container declares could be read"),
    ("symlink inside input", symlink("input/clip.mp4", name="alias.mp4"), None, 4, None),
    ("path in output", lambda t: ("", str(write_video(clip_frames(4), t / "output" / "o.mp4", "mp4", 8))), None, 4,
     None),
    ("path in a listed folder", lambda t: ("", str(t / "secret" / "clip.mp4")),
     with_folders("/no/such", "~/nothing", "{secret}"), 4, None),
]


@pytest.mark.parametrize("make, env, frames, text", [row[1:] for row in HANDLED], ids=[row[0] for row in HANDLED])
def test_hostile_video_inputs_that_load_say_what_they_got(folders, monkeypatch, caplog, make, env, frames, text):
    if env is not None:
        env(folders, monkeypatch)
        monkeypatch.setenv("ADM_VIDEO_FOLDERS", os.environ["ADM_VIDEO_FOLDERS"].replace(
            "{secret}", str(folders / "secret")))
    video, path = make(folders)
    assert LoadVideo.VALIDATE_INPUTS(video=video, path=path) is True
    with caplog.at_level(logging.WARNING):
        out = finishes(lambda: load(video, path))
    if text is None:
        images, count, rate, audio = out
        assert "Load Video" not in caplog.text
    else:  # the output types are unchanged; the node adds a UI text (also in /history) and logs a warning
        assert set(out) == {"ui", "result"} and text in out["ui"]["text"][0] and text in caplog.text
        assert "cut.mp4" in out["ui"]["text"][0] and "complete copy" in out["ui"]["text"][0]
        images, count, rate, audio = out["result"]
    assert isinstance(images, torch.Tensor) and images.shape == (frames, 16, 16, 3) and count == frames
    assert isinstance(rate, float) and rate == pytest.approx(8) and audio is None


def test_start_frame_past_the_end_of_a_truncated_mp4_says_it_is_cut_short(folders):
    truncated_mp4(folders / "input" / "cut.mp4", frames=8, keep=3)
    with pytest.raises(ValueError, match=r"only 3 of the 8 frames .* start_frame 5 is past them"):
        load("cut.mp4", start_frame=5)

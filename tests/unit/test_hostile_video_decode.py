"""Hostile inputs to the video reader: a FIFO or a device is refused by os.stat before anything opens it (open() on a
FIFO blocks until a writer comes), and a cut-off mp4 says how many of its declared frames could be read. Tiny files
(16x16 px, 8 frames) made here."""
import os

import pytest

from adm.video import iter_frames, probe, read_audio, read_metadata, sniff_format, write_video
from hostile_video import clip_frames, finishes, truncated_mp4

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")


@needs_fifo
@pytest.mark.parametrize("call", [iter_frames, probe, read_audio, read_metadata, sniff_format],
                         ids=lambda f: f.__name__)
def test_a_fifo_is_refused_without_opening_it(tmp_path, call):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"clip\.mp4'.*FIFO.*only video files and folders of images"):
        finishes(lambda: call(fifo), fifo=fifo)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_is_refused_without_reading_it():
    with pytest.raises(ValueError, match=r"/dev/zero'.*a device"):
        finishes(lambda: iter_frames("/dev/zero"))


def test_a_truncated_mp4_says_how_many_of_its_declared_frames_were_read(tmp_path):
    path = truncated_mp4(tmp_path / "cut.mp4", frames=8, keep=3)
    assert probe(path)["frames"] == 8  # the container's index still declares them all
    with iter_frames(path) as frames:
        assert len(list(frames)) == 3
        assert frames.truncated and frames.frames_read == 3 and frames.frames_declared == 8
    with iter_frames(path, count=2) as frames:  # stopped before the end: nothing known, nothing claimed
        assert len(list(frames)) == 2 and not frames.truncated
    with iter_frames(path, start=1, every_nth=2) as frames:
        assert len(list(frames)) == 1 and frames.truncated and frames.frames_read == 3


def test_complete_files_are_not_truncated(tmp_path):
    full = write_video(clip_frames(8), tmp_path / "full.mp4", "mp4", 8)
    with iter_frames(full) as frames:
        assert len(list(frames)) == 8 and frames.frames_declared == 8 and not frames.truncated
    gif = write_video(clip_frames(4), tmp_path / "a.gif", "gif", 8)
    with iter_frames(gif) as frames:
        assert len(list(frames)) == 4 and frames.frames_declared is None and not frames.truncated

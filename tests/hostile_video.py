"""Helpers of the hostile-video tests (tests/unit/test_hostile_video_decode.py, tests/host/test_hostile_video.py):
tiny clips, a cut-off mp4, and a guard that fails a call instead of letting it hang the suite."""
import os
import threading
import time

import av
import numpy as np
import pytest

from adm.video import write_video


def clip_frames(n=8, size=16):
    return np.random.RandomState(n).randint(0, 256, (n, size, size, 3), np.uint8)  # noise: every packet has data


def truncated_mp4(path, frames=8, keep=3):
    """An mp4 of `frames` frames (moov first, as write_video writes it) cut right after its `keep`-th video
    packet: the container still declares `frames`, only `keep` decode."""
    full = write_video(clip_frames(frames), path, "mp4", 8)
    with av.open(full) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    pos, size = packets[keep - 1]
    with open(full, "r+b") as f:
        f.truncate(pos + size)
    return full


def finishes(call, fifo=None, seconds=5.0):
    """call()'s result, or its exception re-raised; fails instead of hanging when it blocks. A call blocked in
    open() on `fifo` is released by opening the write end, repeatedly, until it returns."""
    box = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as ex:  # noqa: BLE001 - handed to the test thread
            box["error"] = ex

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        deadline = time.monotonic() + 5
        while fifo is not None and worker.is_alive() and time.monotonic() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a waiting reader gets EOF
            except OSError:
                pass
            worker.join(0.05)
        pytest.fail(f"blocked for {seconds} s on {fifo or 'the input'}")
    if "error" in box:
        raise box["error"]
    return box.get("value")

"""Hostile and careless command lines, one row each: ``python -m headless run|train`` (called in-process) must end
with the exit code its help states (2: bad usage, or a file or folder named on the command line that cannot be
used; 3: the server cannot be reached) and one message naming the input, never a traceback. No ComfyUI server
is started here."""
import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import COMFYUI_DIR  # noqa: E402
from headless.__main__ import main  # noqa: E402
from headless.server import free_port  # noqa: E402

WORKFLOW = b'{"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}'


def put(folder: Path, name: str, data: bytes = WORKFLOW) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def sparse(folder: Path, name: str, size: int) -> str:
    path = folder / name
    with open(path, "wb") as fh:
        fh.truncate(size)
    return str(path)


def folder(parent: Path, name: str) -> str:
    (parent / name).mkdir()
    return str(parent / name)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder with one tiny video, so that `train` gets as far as loading the checkpoint."""
    from adm.video import write_video
    data = tmp_path_factory.mktemp("videos")
    write_video(np.full((4, 64, 64, 3), 128, dtype=np.uint8), data / "clip.mp4", "mp4", fps=8)
    return str(data)


def train(checkpoint: str, data: str, *extra: str) -> list[str]:
    return ["train", "--checkpoint", checkpoint, "--data", data, "--comfyui", str(COMFYUI_DIR), "--frames", "2",
            "--size", "64", "--steps", "1", *extra]


PORT = free_port()  # nothing listens there

# id, command line (built in a temporary folder, with the videos folder), exit code, fragments of stderr, stdin
ROWS = [
    # -- run: the workflow file
    ("missing-workflow", lambda t, v: ["run", str(t / "missing.json")], 2, ["missing.json", "not found"], None),
    ("workflow-is-a-folder", lambda t, v: ["run", folder(t, "flows")], 2, ["flows", "is a folder"], None),
    ("latin-1-workflow", lambda t, v: ["run", put(t, "latin1.json", WORKFLOW.replace(b'"x"', b'"caf\xe9"'))], 2,
     ["latin1.json", "not UTF-8", "0xe9", "save it as UTF-8"], None),
    ("png-given-as-workflow", lambda t, v: ["run", put(t, "frame.png", b"\x89PNG\r\n\x1a\n" + bytes(64))], 2,
     ["frame.png", "not UTF-8"], None),
    ("100000-levels-of-nesting", lambda t, v: ["run", put(t, "deep.json", b"[" * 100_000 + b"]" * 100_000)], 2,
     ["deep.json", "nests", "too deeply"], None),
    ("not-json", lambda t, v: ["run", put(t, "quotes.json", b"{'1': {}}")], 2,
     ["quotes.json", "not valid JSON", "line 1 column 2"], None),
    ("empty-workflow", lambda t, v: ["run", put(t, "empty.json", b" \n")], 2, ["empty.json", "is empty"], None),
    ("json-array", lambda t, v: ["run", put(t, "array.json", b"[1, 2]")], 2,
     ["array.json", "holds an array", "not a JSON object"], None),
    ("json-but-not-a-workflow", lambda t, v: ["run", put(t, "settings.json", b'{"theme": "dark"}')], 2,
     ["settings.json", "Not a ComfyUI workflow"], None),
    ("model-given-as-workflow", lambda t, v: ["run", sparse(t, "model.safetensors", 300 * 2 ** 20)], 2,
     ["model.safetensors", "300 MiB", "not a model"], None),
    ("stdin-not-json", lambda t, v: ["run", "-"], 2, ["stdin", "not valid JSON"], b"<html>"),
    # -- run: options
    ("set-without-equals", lambda t, v: ["run", put(t, "w.json"), "--set", "oops"], 2,
     ["'oops'", "NODE.INPUT=VALUE"], None),
    ("set-value-nested-100000-deep", lambda t, v: ["run", put(t, "w.json"), "--set", "1.x=" + "[" * 100_000,
                                                     "--server", f"http://127.0.0.1:{PORT}"], 3,
     [f"127.0.0.1:{PORT}", "Cannot connect"], None),  # read as a plain string, as any VALUE that is not JSON
    ("out-is-a-file", lambda t, v: ["run", put(t, "w.json"), "--out", put(t, "out.txt", b"")], 2,
     ["--out", "out.txt", "is a file"], None),
    ("negative-timeout", lambda t, v: ["run", put(t, "w.json"), "--timeout", "-1"], 2,
     ["--timeout", "'-1' is not a positive number of seconds"], None),
    ("nan-timeout", lambda t, v: ["run", put(t, "w.json"), "--timeout", "nan"], 2,
     ["--timeout", "'nan' is not a positive"], None),
    ("no-comfyui-there", lambda t, v: ["run", put(t, "w.json"), "--comfyui", str(t / "nocomfy")], 2,
     ["nocomfy", "main.py missing", "--comfyui"], None),
    ("server-not-listening", lambda t, v: ["run", put(t, "w.json"), "--server", f"http://127.0.0.1:{PORT}"], 3,
     [f"127.0.0.1:{PORT}", "Cannot open the websocket"], None),
    # -- train: the files and folders it names
    ("missing-checkpoint", lambda t, v: train(str(t / "sd15.safetensors"), v), 2,
     ["--checkpoint", "sd15.safetensors", "does not exist"], None),
    ("checkpoint-is-a-folder", lambda t, v: train(folder(t, "ckpts"), v), 2,
     ["--checkpoint", "ckpts", "is a folder"], None),
    ("random-bytes-checkpoint", lambda t, v: train(put(t, "random.safetensors", np.random.default_rng(0).bytes(4096)),
                                                   v), 2,
     ["random.safetensors", "cannot be loaded as a checkpoint", "Load Checkpoint"], None),
    ("bad-header-checkpoint", lambda t, v: train(put(t, "header.safetensors", struct.pack("<Q", 16) + b"{not json!}"
                                                     + bytes(64)), v), 2,
     ["header.safetensors", "cannot be loaded as a checkpoint"], None),
    ("random-bytes-ckpt", lambda t, v: train(put(t, "random.ckpt", np.random.default_rng(1).bytes(4096)), v), 2,
     ["random.ckpt", "cannot be loaded as a checkpoint"], None),
    ("missing-data-folder", lambda t, v: train(put(t, "c.safetensors"), str(t / "no_videos")), 2,
     ["--data", "no_videos", "does not exist"], None),
    ("data-is-a-file", lambda t, v: train(put(t, "c.safetensors"), put(t, "clip.mp4", b"")), 2,
     ["--data", "clip.mp4", "is a file", "folder"], None),
    ("missing-init", lambda t, v: train(put(t, "c.safetensors"), v, "--init", str(t / "mm_sd_v15.ckpt")), 2,
     ["--init", "mm_sd_v15.ckpt", "does not exist"], None),
    ("missing-captions", lambda t, v: train(put(t, "c.safetensors"), v, "--captions", str(t / "captions.csv")), 2,
     ["--captions", "captions.csv", "does not exist"], None),
    ("size-not-a-number", lambda t, v: train(put(t, "c.safetensors"), v, "--size", "big"), 2,
     ["--size", "'big' is not S or WxH"], None),
    ("no-comfyui-for-train", lambda t, v: [*train(put(t, "c.safetensors"), v), "--comfyui", str(t / "elsewhere")], 2,
     ["elsewhere", "no ComfyUI"], None),
]
@pytest.mark.parametrize("command, code, fragments, stdin", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_hostile_command_line(command, code, fragments, stdin, tmp_path, videos, capsys, monkeypatch):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    argv = command(tmp_path, videos)
    try:
        got = main(argv)
    except SystemExit as ex:  # argparse's own refusals
        got = ex.code
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err

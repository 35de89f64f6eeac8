"""Start a ComfyUI server as a child process, wait until it answers, and stop it again."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from .errors import ServerError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STARTUP_TIMEOUT = 180.0
STOP_GRACE = 10.0


def default_comfyui_dir() -> Path:
    """--comfyui, else $COMFYUI_DIR, else <repo>/.host/ComfyUI."""
    env = os.environ.get("COMFYUI_DIR")
    return Path(env) if env else REPO_ROOT / ".host" / "ComfyUI"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # no torch here: let the host decide
        return True


def _set_parent_death_signal() -> None:  # runs in the child before exec (Linux only)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ServerURL(str):
    """The base URL of a started server (a plain ``str``), with the :class:`ServerProcess` as ``.server``."""

    server: "ServerProcess"


class ServerProcess:
    """A ComfyUI ``main.py`` child process listening on a loopback port."""

    def __init__(self, comfyui_dir: str | Path | None = None, host_args: Sequence[str] = (), port: int | None = None,
                 log_path: str | Path | None = None, cpu: bool | None = None, python: str | None = None):
        self.comfyui_dir = Path(comfyui_dir or default_comfyui_dir()).resolve()
        if not (self.comfyui_dir / "main.py").is_file():
            raise ServerError(f"No ComfyUI at {self.comfyui_dir} (main.py missing): pass --comfyui DIR or set "
                              "COMFYUI_DIR.", usage=True)
        self.host_args = list(host_args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cpu = cpu
        self.python = python or sys.executable
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="comfyui-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def command(self) -> list[str]:
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch"]
        cpu = self.cpu if self.cpu is not None else not cuda_available()
        if cpu and "--cpu" not in self.host_args:
            cmd.append("--cpu")
        return cmd + self.host_args

    def start(self, timeout: float = DEFAULT_STARTUP_TIMEOUT) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        began = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfyui_dir, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None)
        finally:
            log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self.url

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def failure(self, what: str) -> ServerError:
        text = self.log_tail()
        return ServerError(f"{what}\nServer log: {self.log_path}" + (f"\n--- last lines ---\n{text}" if text else ""))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise self.failure(f"The ComfyUI server exited during start-up (exit code {code}).")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise self.failure(f"The ComfyUI server did not answer at {self.url} within {timeout:.0f} s.")
            time.sleep(0.25)

    def stop(self, grace: float = STOP_GRACE) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace)
        except ProcessLookupError:
            pass

    def cleanup_log(self) -> None:
        """Remove the log file when this object created it (call after a successful run only)."""
        if self._own_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


@contextlib.contextmanager
def start_server(comfyui_dir: str | Path | None = None, host_args: Sequence[str] = (),
                 timeout: float = DEFAULT_STARTUP_TIMEOUT, port: int | None = None, log_path: str | Path | None = None,
                 cpu: bool | None = None) -> Iterator[str]:
    """Run a ComfyUI server for the duration of the ``with`` block; yields its base URL.

    ``host_args`` are passed to ComfyUI's main.py as they are (e.g. ``--output-directory=/tmp/x``).
    ``cpu=None`` adds ``--cpu`` when torch sees no CUDA device. The server log goes to ``log_path`` (a
    temporary file by default, removed when the block ends without an error); the yielded URL's
    ``.server.log_path`` and ``.server.log_tail()`` give it. On Linux the server is also told to stop
    should this process die, so start it from a thread that lives as long as the block.
    """
    server = ServerProcess(comfyui_dir, host_args=host_args, port=port, log_path=log_path, cpu=cpu)
    server.start(timeout)
    url = ServerURL(server.url)
    url.server = server
    ok = False
    try:
        yield url
        ok = True
    finally:
        server.stop()
        if ok:
            server.cleanup_log()

"""A headless Chromium for the browser e2e test, driven over the DevTools protocol (CDP) with aiohttp's
websocket client: start it, open a page, evaluate JavaScript, take a screenshot. Synchronous on purpose (one
event loop owned by the Browser), so that tests read as plain steps.

Only Debian's `chromium` package is used (scripts/setup.sh installs it); nothing is downloaded here."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

BINARIES = ("chromium", "chromium-browser")
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, BINARIES) if path), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page. ``errors`` collects the page's uncaught exceptions, console errors
    and alert()/confirm() texts (dismissed, so that nothing waits on them) in the order they came."""

    def __init__(self, binary: str, width: int = 1400, height: int = 900):
        self.binary, self.size = binary, (width, height)
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._dir = tempfile.TemporaryDirectory(prefix="adm-chromium-", ignore_cleanup_errors=True)
        self._proc: subprocess.Popen | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws = None

    def __enter__(self) -> "Browser":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- set-up
    def _start(self, timeout: float = 60) -> None:
        log = Path(self._dir.name) / "chromium.log"
        with open(log, "wb") as stderr:
            # --no-sandbox: tests run as root, where Chromium refuses its sandbox. The rest keeps a fresh
            # profile quiet (no first-run UI, no network calls of its own) and the window a known size.
            self._proc = subprocess.Popen(
                [self.binary, "--headless=new", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                 f"--user-data-dir={self._dir.name}/profile", "--no-sandbox", "--no-first-run",
                 "--no-default-browser-check", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio",
                 "--disable-background-networking", "--disable-component-update",
                 f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (found := LISTENING.search(log.read_text(errors="replace"))):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise BrowserError(f"{self.binary} did not open its DevTools port within {timeout:g} s "
                                   f"(exit code {self._proc.poll()}); its output:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        http = found.group(1).split("/devtools/")[0].replace("ws://", "http://")
        self._run(self._connect(http), timeout)
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable")

    async def _connect(self, http: str) -> None:
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"{http}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    def close(self) -> None:
        async def disconnect():
            if self._ws is not None:
                await self._ws.close()
            if self._session is not None:
                await self._session.close()
        if self._ws is not None and self._proc.poll() is None:
            try:  # a clean exit: Chromium writes its profile and ends its helper processes before it exits
                self.call("Browser.close", timeout=10)
            except Exception:
                pass  # it goes below anyway
        try:
            self._run(disconnect(), 10)
        except Exception:
            pass
        self._loop.close()
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            try:  # helpers (renderer, GPU, zygote) left over after a kill: its own session, started above
                os.killpg(self._proc.pid, signal.SIGKILL)
            except OSError:  # none left
                pass
        self._dir.cleanup()

    # ------------------------------------------------------------------------------------------- protocol
    def _run(self, coro, timeout: float):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        """Send one CDP command and return its result; events that come meanwhile are noted in ``errors``."""
        try:
            return self._run(self._call(method, params or {}), timeout)
        except asyncio.TimeoutError:
            raise BrowserError(f"{method} got no answer within {timeout:g} s") from None

    async def _call(self, method: str, params: dict) -> dict:
        own = next(self._ids)
        await self._ws.send_json({"id": own, "method": method, "params": params})
        while True:
            message = await self._ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise BrowserError(f"DevTools connection closed while waiting for {method}: {message}")
            data = json.loads(message.data)
            if data.get("id") == own:
                if "error" in data:
                    raise BrowserError(f"{method} failed: {data['error']}")
                return data["result"]
            await self._event(data.get("method"), data.get("params", {}))

    async def _event(self, method: str | None, params: dict) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("uncaught: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append("console.error: " + " ".join(str(arg.get("value", arg.get("description", "")))
                                                            for arg in params.get("args", [])))
        elif method == "Page.javascriptDialogOpening":
            self.errors.append(f"{params['type']}(): {params['message']}")
            await self._ws.send_json({"id": next(self._ids), "method": "Page.handleJavaScriptDialog",
                                      "params": {"accept": False}})

    # ------------------------------------------------------------------------------------------- page
    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str, timeout: float = 60):
        """The JSON value of a JavaScript expression (promises awaited); a thrown error becomes BrowserError."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "timeout": timeout * 1000}, timeout + 5)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:200]} threw: "
                               f"{details.get('exception', {}).get('description', details.get('text'))}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = ""):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise BrowserError(f"Timed out after {timeout:g} s waiting for {what or expression}")
            time.sleep(0.1)
        return value

    def screenshot(self, path: str | Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

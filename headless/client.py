"""Talking to a running ComfyUI server: queue a prompt, follow it on the websocket, fetch its outputs.

The host's protocol (ComfyUI 0.3.x):
- GET /ws?clientId=ID opens a websocket; the server sends JSON messages ``{"type", "data"}`` for the
  prompts queued with that ``client_id`` (and binary preview frames, which are ignored here).
- POST /prompt ``{"prompt", "client_id", "prompt_id", "extra_data"}`` answers 200 ``{"prompt_id", "number",
  "node_errors"}`` or 400 ``{"error", "node_errors"}``. Older hosts (December 2024) ignore the client's
  ``prompt_id`` and make their own, so the id in the answer is the one to follow.
- Messages while it runs: execution_start, execution_cached ``{nodes}``, executing ``{node}``,
  progress ``{value, max, node}``, executed ``{node, output}``, then execution_success, or
  execution_error / execution_interrupted; finally executing with ``node: null``. The history entry is
  written just before that last message (after execution_success). Newer hosts add progress_state
  ``{prompt_id, nodes}`` and binary progress-text frames; both are ignored here.
- GET /history/{prompt_id} gives ``{prompt_id: {"outputs": {node_id: {"images": [...]}}, "status": ...}}``
  and GET /view?filename=&subfolder=&type= serves each listed file.
"""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping

import aiohttp

from .convert import is_ui_workflow, to_api
from .errors import WorkflowError, render_execution_error, render_prompt_error
from .overrides import apply_overrides
from .progress import ConsoleProgress, Progress

DOWNLOAD_TYPES = ("output", "temp")
DEFAULT_TIMEOUT = 4 * 3600.0  # a whole prompt, queue included: hours on a CPU, but never forever
CONNECT_TIMEOUT = 30.0        # opening a connection or the websocket
READ_TIMEOUT = 300.0          # a server that accepted a request but sends nothing back
HISTORY_WAIT = 30.0           # the history entry after the websocket said the prompt finished
HISTORY_POLL = 10.0           # a silent websocket: look in the history this often, in case a message was missed


def _ws_url(url: str) -> str:
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    return url


def output_files(outputs: Mapping) -> list[dict]:
    """Every ``{filename, subfolder, type}`` entry of a history entry's outputs (any key: images, gifs,
    videos, audio, ...), of the types that can be downloaded, without repeats."""
    found, seen = [], set()
    for node_output in (outputs or {}).values():
        if not isinstance(node_output, Mapping):
            continue
        for items in node_output.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, Mapping) or not item.get("filename"):
                    continue
                kind = item.get("type", "output")
                if kind not in DOWNLOAD_TYPES:
                    continue
                key = (item.get("subfolder") or "", item["filename"], kind)
                if key not in seen:
                    seen.add(key)
                    found.append({"filename": item["filename"], "subfolder": item.get("subfolder") or "",
                                  "type": kind})
    return found


def local_path(out_dir: Path, item: Mapping) -> Path:
    """Where a served file goes under ``out_dir``: its subfolder kept, nothing allowed to climb out."""
    parts = [p for p in PurePosixPath(str(item.get("subfolder") or "").replace("\\", "/")).parts
             if p not in ("", ".", "/")]
    name = PurePosixPath(str(item["filename"]).replace("\\", "/")).name
    if ".." in parts or not name or name in (".", ".."):
        raise WorkflowError(f"Refusing to save an output with an unsafe path: {item}", kind="connection")
    return out_dir.joinpath(*parts, name)


def _request_timeout() -> aiohttp.ClientTimeout:
    """One HTTP request: bounded while connecting and while the server sends nothing (a large download may
    take longer in all, as long as data keeps coming)."""
    return aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)


class _Run:
    def __init__(self, session: aiohttp.ClientSession, url: str, timeout: float | None, verbose: bool):
        self.session = session
        self.url = url.rstrip("/")
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.verbose = verbose
        self._object_info: dict | None = None
        self._class_info: dict[str, dict] = {}

    # -- plumbing

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def get_json(self, path: str) -> Any:
        try:
            async with self.session.get(self.url + path, timeout=_request_timeout()) as resp:
                resp.raise_for_status()
                return await resp.json()
        except asyncio.TimeoutError:  # before ClientError: aiohttp's read timeout is both
            raise WorkflowError(f"GET {path} on {self.url}: no answer within {READ_TIMEOUT:g} s",
                                kind="connection") from None
        except aiohttp.ClientError as ex:
            raise WorkflowError(f"GET {path} failed on {self.url}: {ex}", kind="connection") from None

    async def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = await self.get_json("/object_info")
        return self._object_info

    async def class_inputs(self, class_type: str) -> list[str]:
        if self._object_info is not None:
            info = self._object_info.get(class_type) or {}
        else:
            if class_type not in self._class_info:
                self._class_info[class_type] = (await self.get_json(f"/object_info/{class_type}")).get(class_type) or {}
            info = self._class_info[class_type]
        inputs = info.get("input") or {}
        return [n for section in ("required", "optional") for n in (inputs.get(section) or {})]

    # -- steps

    async def prepare(self, workflow: Mapping, overrides: Iterable[str]) -> dict:
        info = await self.object_info() if is_ui_workflow(workflow) else None
        prompt = to_api(workflow, lambda: info)
        overrides = list(overrides)
        if overrides:
            names = {}
            for node in prompt.values():
                class_type = node.get("class_type")
                if class_type not in names:
                    names[class_type] = await self.class_inputs(class_type)
            apply_overrides(prompt, overrides, input_names=lambda c: names.get(c, []))
        return prompt

    async def queue(self, prompt: dict, client_id: str, prompt_id: str, extra_data: dict) -> tuple[str, dict]:
        """Post the prompt; returns the id the server runs it under and the node_errors of outputs that were
        dropped (others still run)."""
        body = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id, "extra_data": extra_data}
        try:
            async with self.session.post(self.url + "/prompt", json=body, timeout=_request_timeout()) as resp:
                text = await resp.text()
                status = resp.status
        except asyncio.TimeoutError:
            raise WorkflowError(f"POST /prompt on {self.url}: no answer within {READ_TIMEOUT:g} s",
                                kind="connection") from None
        except aiohttp.ClientError as ex:
            raise WorkflowError(f"POST /prompt failed on {self.url}: {ex}", kind="connection") from None
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            answer = text
        if status == 400:
            raise WorkflowError(render_prompt_error(answer, prompt), kind="validation", data=answer)
        if status != 200:
            raise WorkflowError(f"POST /prompt answered {status}: {text[:2000]}", kind="connection", data=answer)
        if not isinstance(answer, Mapping):
            return prompt_id, {}
        # A host that ignores the client's prompt_id answers with its own: every later step uses that one.
        server_id = answer.get("prompt_id")
        return (str(server_id) if server_id else prompt_id), answer.get("node_errors") or {}

    async def follow(self, ws: aiohttp.ClientWebSocketResponse, prompt: dict, prompt_id: str,
                     progress: Progress) -> bool:
        """Read websocket messages until the prompt has finished (True) or the socket closed (False);
        raise on the prompt's failure, asyncio.TimeoutError at the deadline. While the socket is silent the
        history is looked at every HISTORY_POLL seconds, so a message this client never gets (a host that
        sends them elsewhere, or under another id) cannot make it wait for ever."""
        while True:
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:
                raise asyncio.TimeoutError
            try:
                msg = await ws.receive(timeout=HISTORY_POLL if remaining is None else min(HISTORY_POLL, remaining))
            except asyncio.TimeoutError:
                if prompt_id in await self.get_json(f"/history/{prompt_id}"):
                    return True
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.ERROR):
                return False  # the caller falls back to polling the history
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # binary preview images
            try:
                message = json.loads(msg.data)
            except json.JSONDecodeError:
                continue
            kind, data = message.get("type"), message.get("data") or {}
            if not isinstance(data, Mapping) or data.get("prompt_id") not in (prompt_id, None):
                continue
            if kind == "execution_cached" and data.get("prompt_id") == prompt_id:
                progress.cached([str(n) for n in data.get("nodes") or []])
            elif kind == "executing" and data.get("prompt_id") == prompt_id:
                if data.get("node") is None:
                    return True
                progress.executing(str(data.get("display_node") or data["node"]))
            elif kind == "progress" and data.get("prompt_id") == prompt_id:
                progress.step(data.get("node"), int(data.get("value", 0)), int(data.get("max", 0)))
            elif kind == "execution_error" and data.get("prompt_id") == prompt_id:
                raise WorkflowError(render_execution_error(data, prompt, self.verbose), kind="execution", data=data)
            elif kind == "execution_interrupted" and data.get("prompt_id") == prompt_id:
                raise WorkflowError(render_execution_error(data, prompt, self.verbose), kind="interrupted",
                                    data=data)
            elif kind == "execution_success" and data.get("prompt_id") == prompt_id:
                return True

    async def history(self, prompt: dict, prompt_id: str, finished: bool) -> dict:
        """The prompt's history entry, waiting for it to appear (a short while when the websocket said the
        prompt finished, else until the timeout); raises if it records a failure."""
        if finished:
            deadline = time.monotonic() + max(HISTORY_WAIT, self.remaining() or 0.0)
        else:
            deadline = self.deadline
        while True:
            entry = (await self.get_json(f"/history/{prompt_id}")).get(prompt_id)
            if entry is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise asyncio.TimeoutError
            await asyncio.sleep(0.2 if finished else 1.0)
        status = entry.get("status") or {}
        if status.get("status_str") == "error" or status.get("completed") is False:
            for kind, data in status.get("messages") or []:
                if kind in ("execution_error", "execution_interrupted"):
                    raise WorkflowError(render_execution_error(data, prompt, self.verbose),
                                        kind="execution" if kind == "execution_error" else "interrupted", data=data)
            raise WorkflowError(f"Prompt {prompt_id} did not complete: {status}", kind="execution", data=entry)
        return entry

    async def cancel(self, prompt_id: str) -> None:
        """Best effort: drop the prompt from the queue, or interrupt it when it is running."""
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                async with self.session.post(self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=10)):
                    pass
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass

    async def download(self, item: Mapping, out_dir: Path) -> Path:
        dest = local_path(out_dir, item)
        dest.parent.mkdir(parents=True, exist_ok=True)
        params = {"filename": item["filename"], "subfolder": item.get("subfolder") or "", "type": item["type"]}
        # Write beside the destination and rename: `out_dir` may be the server's own output folder.
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                async with self.session.get(self.url + "/view", params=params, timeout=_request_timeout()) as resp:
                    if resp.status != 200:
                        raise WorkflowError(f"GET /view for {item} answered {resp.status}", kind="connection")
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        fh.write(chunk)
            os.replace(tmp, dest)
        except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
            Path(tmp).unlink(missing_ok=True)
            raise WorkflowError(f"Downloading {item['filename']} from {self.url} failed: "
                                f"{str(ex) or f'no data for {READ_TIMEOUT:g} s'}", kind="connection") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest


async def run_workflow_async(url: str, workflow: Mapping, overrides: Iterable[str] = (), out_dir: str | Path = "output",
                             timeout: float | None = DEFAULT_TIMEOUT, *,
                             progress: bool | Callable[[dict], Progress] = False, verbose: bool = False) -> list[Path]:
    """Async form of :func:`run_workflow`."""
    out_dir = Path(out_dir)
    client_id = uuid.uuid4().hex
    prompt_id = str(uuid.uuid4())
    connect_only = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)  # requests pass their own
    async with aiohttp.ClientSession(timeout=connect_only) as session:
        run = _Run(session, url, timeout, verbose)
        prompt = await run.prepare(workflow, overrides)
        if progress is True:
            shown: Progress = ConsoleProgress(prompt)
        elif callable(progress):
            shown = progress(prompt)
        else:
            shown = Progress()
        extra_data = {"extra_pnginfo": {"workflow": workflow}} if is_ui_workflow(workflow) else {}
        try:
            try:
                ws = await asyncio.wait_for(session.ws_connect(f"{_ws_url(run.url)}/ws?clientId={client_id}",
                                                               heartbeat=30, max_msg_size=0), CONNECT_TIMEOUT)
            except (aiohttp.ClientError, asyncio.TimeoutError) as ex:
                reason = str(ex) or f"no answer within {CONNECT_TIMEOUT:g} s"
                raise WorkflowError(f"Cannot open the websocket of {run.url}: {reason}", kind="connection") from None
            async with ws:
                prompt_id, dropped = await run.queue(prompt, client_id, prompt_id, extra_data)
                shown.start(prompt_id)
                if dropped:
                    text = render_prompt_error({"error": {"message": "some outputs were dropped"},
                                                "node_errors": dropped}, prompt)
                    shown.warn(text.replace("Workflow failed validation: ", "warning: ", 1))
                try:
                    finished = await run.follow(ws, prompt, prompt_id, shown)
                    entry = await run.history(prompt, prompt_id, finished)
                except asyncio.CancelledError:  # Ctrl-C: do not leave the prompt running on the server
                    await asyncio.shield(run.cancel(prompt_id))
                    raise
                except asyncio.TimeoutError:
                    await run.cancel(prompt_id)
                    waited = f"after {timeout:g} s " if timeout is not None else ""
                    raise WorkflowError(f"Timed out {waited}waiting for prompt {prompt_id}; it was cancelled on the "
                                        "server. Give a longer --timeout SECONDS if it needs more time.",
                                        kind="timeout") from None
        finally:
            shown.close()
        saved = []
        for item in output_files(entry.get("outputs") or {}):
            saved.append(await run.download(item, out_dir))
        return saved


def run_workflow(url: str, workflow: Mapping, overrides: Iterable[str] = (), out_dir: str | Path = "output",
                 timeout: float | None = DEFAULT_TIMEOUT, *, progress: bool | Callable[[dict], Progress] = False,
                 verbose: bool = False) -> list[Path]:
    """Run a workflow (API or UI format) on the server at ``url`` and download its outputs.

    ``overrides`` are ``NODE.INPUT=VALUE`` strings. Returns the saved paths (under ``out_dir``, the
    server's subfolders kept). Raises :class:`WorkflowError` (``str()`` is the rendered message) when
    conversion, validation or execution fails, or after ``timeout`` seconds (queue and execution together;
    ``None``: no limit). Each request to the server is bounded too (CONNECT_TIMEOUT, READ_TIMEOUT).
    """
    return asyncio.run(run_workflow_async(url, workflow, overrides, out_dir, timeout, progress=progress,
                                          verbose=verbose))


def prepare_prompt(url: str, workflow: Mapping, overrides: Iterable[str] = ()) -> dict:
    """The API-format prompt that :func:`run_workflow` would post (conversion and overrides applied)."""
    async def go() -> dict:
        async with aiohttp.ClientSession() as session:
            return await _Run(session, url, None, False).prepare(workflow, overrides)
    return asyncio.run(go())

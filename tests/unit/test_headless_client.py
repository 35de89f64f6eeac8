"""The runner against a stand-in ComfyUI: a small aiohttp app on 127.0.0.1 that speaks the host's prompt protocol,
so the protocol cases run in about a second without a real server.

What the stand-in sends is what Comfy-Org/ComfyUI sends, as read in its sources:
- server.py, PromptServer ``post_prompt``: POST /prompt answers ``{"prompt_id", "number", "node_errors"}``; it keeps
  a client-sent ``prompt_id`` (a canonical UUID, else 400), while the December 2024 host always made its own
  (../shared/docs/host-versions.md). ``websocket_handler`` sends ``status {status, sid}`` on connect.
- execution.py, PromptExecutor ``execute_async`` / ``add_message``: execution_start, execution_cached ``{nodes}``,
  executed ``{node, display_node, output}``, execution_success, each with ``prompt_id`` (and a timestamp);
  ``execute`` sends executing ``{node, display_node}``.
- comfy_execution/progress.py, WebUIProgressHandler ``_send_progress_state``: progress_state ``{prompt_id, nodes}``.
- main.py, ``hijack_progress``: progress ``{value, max, prompt_id, node}`` and binary preview frames;
  ``prompt_worker``: the history entry is written after execution_success, then executing ``{node: null}``.
"""
import asyncio
import contextlib
import json
import math
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from headless import client  # noqa: E402
from headless.__main__ import build_parser, main  # noqa: E402
from headless.client import run_workflow_async  # noqa: E402
from headless.errors import WorkflowError  # noqa: E402
from headless.server import free_port  # noqa: E402

GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fake"}}}
IMAGE = {"filename": "fake_00001_.png", "subfolder": "adm", "type": "output"}


class FakeHost:
    """``ids``: "server" (December 2024: its own prompt_id) or "client" (newest: the client's);
    ``messages``: send the run's websocket messages; ``finish``: ever finish; ``answer``: answer POST /prompt."""

    def __init__(self, ids="server", messages=True, finish=True, answer=True):
        self.ids, self.messages, self.finish, self.answer = ids, messages, finish, answer
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.history: dict[str, dict] = {}
        self.posted: list[dict] = []
        self.minted: list[str] = []
        self.cancelled: list[tuple[str, dict]] = []
        self.history_asked: list[str] = []
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        app.router.add_post("/prompt", self.prompt)
        app.router.add_get("/history/{prompt_id}", self.get_history)
        app.router.add_post("/queue", self.cancel)
        app.router.add_post("/interrupt", self.cancel)
        app.router.add_get("/view", self.view)
        app.on_shutdown.append(self.close_sockets)
        return app

    async def ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self.sockets[sid] = ws
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}})
        async for _ in ws:
            pass
        return ws

    async def close_sockets(self, app):
        for ws in list(self.sockets.values()):
            await ws.close()

    async def prompt(self, request):
        body = await request.json()
        self.posted.append(body)
        if not self.answer:
            await asyncio.sleep(3600)
        prompt_id = str(uuid.uuid4()) if self.ids == "server" else body["prompt_id"]
        self.minted.append(prompt_id)
        asyncio.get_running_loop().create_task(self.execute(self.sockets[body["client_id"]], prompt_id))
        return web.json_response({"prompt_id": prompt_id, "number": len(self.posted), "node_errors": {}})

    async def execute(self, ws, prompt_id):
        now = int(time.time() * 1000)

        async def send(kind, **data):
            if self.messages:
                await ws.send_json({"type": kind, "data": {**data, "prompt_id": prompt_id}})

        # Another client's prompt finishing first must not end this one.
        await ws.send_json({"type": "execution_success", "data": {"prompt_id": str(uuid.uuid4()), "timestamp": now}})
        await send("execution_start", timestamp=now)
        await send("execution_cached", nodes=[], timestamp=now)
        await send("executing", node="1", display_node="1")
        await send("progress_state", nodes={"1": {"value": 1, "max": 2, "state": "running", "node_id": "1",
                                                  "prompt_id": prompt_id, "display_node_id": "1",
                                                  "parent_node_id": None, "real_node_id": "1"}})
        await send("progress", value=1, max=2, node="1")
        if self.messages:
            await ws.send_bytes(struct.pack(">I", 1) + b"\xff\xd8 a jpeg preview")
        if not self.finish:
            return
        await send("executing", node="2", display_node="2")
        await send("executed", node="2", display_node="2", output={"images": [IMAGE]})
        await send("execution_success", timestamp=now)
        await asyncio.sleep(0.05)  # the host writes the history entry after execution_success
        self.history[prompt_id] = {"prompt": [], "outputs": {"2": {"images": [IMAGE]}},
                                   "status": {"status_str": "success", "completed": True, "messages": []}}
        await send("executing", node=None)

    async def get_history(self, request):
        prompt_id = request.match_info["prompt_id"]
        self.history_asked.append(prompt_id)
        return web.json_response({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def cancel(self, request):
        self.cancelled.append((request.path, await request.json()))
        return web.Response()

    async def view(self, request):
        assert request.query["filename"] == IMAGE["filename"]
        return web.Response(body=b"image bytes")


@contextlib.contextmanager
def fake_host(**behaviour):
    host = FakeHost(**behaviour)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(host.app(), shutdown_timeout=1)
    port = free_port()
    host.url = f"http://127.0.0.1:{port}"

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield host
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def run(url, out_dir, timeout=5.0, limit=10.0):
    """run_workflow, with a bound of its own so that a runner that waits for ever fails here instead of hanging."""
    return asyncio.run(asyncio.wait_for(run_workflow_async(url, GRAPH, out_dir=out_dir, timeout=timeout), limit))


@pytest.mark.parametrize("ids", ["server", "client"], ids=["december-2024-own-id", "newest-keeps-client-id"])
def test_the_runner_follows_the_id_the_server_answers(tmp_path, ids):
    with fake_host(ids=ids) as host:
        began = time.monotonic()
        paths = run(host.url, tmp_path)
        assert time.monotonic() - began < 3  # not a timeout, not the HISTORY_WAIT fallback
    server_id, = host.minted
    assert (server_id == host.posted[0]["prompt_id"]) == (ids == "client")
    assert set(host.history_asked) == {server_id}
    assert paths == [tmp_path / "adm" / IMAGE["filename"]] and paths[0].read_bytes() == b"image bytes"


def test_a_silent_websocket_ends_through_the_history(tmp_path, monkeypatch):
    """No message ever reaches this client (a proxy that drops them, a host that sends them elsewhere): the
    history, looked at while the socket is silent, ends the wait."""
    monkeypatch.setattr(client, "HISTORY_POLL", 0.2, raising=False)
    with fake_host(messages=False) as host:
        assert run(host.url, tmp_path) == [tmp_path / "adm" / IMAGE["filename"]]


def test_the_timeout_cancels_the_prompt_under_the_servers_id(tmp_path):
    with fake_host(finish=False) as host:
        began = time.monotonic()
        with pytest.raises(WorkflowError) as info:
            run(host.url, tmp_path, timeout=0.5)
        assert time.monotonic() - began < 3
    assert info.value.kind == "timeout" and "Timed out after 0.5 s" in str(info.value)
    assert "--timeout" in str(info.value)  # the way to wait longer
    server_id, = host.minted
    assert host.cancelled == [("/queue", {"delete": [server_id]}), ("/interrupt", {"prompt_id": server_id})]


def test_a_server_that_never_answers_the_prompt_is_given_up_on(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "READ_TIMEOUT", 0.3, raising=False)
    with fake_host(answer=False) as host:
        with pytest.raises(WorkflowError) as info:
            run(host.url, tmp_path, timeout=60)
    assert info.value.kind == "connection" and "POST /prompt" in str(info.value) and "0.3 s" in str(info.value)


def test_the_cli_waits_a_bounded_time_by_default_and_runs_on_a_december_2024_host(tmp_path, capsys):
    timeout = build_parser().parse_args(["run", "w.json"]).timeout
    assert math.isfinite(timeout) and timeout == client.DEFAULT_TIMEOUT
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(GRAPH))
    with fake_host(ids="server") as host:
        assert main(["run", str(workflow), "--server", host.url, "--out", str(tmp_path / "out"), "--timeout", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "out" / "adm" / IMAGE["filename"])
    assert f"queued prompt {next(iter(host.history))}" in captured.err

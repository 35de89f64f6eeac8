"""Showing a running prompt on stderr: one line per node, and a step bar while a node reports progress."""
from __future__ import annotations

import sys
from typing import Any, Mapping, TextIO


class Progress:
    """Receives the runner's events; the base class shows nothing."""

    def start(self, prompt_id: str) -> None: ...

    def cached(self, node_ids: list[str]) -> None: ...

    def executing(self, node_id: str) -> None: ...

    def step(self, node_id: str | None, value: int, maximum: int) -> None: ...

    def warn(self, text: str) -> None: ...

    def close(self) -> None: ...


class ConsoleProgress(Progress):
    """Node lines ("executing 3 (KSampler)") and a tqdm bar of sampling steps, on stderr."""

    def __init__(self, prompt: Mapping[str, Any], stream: TextIO | None = None, bar: bool | None = None):
        self.prompt = prompt
        self.stream = stream or sys.stderr
        # tqdm's convention: None shows the bar only when the stream is a terminal.
        self.bar_enabled = bar if bar is not None else (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.bar = None
        self.bar_node: str | None = None
        self.done = 0

    def _label(self, node_id: str) -> str:
        node = self.prompt.get(str(node_id)) or {}
        class_type = node.get("class_type", "?")
        title = (node.get("_meta") or {}).get("title")
        extra = f' "{title}"' if title and title != class_type else ""
        return f"{node_id} ({class_type}{extra})"

    def _write(self, text: str) -> None:
        if self.bar is not None:
            from tqdm import tqdm
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.bar_node = None

    def start(self, prompt_id: str) -> None:
        self._write(f"queued prompt {prompt_id} ({len(self.prompt)} nodes)")

    def cached(self, node_ids: list[str]) -> None:
        if node_ids:
            self._write(f"cached: {', '.join(self._label(n) for n in node_ids)}")

    def executing(self, node_id: str) -> None:
        self._close_bar()
        self.done += 1
        self._write(f"executing {self._label(node_id)}")

    def step(self, node_id: str | None, value: int, maximum: int) -> None:
        if not self.bar_enabled:
            if value == maximum:
                self._write(f"  {value}/{maximum} steps")
            return
        from tqdm import tqdm
        if self.bar is None or self.bar_node != node_id or self.bar.total != maximum:
            self._close_bar()
            self.bar = tqdm(total=maximum, file=self.stream, leave=False, unit="step", dynamic_ncols=True,
                            desc=f"node {node_id}" if node_id is not None else "steps")
            self.bar_node = node_id
        self.bar.n = value
        self.bar.refresh()

    def warn(self, text: str) -> None:
        self._write(text)

    def close(self) -> None:
        self._close_bar()

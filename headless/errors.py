"""Errors of the headless runner, and their rendering as text a person can read.

The host reports two kinds of failure: a 400 answer to POST /prompt when the graph does not validate
(``{"error": {...}, "node_errors": {node_id: {"errors": [...], "class_type": ...}}}``) and an
``execution_error`` websocket message when a node raises while running. Both become a
:class:`WorkflowError` whose ``str()`` is the rendered text.
"""
from __future__ import annotations

from typing import Any, Mapping


class HeadlessError(Exception):
    """Base class of everything this tool raises on purpose; ``str()`` is meant for the user.

    ``usage`` is True when the command line, or a file or folder it names, cannot be used: nothing was run
    (the command line exits 2 for these)."""

    usage = False


class WorkflowError(HeadlessError):
    """The workflow could not be read, converted, validated or executed.

    ``kind`` says which step failed ("input": the workflow file itself; "conversion", "override",
    "validation", "execution", "interrupted", "timeout", "connection"); ``data`` holds the host's raw
    payload where there is one.
    """

    USAGE_KINDS = ("input", "override")

    def __init__(self, message: str, kind: str = "execution", data: Any = None):
        super().__init__(message)
        self.kind = kind
        self.data = data
        self.usage = kind in self.USAGE_KINDS


class ServerError(HeadlessError):
    """The ComfyUI server could not be started or stopped answering (``usage``: there is no ComfyUI where
    the command line says)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def _titles(prompt: Mapping | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for node_id, node in (prompt or {}).items():
        title = (node.get("_meta") or {}).get("title") if isinstance(node, Mapping) else None
        if title and title != node.get("class_type"):
            out[str(node_id)] = title
    return out


def _node_label(node_id: Any, class_type: str | None, titles: Mapping[str, str]) -> str:
    label = f"node {node_id}"
    if class_type:
        label += f" ({class_type})"
    title = titles.get(str(node_id))
    if title:
        label += f' "{title}"'
    return label


def _render_reason(reason: Mapping) -> str:
    message = str(reason.get("message") or reason.get("type") or "error").strip()
    details = str(reason.get("details") or "").strip()
    extra = reason.get("extra_info") or {}
    input_name = extra.get("input_name") if isinstance(extra, Mapping) else None
    text = f"input '{input_name}': {message}" if input_name else message
    # The host often repeats the input name as the whole of `details`: drop it then.
    if details and details != input_name:
        text += f" ({details})"
    if isinstance(extra, Mapping) and "received_value" in extra and str(extra["received_value"]) not in text:
        text += f" [received {extra['received_value']!r}]"
    return text


def render_prompt_error(body: Any, prompt: Mapping | None = None) -> str:
    """Render the JSON body of a 400 answer to POST /prompt."""
    if not isinstance(body, Mapping):
        return f"The server refused the workflow: {body}"
    titles = _titles(prompt)
    error = body.get("error") or {}
    node_errors = body.get("node_errors") or {}
    if isinstance(error, Mapping):
        headline = str(error.get("message") or "The server refused the workflow")
        details = str(error.get("details") or "").strip()
    else:
        headline, details = str(error), ""
    lines = [f"Workflow failed validation: {headline}"]
    if node_errors:
        for node_id, entry in node_errors.items():
            entry = entry or {}
            class_type = entry.get("class_type") or ((prompt or {}).get(node_id) or {}).get("class_type")
            reasons = entry.get("errors") or []
            label = _node_label(node_id, class_type, titles)
            if not reasons:
                lines.append(f"  {label}: invalid")
            for reason in reasons:
                lines.append(f"  {label}, {_render_reason(reason)}")
    elif details:
        # Errors not tied to a node (missing class_type, unknown node type, no outputs).
        lines.append(f"  {details}")
    return "\n".join(lines)


def render_execution_error(data: Mapping, prompt: Mapping | None = None, verbose: bool = False) -> str:
    """Render the data of an ``execution_error`` (or ``execution_interrupted``) websocket message."""
    titles = _titles(prompt)
    node_id = data.get("node_id")
    class_type = data.get("node_type") or ((prompt or {}).get(str(node_id)) or {}).get("class_type")
    label = _node_label(node_id, class_type, titles)
    if "exception_message" not in data:
        return f"Execution was interrupted at {label}."
    message = str(data.get("exception_message") or "").strip()
    exc_type = str(data.get("exception_type") or "").strip()
    short_type = exc_type.rsplit(".", 1)[-1]
    lines = [f"Execution failed at {label}: {short_type + ': ' if short_type else ''}{message}"]
    inputs = data.get("current_inputs") or {}
    if verbose and isinstance(inputs, Mapping) and inputs:
        lines.append("  inputs:")
        for name, value in inputs.items():
            text = str(value)
            lines.append(f"    {name} = {text if len(text) <= 200 else text[:200] + '...'}")
    traceback = data.get("traceback") or []
    if traceback:
        if verbose:
            lines.append("  server traceback:")
            lines.extend("    " + line.rstrip().replace("\n", "\n    ") for line in traceback)
        else:
            last = str(traceback[-1]).strip().splitlines()[0]
            lines.append(f"  raised at {last.strip()}")
    return "\n".join(lines)

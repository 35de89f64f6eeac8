"""``--set NODE.INPUT=VALUE``: change one input of an API-format prompt.

NODE is a node id, else a node's ``_meta.title``, else its ``class_type`` (each only when it names one
node). VALUE is read as JSON when it parses (numbers, true/false, null, lists, quoted strings) and is
taken as a plain string otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, MutableMapping

from .errors import WorkflowError


@dataclass(frozen=True)
class Override:
    node: str
    input: str
    value: Any
    text: str


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON (or nested past what json reads): the text itself
        return text


def parse_override(text: str) -> Override:
    target, sep, value = text.partition("=")
    node, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not node or not name:
        raise WorkflowError(f"Bad override {text!r}: expected NODE.INPUT=VALUE (for example 3.seed=42 or "
                            "\"KSampler.steps=4\")", kind="override")
    return Override(node=node, input=name, value=parse_value(value), text=text)


def _describe(prompt: Mapping) -> str:
    lines = []
    for node_id, node in prompt.items():
        title = (node.get("_meta") or {}).get("title")
        extra = f' "{title}"' if title and title != node.get("class_type") else ""
        lines.append(f"    {node_id}: {node.get('class_type')}{extra}")
    return "\n".join(lines)


def find_node(prompt: Mapping, ref: str) -> str:
    """The id of the node that ``ref`` names (id, unique title, unique class_type)."""
    if ref in prompt:
        return ref
    for key in ("title", "class_type"):
        for fold in (False, True):
            def norm(s: Any) -> Any:
                return s.casefold() if fold and isinstance(s, str) else s
            matches = [node_id for node_id, node in prompt.items()
                       if norm((node.get("_meta") or {}).get("title") if key == "title" else node.get("class_type"))
                       == norm(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise WorkflowError(f"Override target '{ref}' is ambiguous: it matches the {key} of nodes "
                                    f"{', '.join(matches)}; use a node id.", kind="override")
    raise WorkflowError(f"Override target '{ref}' matches no node id, title or class type. Nodes:\n"
                        + _describe(prompt), kind="override")


def apply_overrides(prompt: MutableMapping, overrides: Iterable[str | Override],
                    input_names: Callable[[str], Iterable[str]] | None = None) -> MutableMapping:
    """Apply overrides in place (and return the prompt).

    ``input_names(class_type)`` may give the inputs a node class accepts (from /object_info), so that an
    optional input the prompt does not set yet can be set; without it only existing inputs can be.
    """
    for item in overrides:
        override = item if isinstance(item, Override) else parse_override(item)
        node_id = find_node(prompt, override.node)
        node = prompt[node_id]
        inputs = node.setdefault("inputs", {})
        if override.input not in inputs:
            known = list(inputs)
            if input_names is not None:
                known += [n for n in input_names(node.get("class_type")) if n not in known]
            if override.input not in known:
                raise WorkflowError(f"Override {override.text!r}: node {node_id} ({node.get('class_type')}) has no "
                                    f"input '{override.input}'. Inputs: {', '.join(known) or '(none)'}",
                                    kind="override")
        inputs[override.input] = override.value
    return prompt

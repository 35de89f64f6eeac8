"""Workflow files: telling the two formats apart, and turning the UI format into the API format.

API format (what POST /prompt takes): ``{node_id: {"class_type": ..., "inputs": {...}, "_meta": {...}}}``
where a linked input is ``[source_node_id, output_slot]``.

UI format (what the editor saves): ``{"nodes": [...], "links": [...], ...}``; each node keeps the
values of its widgets in ``widgets_values`` in the order of its widget inputs, and its connections
in ``inputs[i].link`` (a link id). The widget order is taken from the server's /object_info.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import WorkflowError

MUTED, BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Editor-only nodes: they never reach the server.
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE_TYPES = {"Reroute"}
PRIMITIVE_TYPES = {"PrimitiveNode"}
VIRTUAL_TYPES = NOTE_TYPES | REROUTE_TYPES | PRIMITIVE_TYPES


# ----------------------------------------------------------------------------------------- loading

MAX_WORKFLOW_BYTES = 256 * 2 ** 20  # workflows are JSON text of a few MB at most; a model file is not one


def load_workflow(path: str | Path) -> dict:
    """Read a workflow JSON file (either format); WorkflowError (kind "input") names the file and the fix."""
    path = Path(path)
    try:
        if path.is_dir():
            raise WorkflowError(f"Workflow file {path} is a folder: give the workflow's .json file itself.",
                                kind="input")
        size = path.stat().st_size
        if size > MAX_WORKFLOW_BYTES:
            raise WorkflowError(f"Workflow file {path} is {size / 2 ** 20:.0f} MiB: a workflow is a JSON file of a few "
                                "MB at most; check that you gave the workflow and not a model or a video.",
                                kind="input")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise WorkflowError(f"Workflow file not found: {path}. Check the path.", kind="input") from None
    except OSError as ex:
        raise WorkflowError(f"Cannot read workflow file {path}: {ex.strerror or ex}.", kind="input") from None
    return parse_workflow(raw, f"Workflow file {path}")


def parse_workflow(raw: bytes, name: str) -> dict:
    """A workflow from the bytes of a JSON file; ``name`` ("Workflow file X", "stdin") starts each message."""
    if not raw.strip():
        raise WorkflowError(f"{name} is empty: give a workflow saved from ComfyUI.", kind="input")
    try:
        data = json.loads(raw)  # from bytes json reads UTF-8 (with or without BOM), UTF-16 and UTF-32
    except UnicodeDecodeError as ex:
        byte = raw[ex.start:ex.start + 1].hex()
        raise WorkflowError(f"{name} is not UTF-8 text (byte 0x{byte} at offset {ex.start}): save it as UTF-8, as "
                            "ComfyUI's editor does.", kind="input") from None
    except json.JSONDecodeError as ex:
        raise WorkflowError(f"{name} is not valid JSON: {ex}. Export the workflow again from ComfyUI "
                            "(Workflow > Export, or Export (API)).", kind="input") from None
    except RecursionError:
        raise WorkflowError(f"{name} nests lists or objects too deeply to read: it is not a ComfyUI workflow "
                            "(those nest a few levels).", kind="input") from None
    if not isinstance(data, dict):
        found = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise WorkflowError(f"{name} holds {found}, not a JSON object: it is not a ComfyUI workflow.", kind="input")
    try:
        workflow_format(data)
    except WorkflowError as ex:
        raise WorkflowError(f"{name}: {ex}", kind="input") from None
    return data


def is_ui_workflow(workflow: Mapping) -> bool:
    return isinstance(workflow.get("nodes"), list) and "links" in workflow


def is_api_workflow(workflow: Mapping) -> bool:
    return bool(workflow) and all(isinstance(v, Mapping) and "class_type" in v for v in workflow.values())


def workflow_format(workflow: Mapping) -> str:
    """ "ui" or "api"; raises WorkflowError for anything else."""
    if is_ui_workflow(workflow):
        return "ui"
    if is_api_workflow(workflow):
        return "api"
    if isinstance(workflow.get("prompt"), Mapping) and is_api_workflow(workflow["prompt"]):
        return "wrapped-api"
    raise WorkflowError("Not a ComfyUI workflow: expected the API format (node id -> {class_type, inputs}) "
                        "or the UI format (an object with 'nodes' and 'links').", kind="conversion")


# ----------------------------------------------------------------------------------------- input specs

def _options(spec: Any) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], Mapping):
        return dict(spec[1])
    return {}


def is_widget_spec(spec: Any) -> bool:
    """Whether the editor shows this input spec as a widget (and so stores it in widgets_values)."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    kind = spec[0]
    opts = _options(spec)
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec: Any) -> bool:
    """Whether the editor adds a "control after generate" value after this widget."""
    opts = _options(spec)
    if opts.get("control_after_generate"):
        return True
    return spec[0] == "INT" and name in SEED_NAMES


def ordered_inputs(info: Mapping) -> list[tuple[str, Any, bool]]:
    """(name, spec, required) for the required then optional inputs of a node's /object_info entry."""
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = list(order.get(section) or specs.keys())
        names += [n for n in specs if n not in names]
        out += [(n, specs[n], section == "required") for n in names if n in specs]
    return out


# ----------------------------------------------------------------------------------------- UI -> API

def _links_by_id(links: Iterable) -> dict[int, tuple]:
    """link id -> (origin_id, origin_slot, target_id, target_slot, type); both the list and the object form."""
    out = {}
    for link in links or []:
        if isinstance(link, Mapping):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                               link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            out[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return out


def _missing_pack_hint(node: Mapping) -> str:
    props = node.get("properties") or {}
    pack = props.get("cnr_id") or props.get("aux_id")
    if pack == "comfy-core":
        return "it is a core node this ComfyUI version lacks (update ComfyUI)"
    if pack:
        version = props.get("ver")
        return f"install the custom node pack '{pack}'" + (f" (version {version})" if version else "")
    node_type = str(node.get("type", ""))
    if node_type.startswith("ADM_"):
        return "install this extension (AnimateDiff Motion) into ComfyUI's custom_nodes and check the server log " \
               "for its import error"
    return "install the custom node pack that provides it (the workflow does not name the pack)"


class _Converter:
    def __init__(self, workflow: Mapping, object_info: Mapping):
        self.object_info = object_info
        self.nodes = {}
        for node in workflow.get("nodes") or []:
            self.nodes[node["id"]] = node
        self.links = _links_by_id(workflow.get("links"))
        subgraphs = ((workflow.get("definitions") or {}).get("subgraphs")) or []
        self.subgraph_ids = {sg.get("id") for sg in subgraphs if isinstance(sg, Mapping)}

    # -- which nodes take part

    def check_nodes(self) -> None:
        problems = []
        for node_id, node in self.nodes.items():
            node_type = node.get("type")
            if node.get("mode") in (MUTED, BYPASSED) or node_type in self.object_info:
                continue
            if node_type in VIRTUAL_TYPES:
                continue
            if node_type in self.subgraph_ids:
                problems.append(f"node {node_id} is a subgraph ({node.get('title') or node_type}); "
                                "subgraphs are not supported: unpack it in the editor or export the API format")
            elif isinstance(node_type, str) and node_type.startswith("workflow>"):
                problems.append(f"node {node_id} is a group node ({node_type}); group nodes are not supported: "
                                "convert it back to nodes in the editor or export the API format")
            else:
                problems.append(f"node {node_id} has type '{node_type}', which the server does not know: "
                                f"{_missing_pack_hint(node)}")
        if problems:
            raise WorkflowError("Cannot convert the UI workflow:\n  " + "\n  ".join(problems), kind="conversion")

    def executes(self, node: Mapping) -> bool:
        return node.get("mode") not in (MUTED, BYPASSED) and node.get("type") in self.object_info

    # -- links

    def resolve_link(self, link_id: Any, seen: frozenset = frozenset()) -> list | None:
        """[source id, slot] for a link, following reroutes and bypassed nodes; None when it leads nowhere
        (a muted node, a dangling link) and "widget" when the source is a primitive node."""
        if link_id is None or link_id not in self.links or link_id in seen:
            return None
        seen = seen | {link_id}
        origin_id, origin_slot, _target, _slot, link_type = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            return None
        origin_type = origin.get("type")
        if origin_type in PRIMITIVE_TYPES:
            return "widget"
        if origin_type in REROUTE_TYPES:
            inputs = origin.get("inputs") or []
            return self.resolve_link(inputs[0].get("link"), seen) if inputs else None
        if origin.get("mode") == BYPASSED:
            return self._through_bypass(origin, origin_slot, link_type, seen)
        if origin.get("mode") == MUTED or origin_type not in self.object_info:
            return None
        return [str(origin_id), origin_slot]

    def _through_bypass(self, node: Mapping, slot: int, link_type: Any, seen: frozenset) -> list | None:
        """A bypassed node passes an input of the link's type straight through: the input in the same
        position when its type matches, else the first input of that type, as the editor does."""
        inputs = [i for i in (node.get("inputs") or []) if i.get("link") is not None]
        all_inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        wanted = link_type if link_type not in (None, "*") else (outputs[slot].get("type") if slot < len(outputs) else None)
        candidates = []
        if slot < len(all_inputs) and all_inputs[slot].get("link") is not None and \
                all_inputs[slot].get("type") in (wanted, "*"):
            candidates.append(all_inputs[slot])
        candidates += [i for i in inputs if i.get("type") == wanted and i not in candidates]
        for candidate in candidates:
            resolved = self.resolve_link(candidate.get("link"), seen)
            if resolved is not None:
                return resolved
        return None

    # -- one node

    def convert_node(self, node: Mapping) -> dict:
        node_type = node["type"]
        info = self.object_info[node_type]
        ui_inputs = {i.get("name"): i for i in (node.get("inputs") or []) if i.get("name") is not None}
        for ui_input in node.get("inputs") or []:
            widget_name = (ui_input.get("widget") or {}).get("name")
            if widget_name:
                ui_inputs.setdefault(widget_name, ui_input)
        values = node.get("widgets_values")
        by_name = values if isinstance(values, Mapping) else None
        queue = list(values) if isinstance(values, (list, tuple)) else []
        inputs: dict[str, Any] = {}
        handled = set()

        for name, spec, _required in ordered_inputs(info):
            handled.add(name)
            ui_input = ui_inputs.get(name)
            link = self.resolve_link(ui_input.get("link")) if ui_input else None
            if is_widget_spec(spec):
                have_value = False
                if by_name is not None:
                    have_value, value = name in by_name, by_name.get(name)
                elif queue:
                    have_value, value = True, queue.pop(0)
                    if has_control_widget(name, spec) and queue and queue[0] in CONTROL_VALUES:
                        queue.pop(0)
                if isinstance(link, list):
                    inputs[name] = link
                elif have_value:
                    inputs[name] = value
            elif isinstance(link, list):
                inputs[name] = link

        # Inputs the editor added that /object_info does not list (dynamic inputs): keep their links.
        for name, ui_input in ui_inputs.items():
            if name in handled or name in inputs:
                continue
            link = self.resolve_link(ui_input.get("link"))
            if isinstance(link, list):
                inputs[name] = link

        title = node.get("title") or info.get("display_name") or node_type
        return {"inputs": inputs, "class_type": node_type, "_meta": {"title": title}}

    def convert(self) -> dict:
        self.check_nodes()
        prompt = {}
        for node_id, node in sorted(self.nodes.items(), key=lambda item: _sort_key(item[0])):
            if self.executes(node):
                prompt[str(node_id)] = self.convert_node(node)
        if not prompt:
            raise WorkflowError("The UI workflow has no node to execute (all are muted, bypassed or notes).",
                                kind="conversion")
        return prompt


def _sort_key(node_id: Any) -> tuple:
    try:
        return (0, int(node_id), "")
    except (TypeError, ValueError):
        return (1, 0, str(node_id))


def ui_to_api(workflow: Mapping, object_info: Mapping) -> dict:
    """Convert a UI-format workflow into the API format, using the server's /object_info."""
    try:
        return _Converter(workflow, object_info).convert()
    except (TypeError, KeyError, AttributeError, IndexError) as ex:  # a node, link or list of the wrong shape
        raise WorkflowError(f"The UI workflow is malformed ({type(ex).__name__}: {ex}): open it in ComfyUI's editor "
                            "and save or export it again.", kind="input") from None


def to_api(workflow: Mapping, object_info_getter) -> dict:
    """The API-format prompt for a workflow in either format. ``object_info_getter()`` is called only
    for the UI format."""
    kind = workflow_format(workflow)
    if kind == "ui":
        return ui_to_api(workflow, object_info_getter())
    if kind == "wrapped-api":
        return json.loads(json.dumps(workflow["prompt"]))
    return json.loads(json.dumps(workflow))

"""API format -> UI format, so every workflow we ship exists in both from one source (the API file).

Widget values go into ``widgets_values`` in the order of the node's /object_info inputs (a linked widget
keeps a stand-in value, as the editor does; seeds get their "control after generate" value); links become
editor links.

Layout, so that a workflow opened at the zoom that fits it reads without moving a node: each node belongs to a
titled group (Model, Motion, Prompts, Sampling, Output, ...), each group is one column, the columns go left to
right in the order of GROUPS (the order the data flows in), and inside a column nodes are stacked top to bottom
by their depth in the graph, with gaps. Node sizes are at least what the editor computes for them (LiteGraph's
``computeSize``: socket rows, widget rows, a textarea per multiline text), plus room for the clip a video node
shows, because the editor enlarges a node that is too small when it loads the workflow, over its neighbours.
``thumbnail`` draws that layout as the small picture the Templates menu shows beside the workflow.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

from .convert import has_control_widget, is_widget_spec, ordered_inputs

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "api_workflows"
"""API-format workflows, for `headless run` and the tests. Not a folder name ComfyUI lists as templates."""
UI_DIR = ROOT / "example_workflows"
"""UI-format workflows and their thumbnails: the folder ComfyUI's Templates menu lists (every .json in it)."""

# The editor's sizes (ComfyUI frontend 1.32, LiteGraph): a node's title bar is drawn *above* pos[1].
TITLE = 30          # LiteGraph.NODE_TITLE_HEIGHT
SLOT = 20           # LiteGraph.NODE_SLOT_HEIGHT: one row per socket (inputs and outputs side by side)
WIDGET = 20 + 4     # LiteGraph.NODE_WIDGET_HEIGHT plus the gap computeSize adds after each widget
TEXTAREA = 50 + 4   # a multiline text widget's minimum height (DOM widget default) plus the gap
PADDING = 8 + 6     # computeSize's padding below the widgets and at the bottom
GROUP_TITLE = 34    # LGraphGroup.titleHeight: font_size 24 * 1.4
# Our spacing.
WIDTH = 360         # node width: room for "motion_scale_per_frame" and its value
SLACK = 16          # extra height, so that a font wider than the estimate does not make the editor grow a node
GAP = 30            # between one node's bottom and the next node's title bar
GROUP_PAD = 20      # between a group's border and its nodes
GROUP_GAP = 80      # between two groups: room for the links between columns
PREVIEW = WIDTH     # a square for the clip an output node or a video loader shows once it has one

# Group title -> (colour, node types). Other types go by their category (_group_of); the order is the columns'.
GROUPS = {
    "Model": ("#3f789e", {"CheckpointLoaderSimple", "CheckpointLoader", "LoraLoader", "LoraLoaderModelOnly",
                          "VAELoader", "CLIPLoader", "CLIPSetLastLayer"}),
    "Motion": ("#8A8", {"ADM_LoadMotionModule", "ADM_LoadMotionLoRA", "ADM_ApplyMotionModule", "ADM_ContextWindows",
                        "ADM_SamplingOptions", "ADM_MotionKeyframe", "ADM_LoadCameraCtrl",
                        "ADM_ApplyCameraCtrlPoses"}),
    "Input video": ("#a1309b", {"ADM_LoadVideo", "VAEEncode", "LoadImage"}),
    "Data": ("#a1309b", {"ADM_VideoDataset"}),
    "Prompts": ("#b58b2a", {"CLIPTextEncode", "ADM_PromptTravel"}),
    "Sampling": ("#88A", {"EmptyLatentImage", "KSampler", "KSamplerAdvanced", "VAEDecode"}),
    "Training": ("#88A", {"ADM_TrainMotionModule"}),
    "Output": ("#b06634", {"ADM_SaveVideo", "SaveImage", "PreviewImage", "SaveAnimatedWEBP"}),
}


def _group_of(class_type: str, info: Mapping) -> str:
    for title, (_colour, types) in GROUPS.items():
        if class_type in types:
            return title
    category = str(info.get("category", ""))
    if info.get("output_node"):
        return "Output"
    if "loaders" in category:
        return "Model"
    if "conditioning" in category:
        return "Prompts"
    return "Sampling"


def _depths(api: Mapping) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            links = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(str(src)) for src in links), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def _height(info: Mapping, sockets: int, widget_specs: list) -> int:
    """At least LiteGraph's computeSize height for these sockets and widgets, plus SLACK."""
    rows = max(sockets, len(info["output"]), 1)
    widgets = sum(TEXTAREA if (spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}).get("multiline")
                  else WIDGET for spec in widget_specs)
    height = rows * SLOT + widgets + PADDING + SLACK
    options = [spec[1] for spec in widget_specs if len(spec) > 1 and isinstance(spec[1], Mapping)]
    if any(o.get(key) for o in options for key in ("video_upload", "image_upload", "animated_image_upload")):
        height += WIDGET + PREVIEW  # the upload button, then the chosen file's preview
    elif info.get("output_node") and any(spec[0] == "IMAGE" for _name, spec, _ in ordered_inputs(info)):
        height += PREVIEW  # the images or the clip it shows after a run
    return height


def api_to_ui(api: Mapping, object_info: Mapping) -> dict:
    links, nodes, outgoing = [], [], {}
    for node_id, node in api.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                outgoing.setdefault((str(value[0]), value[1]), [])
    depth = _depths(api)
    for node_id, node in sorted(api.items(), key=lambda item: (depth[item[0]], int(item[0]))):
        info = object_info[node["class_type"]]
        ui_inputs, widgets, widget_specs = [], [], []
        for name, spec, _required in ordered_inputs(info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list)
            if linked:
                link_id = len(links) + 1
                source_type = object_info[api[str(value[0])]["class_type"]]["output"][value[1]]
                links.append([link_id, int(value[0]), value[1], int(node_id), len(ui_inputs), source_type])
                outgoing[(str(value[0]), value[1])].append(link_id)
                entry = {"name": name, "type": source_type, "link": link_id}
                if is_widget_spec(spec):
                    entry["widget"] = {"name": name}
                ui_inputs.append(entry)
            if is_widget_spec(spec):
                default = (spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}).get("default")
                widgets.append(default if linked or name not in node["inputs"] else value)
                widget_specs.append(spec)
                if has_control_widget(name, spec):
                    widgets.append("fixed")
                    widget_specs.append(("COMBO",))
        sockets = sum(1 for entry in ui_inputs if "widget" not in entry)
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [0, 0],
                      "size": [WIDTH, _height(info, sockets, widget_specs)], "flags": {}, "order": len(nodes),
                      "mode": 0,
                      "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
                      "inputs": ui_inputs, "widgets_values": widgets,
                      "properties": {"Node name for S&R": node["class_type"]}, "outputs": []})
    for node in nodes:
        info = object_info[node["type"]]
        names = info.get("output_name") or info["output"]
        node["outputs"] = [{"name": names[slot], "type": kind, "slot_index": slot,
                            "links": outgoing.get((str(node["id"]), slot), [])}
                           for slot, kind in enumerate(info["output"])]
    groups = _lay_out(nodes, object_info)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": groups, "config": {}, "extra": {}, "version": 0.4}


def _lay_out(nodes: list[dict], object_info: Mapping) -> list[dict]:
    """Place the nodes (already in depth order) in one column per group; return the editor's groups."""
    columns: dict[str, list[dict]] = {}
    for node in nodes:
        columns.setdefault(_group_of(node["type"], object_info[node["type"]]), []).append(node)
    groups, left = [], 0
    for group_id, title in enumerate((t for t in GROUPS if t in columns), start=1):
        x, top = left + GROUP_PAD, GROUP_TITLE + GROUP_PAD + TITLE
        y = top
        for node in columns[title]:
            node["pos"] = [x, y]
            y += node["size"][1] + GAP + TITLE
        bottom = y - GAP - TITLE + GROUP_PAD
        groups.append({"id": group_id, "title": title, "bounding": [left, 0, WIDTH + 2 * GROUP_PAD, bottom],
                       "color": GROUPS[title][0], "font_size": 24, "flags": {}})
        left += WIDTH + 2 * GROUP_PAD + GROUP_GAP
    return groups


def thumbnail(ui: Mapping, size: tuple[int, int] = (384, 288)) -> bytes:
    """A small JPEG of the workflow's layout (groups, nodes with their titles, links), for the Templates menu.
    Drawn at twice the size and scaled down, so that the small text stays legible."""
    from PIL import Image, ImageDraw, ImageFont

    boxes = [g["bounding"] for g in ui["groups"]] or [[0, 0, 1, 1]]
    right = max(b[0] + b[2] for b in boxes)
    bottom = max(b[1] + b[3] for b in boxes)
    width, height, margin = 2 * size[0], 2 * size[1], 16
    scale = min((width - 2 * margin) / right, (height - 2 * margin) / bottom)
    dx, dy = (width - right * scale) / 2, (height - bottom * scale) / 2

    def xy(x, y):
        return dx + x * scale, dy + y * scale

    image = Image.new("RGB", (width, height), "#202020")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(14, round(22 * scale)))

    def label(x, y, text, room):
        while text and draw.textlength(text, font=font) > room * scale:
            text = text[:-2] + "…" if len(text) > 2 else ""
        draw.text(xy(x, y), text, fill="#e8e8e8", font=font, anchor="lm")

    for group in ui["groups"]:
        x, y, w, h = group["bounding"]
        draw.rectangle([*xy(x, y), *xy(x + w, y + h)], fill=_dim(group["color"]), outline=group["color"], width=2)
        label(x + 10, y + GROUP_TITLE / 2, group["title"], w - 20)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for _link_id, source, slot, target, target_slot, _kind in ui["links"]:
        a, b = by_id[source], by_id[target]
        start = xy(a["pos"][0] + a["size"][0], a["pos"][1] + SLOT * (slot + 0.5))
        end = xy(b["pos"][0], b["pos"][1] + SLOT * (target_slot + 0.5))
        draw.line([start, end], fill="#8a8a8a", width=2)
    for node in ui["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        draw.rectangle([*xy(x, y - TITLE), *xy(x + w, y + h)], fill="#353535", outline="#111111")
        draw.rectangle([*xy(x, y - TITLE), *xy(x + w, y)], fill="#505050")
        label(x + 8, y - TITLE / 2, node["title"], w - 16)
    out = io.BytesIO()
    image.resize(size, Image.LANCZOS).save(out, format="JPEG", quality=75, optimize=True)
    return out.getvalue()


def _dim(colour: str) -> str:
    """The group colour at a third of its brightness: the editor draws group fills at low opacity."""
    hex_digits = colour.lstrip("#")
    if len(hex_digits) == 3:
        hex_digits = "".join(c * 2 for c in hex_digits)
    r, g, b = (int(hex_digits[i:i + 2], 16) // 3 + 20 for i in (0, 2, 4))
    return f"#{r:02x}{g:02x}{b:02x}"


def ui_twin_path(api_path: Path) -> Path:
    """Where the UI twin of an API workflow goes: example_workflows/NAME.json for ours, else beside it."""
    name = api_path.name.replace("_api.json", ".json")
    folder = UI_DIR if api_path.resolve().parent == API_DIR else api_path.parent
    return folder / name


def write_ui_twin(api: Mapping, object_info: Mapping, out: Path) -> list[Path]:
    """Write the UI workflow to ``out`` and its thumbnail beside it (same name, .jpg: the file the Templates menu
    asks for); return both paths."""
    import json

    ui = api_to_ui(api, object_info)
    out.write_text(json.dumps(ui, indent=1) + "\n")
    picture = out.with_suffix(".jpg")
    picture.write_bytes(thumbnail(ui))
    return [out, picture]

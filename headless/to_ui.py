"""API format -> UI format, so every workflow we ship exists in both from one source (the API file).

Widget values go into ``widgets_values`` in the order of the node's /object_info inputs (a linked widget
keeps a stand-in value, as the editor does; seeds get their "control after generate" value); links become
editor links. Nodes are laid out in columns by their depth in the graph.
"""
from __future__ import annotations

from typing import Mapping

from .convert import has_control_widget, is_widget_spec, ordered_inputs

COLUMN, ROW = 380, 30


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


def api_to_ui(api: Mapping, object_info: Mapping) -> dict:
    links, nodes, outgoing = [], [], {}
    for node_id, node in api.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                outgoing.setdefault((str(value[0]), value[1]), [])
    depth = _depths(api)
    column_heights: dict[int, int] = {}
    for node_id, node in sorted(api.items(), key=lambda item: (depth[item[0]], int(item[0]))):
        info = object_info[node["class_type"]]
        ui_inputs, widgets = [], []
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
                if has_control_widget(name, spec):
                    widgets.append("fixed")
        column = depth[node_id]
        height = 60 + 26 * (len(widgets) + len(ui_inputs))
        top = column_heights.get(column, 0)
        column_heights[column] = top + height + ROW
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [column * COLUMN, top],
                      "size": [COLUMN - 40, height], "flags": {}, "order": len(nodes), "mode": 0,
                      "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
                      "inputs": ui_inputs, "widgets_values": widgets,
                      "properties": {"Node name for S&R": node["class_type"]}, "outputs": []})
    by_id = {n["id"]: n for n in nodes}
    for node in nodes:
        info = object_info[node["type"]]
        names = info.get("output_name") or info["output"]
        node["outputs"] = [{"name": names[slot], "type": kind, "slot_index": slot,
                            "links": outgoing.get((str(node["id"]), slot), [])}
                           for slot, kind in enumerate(info["output"])]
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}

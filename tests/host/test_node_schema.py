"""Every node: a prefixed id that collides with nothing in ComfyUI core, a display name that says how it differs
from core nodes, a description, a tooltip on every input and output, and workflows that only use our nodes or core
ones."""
import json
import re

import pytest

from adm.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from conftest import COMFYUI_DIR, ROOT

OTHER_PACK_IDS = {"AnimateDiffLoader", "AnimateDiffSampler", "AnimateDiffCombine", "AnimateDiffModuleLoader",
                  "AnimateDiffLoraLoader", "LoadVideo", "SaveVideo", "CreateVideo", "ImageSizeAndBatchSize"}


def core_node_ids():
    """Node ids defined by the host (nodes.py and comfy_extras), read from the source without importing it all."""
    import re
    ids = set()
    for path in [COMFYUI_DIR / "nodes.py", *(COMFYUI_DIR / "comfy_extras").glob("*.py")]:
        text = path.read_text(errors="ignore")
        ids |= set(re.findall(r'node_id="([^"]+)"', text)) | set(re.findall(r'^\s*"(\w+)"\s*:\s*\w+,\s*$', text, re.M))
    return ids


def core_display_names():
    """The names the host's nodes show in search and on the canvas: display names from nodes.py and comfy_extras
    (V3 schemas' display_name, classic NODE_DISPLAY_NAME_MAPPINGS, the hooks nodes' NodeName), and the ids of nodes
    that have none. Read from the source: importing them all costs ~20 s."""
    names = set(core_node_ids())
    for path in [COMFYUI_DIR / "nodes.py", *(COMFYUI_DIR / "comfy_extras").glob("*.py")]:
        text = path.read_text(errors="ignore")
        names |= set(re.findall(r'\b(?:display_name|NodeName)\s*=\s*["\']([^"\']+)["\']', text))
        for block in re.findall(r"NODE_DISPLAY_NAME_MAPPINGS\s*=\s*\{(.*?)\n\}", text, re.S):
            names |= set(re.findall(r'["\'][^"\']+["\']\s*:\s*["\']([^"\']+)["\']', block))
    return names


def test_display_names_say_how_our_nodes_differ_from_the_hosts():
    """Without the "(AnimateDiff)" badge, no name of ours is the name of a host node ("Save Video" and "Load
    Video" were: in search and on the canvas only a small badge told them apart)."""
    core = {name.casefold() for name in core_display_names()}
    assert "load checkpoint" in core  # the scan finds what it must ...
    if "SaveVideo" in core_node_ids():  # ... and the core video nodes, on hosts that have them (2025 on)
        assert {"save video", "load video"} <= core
    for node_id, name in NODE_DISPLAY_NAME_MAPPINGS.items():
        bare = re.sub(r"\s*\(AnimateDiff[^)]*\)$", "", name)
        assert bare != name and bare.casefold() not in core, f"{node_id}: {name!r}"


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_is_prefixed_documented_and_explains_every_input_and_output(node_id):
    node = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("ADM_") and node_id in NODE_DISPLAY_NAME_MAPPINGS
    assert node_id not in core_node_ids() | OTHER_PACK_IDS
    assert node.DESCRIPTION and node.CATEGORY.startswith("AnimateDiff Motion")
    spec = node.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            assert options and options[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(getattr(node, "OUTPUT_TOOLTIPS", ())) == len(node.RETURN_TYPES), f"{node_id} outputs lack tooltips"


WORKFLOWS = sorted([*(ROOT / "api_workflows").glob("*.json"), *(ROOT / "example_workflows").glob("*.json")])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_workflows_use_only_our_nodes_and_core_ones(path):
    workflow = json.loads(path.read_text())
    types = [n["type"] for n in workflow["nodes"]] if "nodes" in workflow else [n["class_type"] for n in workflow.values()]
    core = core_node_ids()
    assert [t for t in types if t not in NODE_CLASS_MAPPINGS and t not in core] == []


def test_every_api_workflow_has_its_ui_twin_and_thumbnail():
    apis = sorted(p.name.replace("_api.json", "") for p in (ROOT / "api_workflows").glob("*.json"))
    uis = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
    thumbnails = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.jpg"))
    assert apis == uis == thumbnails and len(apis) == 11

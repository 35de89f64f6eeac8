"""Every node: a prefixed id that collides with nothing in ComfyUI core, a description, a tooltip on every input
and output, and workflows that only use our nodes or core ones."""
import json

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


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_workflows_use_only_our_nodes_and_core_ones(path):
    workflow = json.loads(path.read_text())
    types = [n["type"] for n in workflow["nodes"]] if "nodes" in workflow else [n["class_type"] for n in workflow.values()]
    core = core_node_ids()
    assert [t for t in types if t not in NODE_CLASS_MAPPINGS and t not in core] == []


def test_every_api_workflow_has_its_ui_twin():
    for api in (ROOT / "workflows").glob("*_api.json"):
        assert (api.parent / api.name.replace("_api.json", ".json")).exists(), api.name

"""Layouts of the UI workflows (the shipped ones and what headless/to_ui.py generates): read as the editor draws
them, with each node's title bar above its position and each node at least the size the editor gives it."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from headless.convert import ui_to_api  # noqa: E402
from headless.to_ui import api_to_ui, thumbnail  # noqa: E402

TITLE = 30          # LiteGraph.NODE_TITLE_HEIGHT, drawn above pos[1]
GROUP_TITLE = 34    # LGraphGroup.titleHeight (font_size 24 * 1.4)
GAP = 10            # nodes closer than this read as touching
UI_FILES = sorted((ROOT / "example_workflows").glob("*.json"))


def min_height(node):
    """A lower bound of LiteGraph's computeSize height: a row per socket, 20 px + 4 per widget (a textarea, here a
    long or multi-line text, at least 50), 14 of padding. The editor enlarges a smaller node when it loads it."""
    sockets = sum(1 for entry in node.get("inputs", []) if "widget" not in entry)
    rows = max(sockets, len(node.get("outputs", [])), 1)
    widgets = sum(54 if isinstance(v, str) and (len(v) > 40 or "\n" in v) else 24 for v in node["widgets_values"])
    return rows * 20 + widgets + 14


def box(node):
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE, x + w, y + h


def overlap(a, b, gap=0):
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def inside(inner, outer):
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def layout_problems(ui):
    """Everything that makes the workflow hard to read at the zoom that fits it, as readable strings."""
    problems = []
    nodes = ui["nodes"]
    for node in nodes:
        if node["size"][1] < min_height(node):
            problems.append(f"{node['title']} is {node['size'][1]} px high, the editor makes it {min_height(node)}")
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if overlap(box(a), box(b), GAP):
                problems.append(f"{a['title']} and {b['title']} overlap or touch")
    groups = [(g["title"], (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                            g["bounding"][1] + g["bounding"][3])) for g in ui["groups"]]
    if not groups:
        problems.append("no groups")
    for i, (title, rect) in enumerate(groups):
        body = (rect[0], rect[1] + GROUP_TITLE, rect[2], rect[3])
        members = [n for n in nodes if inside(box(n), body)]
        if not title or not members:
            problems.append(f"group {title!r} is untitled or empty")
        problems += [f"group {title} overlaps group {other}" for other, o in groups[i + 1:] if overlap(rect, o)]
    for node in nodes:
        homes = [t for t, rect in groups if inside(box(node), (rect[0], rect[1] + GROUP_TITLE, rect[2], rect[3]))]
        if len(homes) != 1:
            problems.append(f"{node['title']} is in groups {homes}, not in exactly one (below its title)")
    by_id = {n["id"]: n for n in nodes}
    for _id, source, _slot, target, _target_slot, _kind in ui["links"]:
        a, b = by_id[source], by_id[target]
        same_column = a["pos"][0] == b["pos"][0]
        if not (a["pos"][0] < b["pos"][0] or same_column and a["pos"][1] < b["pos"][1]):
            problems.append(f"the link {a['title']} -> {b['title']} goes backwards")
    return problems


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_shipped_ui_workflows_read_without_moving_a_node(path):
    assert layout_problems(json.loads(path.read_text())) == []


def test_old_style_layouts_are_caught():
    """Two nodes stacked as the generator used to stack them: the editor grows the first over the second's title."""
    loader = {"id": 1, "title": "Load Checkpoint", "pos": [0, 0], "size": [340, 86], "inputs": [],
              "outputs": [{}, {}, {}], "widgets_values": ["v1-5.safetensors"]}
    motion = {**loader, "id": 2, "title": "Load Motion Module", "pos": [0, 116], "outputs": [{}]}
    problems = layout_problems({"nodes": [loader, motion], "links": [], "groups": []})
    assert any("Load Checkpoint is 86 px high" in p for p in problems)
    assert any("overlap or touch" in p for p in problems) and "no groups" in problems


# A txt2vid-shaped /object_info with the real input specs that decide sizes: sockets, seeds, multiline text, a
# video upload, output nodes.
S = {"default": ""}
OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"], {}]}},
                               "output": ["MODEL", "CLIP", "VAE"], "category": "loaders"},
    "ADM_LoadMotionModule": {"input": {"required": {"model_name": [["mm.ckpt"], {}]}}, "output": ["MOTION_MODULE"],
                             "category": "AnimateDiff Motion/loaders"},
    "ADM_ApplyMotionModule": {"input": {"required": {"model": ["MODEL", {}], "motion_module": ["MOTION_MODULE", {}],
                                                     "motion_scale": ["FLOAT", {"default": 1.0}]}},
                              "output": ["MODEL"], "category": "AnimateDiff Motion"},
    "ADM_LoadVideo": {"input": {"required": {"video": [["a.mp4"], {"video_upload": True}], "frames": ["INT", {}]}},
                      "output": ["IMAGE", "INT", "FLOAT", "AUDIO"], "category": "AnimateDiff Motion/video"},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
                       "output": ["CONDITIONING"], "category": "conditioning"},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {}], "height": ["INT", {}]}},
                         "output": ["LATENT"], "category": "latent"},
    "KSampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                        "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
                                        "latent_image": ["LATENT", {}]}},
                 "output": ["LATENT"], "category": "sampling"},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}}, "output": ["IMAGE"],
                  "category": "latent"},
    "ADM_SaveVideo": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", S]},
                                "optional": {"mp4_crf": ["INT", {"default": 18}], "audio": ["AUDIO", {}]}},
                      "output": ["STRING"], "output_node": True, "category": "AnimateDiff Motion/video"},
}
API = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
    "2": {"class_type": "ADM_LoadMotionModule", "inputs": {"model_name": "mm.ckpt"}},
    "3": {"class_type": "ADM_ApplyMotionModule", "inputs": {"model": ["1", 0], "motion_module": ["2", 0],
                                                            "motion_scale": 1.0}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
    "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512}},
    "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 1, "positive": ["4", 0],
                                               "negative": ["5", 0], "latent_image": ["6", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
    "9": {"class_type": "ADM_SaveVideo", "inputs": {"images": ["8", 0], "filename_prefix": "x", "mp4_crf": 18,
                                                    "audio": ["10", 3]}},
    "10": {"class_type": "ADM_LoadVideo", "inputs": {"video": "a.mp4", "frames": 16}},
}


def test_generated_layout_has_titled_groups_and_room_for_everything():
    ui = api_to_ui(API, OBJECT_INFO)
    assert layout_problems(ui) == []
    back = ui_to_api(ui, OBJECT_INFO)  # the layout changes nothing else
    assert {k: (v["class_type"], v["inputs"]) for k, v in back.items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in API.items()}
    titles = {g["title"] for g in ui["groups"]}
    assert titles == {"Model", "Motion", "Input video", "Prompts", "Sampling", "Output"}
    nodes = {n["id"]: n for n in ui["nodes"]}
    # the widgets that grow: a textarea (CLIPTextEncode), and the clip Save Video and Load Video show
    assert nodes[4]["size"][1] >= 20 + 54 + 14 and nodes[9]["size"][1] >= nodes[9]["size"][0]
    assert nodes[10]["size"][1] >= nodes[10]["size"][0]


def test_thumbnail_is_a_small_jpeg():
    import io

    from PIL import Image

    picture = thumbnail(api_to_ui(API, OBJECT_INFO))
    image = Image.open(io.BytesIO(picture))
    assert image.format == "JPEG" and image.size == (384, 288) and len(picture) < 16 * 1024
    assert sum(1 for count in image.convert("L").histogram() if count) > 16  # drawn, not blank

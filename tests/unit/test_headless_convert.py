"""The headless runner's pure parts: UI -> API conversion, --set overrides, error rendering."""
import copy
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from headless.__main__ import build_parser, main  # noqa: E402
from headless.client import local_path, output_files  # noqa: E402
from headless.convert import load_workflow, to_api, ui_to_api, workflow_format  # noqa: E402
from headless.errors import WorkflowError, render_execution_error, render_prompt_error  # noqa: E402
from headless.overrides import apply_overrides, parse_override, parse_value  # noqa: E402
from headless.progress import ConsoleProgress  # noqa: E402

# A small /object_info, shaped like the host's.
OBJECT_INFO = {
    "TestLoader": {
        "input": {"required": {"ckpt_name": [["a.ckpt", "b.ckpt"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL"], "output_node": False, "display_name": "Test Loader",
    },
    "TestSampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0, "min": 0, "control_after_generate": True}],
                "steps": ["INT", {"default": 20, "min": 1}],
                "sampler_name": [["euler", "ddim"], {}],
                "cfg": ["FLOAT", {"default": 8.0}],
            },
            "optional": {
                "denoise": ["FLOAT", {"default": 1.0}],
                "mask": ["MASK", {}],
                "note": ["STRING", {"multiline": True}],
                "strength": ["FLOAT", {"forceInput": True}],
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        },
        "input_order": {"required": ["model", "seed", "steps", "sampler_name", "cfg"],
                        "optional": ["denoise", "mask", "note", "strength"], "hidden": ["unique_id"]},
        "output": ["LATENT"], "output_node": False, "display_name": "Test Sampler",
    },
    "TestNoise": {  # old-style seed widget: no control_after_generate option, but named noise_seed
        "input": {"required": {"noise_seed": ["INT", {"default": 0}], "mode": ["COMBO", {"options": ["x", "y"]}],
                               "on": ["BOOLEAN", {"default": True}]}},
        "output": ["NOISE"], "output_node": False,
    },
    "TestMask": {"input": {"required": {"value": ["FLOAT", {}]}}, "output": ["MASK"], "output_node": False},
    "TestFloat": {"input": {"required": {"value": ["FLOAT", {}]}}, "output": ["FLOAT"], "output_node": False},
    "TestDecode": {"input": {"required": {"samples": ["LATENT", {}]}}, "output": ["IMAGE"], "output_node": False},
    "TestFilter": {"input": {"required": {"image": ["IMAGE", {}], "amount": ["FLOAT", {}]}}, "output": ["IMAGE"],
                   "output_node": False},
    "TestSave": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                  "hidden": {"prompt": "PROMPT"}},
        "output": [], "output_node": True, "display_name": "Test Save",
    },
}


def _in(name, type_, link=None, widget=False):
    entry = {"name": name, "type": type_, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def _out(type_, links):
    return {"name": type_, "type": type_, "links": links}


def ui_workflow():
    """loader -> sampler -> decode -> reroute -> bypassed filter -> save, plus a muted mask node feeding the
    sampler's optional mask, a primitive node feeding `steps`, a float node feeding the converted `cfg`
    widget, a note, and a noise node with an old-style seed."""
    nodes = [
        {"id": 1, "type": "TestLoader", "mode": 0, "inputs": [], "outputs": [_out("MODEL", [1])],
         "widgets_values": ["b.ckpt"], "properties": {"cnr_id": "comfy-core"}},
        {"id": 2, "type": "TestSampler", "mode": 0, "title": "Main sampler",
         "inputs": [_in("model", "MODEL", 1), _in("mask", "MASK", 2), _in("seed", "INT", None, widget=True),
                    _in("steps", "INT", 7, widget=True), _in("cfg", "FLOAT", 8, widget=True)],
         "outputs": [_out("LATENT", [3])],
         "widgets_values": [42, "randomize", 20, "ddim", 7.5, 0.8, "hello"]},
        {"id": 3, "type": "TestMask", "mode": 2, "inputs": [], "outputs": [_out("MASK", [2])], "widgets_values": [1.0]},
        {"id": 4, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["remember this"]},
        {"id": 7, "type": "TestDecode", "mode": 0, "inputs": [_in("samples", "LATENT", 3)],
         "outputs": [_out("IMAGE", [4])], "widgets_values": []},
        {"id": 5, "type": "Reroute", "mode": 0, "inputs": [_in("", "*", 4)], "outputs": [_out("IMAGE", [5])]},
        {"id": 8, "type": "TestFilter", "mode": 4, "inputs": [_in("image", "IMAGE", 5)],
         "outputs": [_out("IMAGE", [6])], "widgets_values": [0.5]},
        {"id": 6, "type": "TestSave", "mode": 0, "inputs": [_in("images", "IMAGE", 6)], "outputs": [],
         "widgets_values": ["adm/test"]},
        {"id": 9, "type": "PrimitiveNode", "mode": 0, "inputs": [], "outputs": [_out("INT", [7])],
         "widgets_values": [20, "fixed"]},
        {"id": 10, "type": "TestFloat", "mode": 0, "inputs": [], "outputs": [_out("FLOAT", [8])],
         "widgets_values": [6.0]},
        {"id": 11, "type": "TestNoise", "mode": 0, "inputs": [], "outputs": [_out("NOISE", [])],
         "widgets_values": [123, "increment", "y", False]},
    ]
    links = [
        [1, 1, 0, 2, 0, "MODEL"],
        [2, 3, 0, 2, 1, "MASK"],
        [3, 2, 0, 7, 0, "LATENT"],
        [4, 7, 0, 5, 0, "IMAGE"],
        [5, 5, 0, 8, 0, "IMAGE"],
        [6, 8, 0, 6, 0, "IMAGE"],
        [7, 9, 0, 2, 3, "INT"],
        [8, 10, 0, 2, 4, "FLOAT"],
    ]
    return {"last_node_id": 11, "last_link_id": 8, "nodes": nodes, "links": links, "groups": [], "version": 0.4}


# ------------------------------------------------------------------------------------------ conversion

def test_formats_are_told_apart():
    assert workflow_format(ui_workflow()) == "ui"
    assert workflow_format({"1": {"class_type": "TestSave", "inputs": {}}}) == "api"
    with pytest.raises(WorkflowError, match="Not a ComfyUI workflow"):
        workflow_format({"foo": 1})


def test_ui_to_api_maps_widgets_links_and_skips_editor_nodes():
    prompt = ui_to_api(ui_workflow(), OBJECT_INFO)
    # Muted (3), bypassed (8), note (4), reroute (5) and primitive (9) nodes are not sent.
    assert sorted(prompt, key=int) == ["1", "2", "6", "7", "10", "11"]
    assert prompt["1"] == {"inputs": {"ckpt_name": "b.ckpt"}, "class_type": "TestLoader",
                           "_meta": {"title": "Test Loader"}}
    sampler = prompt["2"]
    assert sampler["class_type"] == "TestSampler"
    assert sampler["_meta"] == {"title": "Main sampler"}
    assert sampler["inputs"] == {
        "model": ["1", 0],
        "seed": 42,              # the "randomize" after it is the editor's control value, skipped
        "steps": 20,             # fed by a primitive node: the widget's own value
        "sampler_name": "ddim",
        "cfg": ["10", 0],        # a widget converted to an input and linked
        "denoise": 0.8,          # optional widget
        "note": "hello",
    }                            # mask came from a muted node: left out; strength is forceInput, unlinked
    assert prompt["7"]["inputs"] == {"samples": ["2", 0]}
    # Through the reroute and the bypassed filter, straight to the decoder.
    assert prompt["6"]["inputs"] == {"images": ["7", 0], "filename_prefix": "adm/test"}
    assert prompt["11"]["inputs"] == {"noise_seed": 123, "mode": "y", "on": False}


def test_seed_without_stored_control_value():
    workflow = ui_workflow()
    workflow["nodes"][1]["widgets_values"] = [42, 20, "ddim", 7.5, 0.8, "hello"]
    inputs = ui_to_api(workflow, OBJECT_INFO)["2"]["inputs"]
    assert inputs["seed"] == 42 and inputs["sampler_name"] == "ddim" and inputs["note"] == "hello"


def test_widgets_values_as_a_mapping():
    workflow = ui_workflow()
    workflow["nodes"][-1]["widgets_values"] = {"noise_seed": 5, "mode": "x", "on": True, "extra": 1}
    assert ui_to_api(workflow, OBJECT_INFO)["11"]["inputs"] == {"noise_seed": 5, "mode": "x", "on": True}


def test_links_in_object_form():
    workflow = ui_workflow()
    workflow["links"] = [dict(zip(["id", "origin_id", "origin_slot", "target_id", "target_slot", "type"], link))
                         for link in workflow["links"]]
    assert ui_to_api(workflow, OBJECT_INFO) == ui_to_api(ui_workflow(), OBJECT_INFO)


def test_unknown_node_type_names_node_and_pack():
    workflow = ui_workflow()
    workflow["nodes"].append({"id": 12, "type": "VHS_VideoCombine", "mode": 0, "inputs": [], "outputs": [],
                              "properties": {"cnr_id": "comfyui-videohelpersuite", "ver": "1.7.0"}})
    workflow["nodes"].append({"id": 13, "type": "ADM_Missing", "mode": 0, "inputs": [], "outputs": []})
    workflow["nodes"].append({"id": 14, "type": "SomethingElse", "mode": 2, "inputs": [], "outputs": []})  # muted
    with pytest.raises(WorkflowError) as info:
        ui_to_api(workflow, OBJECT_INFO)
    text = str(info.value)
    assert info.value.kind == "conversion"
    assert "node 12" in text and "VHS_VideoCombine" in text and "comfyui-videohelpersuite" in text
    assert "node 13" in text and "ADM_Missing" in text and "AnimateDiff Motion" in text
    assert "14" not in text


def test_api_format_passes_through_unchanged():
    api = {"1": {"class_type": "TestSave", "inputs": {"images": ["2", 0]}, "_meta": {"title": "x"}}}
    out = to_api(api, lambda: pytest.fail("API format needs no object_info"))
    assert out == api and out is not api


# ------------------------------------------------------------------------------------------ overrides

def test_parse_value():
    assert parse_value("42") == 42
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value('"7"') == "7"
    assert parse_value("euler") == "euler"
    assert parse_value("a cat, b dog") == "a cat, b dog"


def test_parse_override_splits_at_first_equals_and_last_dot():
    o = parse_override("Model v1.5.ckpt_name=x=y.safetensors")
    assert (o.node, o.input, o.value) == ("Model v1.5", "ckpt_name", "x=y.safetensors")
    for bad in ("3seed=1", "3.seed", ".seed=1", "3.=1"):
        with pytest.raises(WorkflowError, match="NODE.INPUT=VALUE"):
            parse_override(bad)


def test_apply_overrides_by_id_title_and_class():
    prompt = ui_to_api(ui_workflow(), OBJECT_INFO)
    names = {k: [n for s in ("required", "optional") for n in v["input"].get(s, {})] for k, v in OBJECT_INFO.items()}
    apply_overrides(prompt, ["2.seed=7", "Main sampler.steps=4", "TestSave.filename_prefix=run/a",
                             "testloader.ckpt_name=a.ckpt", "2.mask=[\"3\", 0]"], input_names=names.get)
    assert prompt["2"]["inputs"]["seed"] == 7
    assert prompt["2"]["inputs"]["steps"] == 4
    assert prompt["2"]["inputs"]["mask"] == ["3", 0]  # an optional input the prompt did not set yet
    assert prompt["6"]["inputs"]["filename_prefix"] == "run/a"
    assert prompt["1"]["inputs"]["ckpt_name"] == "a.ckpt"


def test_override_errors_list_what_exists():
    prompt = ui_to_api(ui_workflow(), OBJECT_INFO)
    with pytest.raises(WorkflowError) as info:
        apply_overrides(copy.deepcopy(prompt), ["2.sead=1"])
    assert "no input 'sead'" in str(info.value) and "seed" in str(info.value) and "steps" in str(info.value)
    with pytest.raises(WorkflowError) as info:
        apply_overrides(copy.deepcopy(prompt), ["Nope.seed=1"])
    assert "matches no node" in str(info.value) and "2: TestSampler" in str(info.value)
    prompt["12"] = copy.deepcopy(prompt["2"])
    with pytest.raises(WorkflowError, match="ambiguous"):
        apply_overrides(prompt, ["TestSampler.seed=1"])


# ------------------------------------------------------------------------------------------ error rendering

PROMPT_400 = {  # as the host answers POST /prompt for EmptyImage(width=0)
    "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
              "details": "", "extra_info": {}},
    "node_errors": {
        "5": {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1",
                          "details": "width", "extra_info": {"input_name": "width", "received_value": 0}},
                         {"type": "value_not_in_list", "message": "Value not in list",
                          "details": "crop: 'middle' not in ['disabled', 'center']",
                          "extra_info": {"input_name": "crop", "received_value": "middle"}}],
              "dependent_outputs": ["9"], "class_type": "EmptyImage"}},
}


def test_render_prompt_error_names_node_class_and_input():
    text = render_prompt_error(PROMPT_400, {"5": {"class_type": "EmptyImage", "_meta": {"title": "Canvas"}}})
    lines = text.splitlines()
    assert lines[0] == "Workflow failed validation: Prompt outputs failed validation"
    assert lines[1] == "  node 5 (EmptyImage) \"Canvas\", input 'width': Value 0 smaller than min of 1"
    assert "input 'crop': Value not in list (crop: 'middle' not in ['disabled', 'center'])" in lines[2]


def test_render_prompt_error_without_node_errors():
    body = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node Foo does not exist.",
                      "details": "Node ID '#3'", "extra_info": {}}, "node_errors": {}}
    assert render_prompt_error(body) == ("Workflow failed validation: Cannot execute because node Foo does not "
                                         "exist.\n  Node ID '#3'")


EXECUTION_ERROR = {
    "prompt_id": "p1", "node_id": "2", "node_type": "SaveImage", "executed": ["1"],
    "exception_message": "'str' object has no attribute 'shape'\n", "exception_type": "AttributeError",
    "traceback": ['  File "/x/execution.py", line 10, in run\n    out = f()\n',
                  '  File "/x/nodes.py", line 1600, in save_images\n    i = image.shape\n'],
    "current_inputs": {"images": ["abc"], "filename_prefix": ["x"]}, "current_outputs": [],
}


def test_render_execution_error():
    text = render_execution_error(EXECUTION_ERROR)
    assert text.splitlines()[0] == "Execution failed at node 2 (SaveImage): AttributeError: 'str' object has no " \
                                   "attribute 'shape'"
    assert 'raised at File "/x/nodes.py", line 1600, in save_images' in text
    verbose = render_execution_error(EXECUTION_ERROR, verbose=True)
    assert "images = ['abc']" in verbose and "i = image.shape" in verbose
    interrupted = render_execution_error({"prompt_id": "p1", "node_id": "2", "node_type": "KSampler"})
    assert interrupted == "Execution was interrupted at node 2 (KSampler)."


# ------------------------------------------------------------------------------------------ outputs, CLI

def test_output_files_and_local_paths(tmp_path):
    outputs = {
        "9": {"images": [{"filename": "a_00001_.png", "subfolder": "adm", "type": "output"},
                         {"filename": "p.png", "subfolder": "", "type": "temp"}],
              "animated": [False]},
        "10": {"gifs": [{"filename": "v.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4"}],
               "text": ["hello"]},
        "11": {"images": [{"filename": "in.png", "subfolder": "", "type": "input"}]},
    }
    files = output_files(outputs)
    assert [(f["subfolder"], f["filename"], f["type"]) for f in files] == [
        ("adm", "a_00001_.png", "output"), ("", "p.png", "temp"), ("", "v.mp4", "output")]
    assert local_path(tmp_path, files[0]) == tmp_path / "adm" / "a_00001_.png"
    with pytest.raises(WorkflowError):
        local_path(tmp_path, {"filename": "x.png", "subfolder": "../up"})
    assert local_path(tmp_path, {"filename": "../../x.png", "subfolder": "/abs"}) == tmp_path / "abs" / "x.png"


def test_cli_has_run_and_reports_a_missing_file(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(["run", "w.json", "--set", "3.seed=1", "--host-arg=--output-directory=/tmp/x",
                              "--out", str(tmp_path)])
    assert args.overrides == ["3.seed=1"] and args.host_args == ["--output-directory=/tmp/x"]
    # Bad usage exits 2, as the help says (tests/unit/test_hostile_cli.py has the whole table).
    assert main(["run", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"class_type": "X", "inputs": {}}}')
    assert main(["run", str(bad), "--set", "oops"]) == 2  # override syntax is checked before any server start
    assert "NODE.INPUT=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("nodes", [[1], [{"id": 1, "type": "TestSave", "mode": 0, "inputs": 3}]],
                         ids=["node-not-an-object", "inputs-not-a-list"])
def test_a_malformed_ui_workflow_is_refused_with_a_message(nodes):
    with pytest.raises(WorkflowError, match="UI workflow is malformed") as info:
        ui_to_api({"nodes": nodes, "links": []}, OBJECT_INFO)
    assert info.value.kind == "input" and info.value.usage


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_workflow_files_in_the_unicode_encodings_editors_write_are_read(tmp_path, encoding):
    """A workflow saved by a Windows editor (UTF-8 with BOM) or redirected by PowerShell (UTF-16) is read."""
    path = tmp_path / "w.json"
    path.write_text('{"1": {"class_type": "X", "inputs": {"text": "caf\u00e9 \u6f22"}}}', encoding=encoding)
    assert load_workflow(path)["1"]["inputs"]["text"] == "caf\u00e9 \u6f22"


def test_console_progress_without_a_terminal():
    stream = io.StringIO()
    shown = ConsoleProgress({"3": {"class_type": "KSampler", "_meta": {"title": "Sampler"}},
                             "4": {"class_type": "VAEDecode", "_meta": {"title": "VAEDecode"}}}, stream=stream)
    shown.start("p1")
    shown.cached(["4"])
    shown.executing("3")
    for step in range(1, 4):
        shown.step("3", step, 3)
    shown.close()
    assert stream.getvalue().splitlines() == ["queued prompt p1 (2 nodes)", "cached: 4 (VAEDecode)",
                                              'executing 3 (KSampler "Sampler")', "  3/3 steps"]

"""The shipped UI workflows in ComfyUI's real frontend, in a headless Chromium (tests/browser.py): each one is
dropped onto the page as a user drops the file, opens without a dialog or a missing node, and converts
(graphToPrompt, what the Run button posts) to exactly its API twin; txt2vid then runs small from the page and
its Save node shows the clip. The other workflows' runs are covered over HTTP (test_txt2vid.py,
test_vid2vid.py); running them here too would cost ~20 s each on two cores and test no more of the page."""
import json
import time
import urllib.parse
import urllib.request

import pytest

from adm.headless.demo_models import CHECKPOINT, MOTION_MODULE
from browser import Browser, find_chromium
from conftest import ROOT

pytestmark = pytest.mark.e2e
API, UI = ROOT / "api_workflows", ROOT / "example_workflows"
WORKFLOWS = sorted(path.stem for path in UI.glob("*.json"))
SAVE_NODE = "ADM_SaveVideo"
# What a user would type into the widgets to try txt2vid small: the stand-in models, 4 frames of 64x64, 1 step
# (a step of the random full-size SD 1.5 UNet takes ~10-20 s on two busy CPU cores).
SMALL = {1: {"ckpt_name": CHECKPOINT}, 2: {"model_name": MOTION_MODULE},
         6: {"width": 64, "height": 64, "batch_size": 4}, 7: {"steps": 1}}
FRAMES = SMALL[6]["batch_size"]

# What the page shows on top of the canvas: PrimeVue dialogs (missing nodes, errors, execution errors), the
# legacy .comfy-modal dialogs and toasts; each with its text. Hidden ones (the legacy modals are kept in the
# DOM with display: none) do not count.
SHOWN = """[...document.querySelectorAll('.p-dialog, .comfy-modal, .p-toast-message')]
    .filter(e => getComputedStyle(e).display !== 'none' && e.getClientRects().length)
    .map(e => e.className.split(' ')[0] + ': ' + e.innerText.trim().slice(0, 500))"""
CLOSE_DIALOGS = """document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-toast-close-button')
    .forEach(button => button.click())"""


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def page(e2e_server):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH: `bash scripts/setup.sh` installs Debian's chromium package")
    # A first visit opens the templates browser for a new user; the page stores this setting itself on that
    # visit, so setting it first only spares the test a dialog that comes at an unknown moment.
    request = urllib.request.Request(f"{e2e_server}/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(request, timeout=30).close()
    with Browser(binary) as browser:
        browser.goto(e2e_server)
        browser.wait_for("window.app?.vueAppReady && app.graph && Object.keys(LiteGraph.registered_node_types)"
                         f".includes({json.dumps(SAVE_NODE)})", 120, "the ComfyUI page to load with this pack's nodes")
        browser.evaluate(CLOSE_DIALOGS)
        yield browser


def drop(page, name):
    """Drop example_workflows/<name>.json onto the page as a file (the page's own drop handler reads it) and
    wait until its graph is the one open; then the page's dialogs, toasts and errors since the drop."""
    text = (UI / f"{name}.json").read_text()
    nodes = sorted([node["id"], node["type"]] for node in json.loads(text)["nodes"])
    page.evaluate(CLOSE_DIALOGS)
    page.errors.clear()
    page.evaluate(f"""(() => {{
        const file = new File([{json.dumps(text)}], {json.dumps(name + '.json')}, {{type: 'application/json'}});
        const data = new DataTransfer();
        data.items.add(file);
        document.dispatchEvent(new DragEvent('drop', {{dataTransfer: data, bubbles: true, cancelable: true}}));
    }})()""")
    page.wait_for(f"""!app.extensionManager.spinner && JSON.stringify(app.graph.nodes.map(n => [n.id, n.type])
        .sort((a, b) => a[0] - b[0])) === {json.dumps(json.dumps(nodes, separators=(',', ':')))}""",
                  30, f"{name}.json to open after the drop")
    time.sleep(0.3)  # the dialogs the load opens are Vue components: rendered on the next frames
    return page.evaluate(SHOWN) + page.errors


@pytest.mark.parametrize("name", WORKFLOWS)
def test_dropped_ui_workflow_opens_cleanly_and_converts_to_its_api_twin(page, name):
    assert drop(page, name) == []
    # Missing node types give the dialog above, unless a user turned that warning off: ask the graph too.
    assert page.evaluate("app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type] || n.has_errors)"
                         ".map(n => n.type)") == []
    prompt = page.evaluate("app.graphToPrompt().then(prompt => prompt.output)")
    # Exactly the API file: the same node ids, classes, titles, every widget value and every link.
    assert prompt == json.loads((API / f"{name}_api.json").read_text())


def test_txt2vid_runs_from_the_page_and_save_video_shows_the_clip(page, e2e_server, tmp_path):
    assert drop(page, "txt2vid") == []
    page.evaluate(f"""(() => {{
        for (const [id, values] of Object.entries({json.dumps(SMALL)})) {{
            const node = app.graph.getNodeById(Number(id));
            for (const [name, value] of Object.entries(values)) {{
                const widget = node.widgets.find(w => w.name === name);
                widget.value = value;
                widget.callback?.(value);
            }}
        }}
    }})()""")
    before = set(get_json(f"{e2e_server}/history"))
    page.evaluate("app.queuePrompt(0, 1)")  # what the Run button does
    deadline = time.monotonic() + 300
    while not (runs := {k: v for k, v in get_json(f"{e2e_server}/history").items() if k not in before}):
        assert time.monotonic() < deadline, f"the run queued from the page did not finish in 300 s: {page.errors}"
        time.sleep(0.5)
    [run] = runs.values()
    assert run["status"]["status_str"] == "success", run["status"]
    prompt = run["prompt"][2]
    assert {id: {name: prompt[str(id)]["inputs"][name] for name in values} for id, values in SMALL.items()} == SMALL
    [preview] = run["outputs"]["9"]["images"]  # the animated WebP the node shows ("video" holds the MP4)
    # The page learns of the output over its websocket, after /history has it: wait for the node's image.
    shown = page.wait_for("""(() => { const img = app.graph.getNodeById(9).imgs?.[0];
        return img?.complete && img.naturalWidth && [img.src, img.naturalWidth, img.naturalHeight] })()""",
                          30, "the Save node to show the preview")
    query = urllib.parse.parse_qs(urllib.parse.urlparse(shown[0]).query)
    assert {key: query[key][0] for key in ("filename", "subfolder", "type")} == preview
    assert shown[1:] == [64, 64]
    # The image the node shows is the clip: every frame, animated (the browser's own decoder counts them).
    assert page.evaluate("""(async () => {
        const decoder = new ImageDecoder({data: (await fetch(app.graph.getNodeById(9).imgs[0].src)).body,
                                          type: 'image/webp'});
        await decoder.tracks.ready;
        return [decoder.tracks.selectedTrack.animated, decoder.tracks.selectedTrack.frameCount];
    })()""") == [True, FRAMES]
    assert page.evaluate(SHOWN) + page.errors == []
    # What the user sees, kept with the test's files (pytest keeps the last runs' tmp_path) to look at.
    page.evaluate("app.canvas.ds.scale = 0.8; app.canvas.centerOnNode(app.graph.getNodeById(9)); "
                  "app.canvas.setDirty(true, true)")
    time.sleep(0.3)
    page.screenshot(tmp_path / "txt2vid.png")

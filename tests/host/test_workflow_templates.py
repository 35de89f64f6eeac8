"""The Templates menu: what the host's own routes serve for this pack (Templates -> Extensions -> the pack's folder
name), requested the way the frontend (1.32) requests it: the list from /workflow_templates, then
/api/workflow_templates/<pack>/<name>.json to open one and <name>.jpg for its thumbnail."""
import asyncio
import io
import json

import folder_paths
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from conftest import ROOT

PACK = "animatediff-motion"  # any folder name under custom_nodes
API_FILES = sorted(p.name for p in (ROOT / "api_workflows").glob("*.json"))


async def serve_templates(custom_nodes):
    """The host's template routes on a bare aiohttp app, with this repository as the only custom node; returns
    (the template list, {url: (status, body)} for every workflow and thumbnail it lists)."""
    from app.custom_node_manager import CustomNodeManager

    routes, app = web.RouteTableDef(), web.Application()
    CustomNodeManager().add_routes(routes, app, [(PACK, str(custom_nodes / PACK))])
    app.add_routes(routes)
    async with TestClient(TestServer(app)) as client:
        listing = await (await client.get("/workflow_templates")).json()
        served = {}
        for name in listing.get(PACK, []) + [n[:-len(".json")] for n in API_FILES]:
            for suffix in (".json", ".jpg"):
                url = f"/api/workflow_templates/{PACK}/{name}{suffix}"
                response = await client.get(url)
                served[url] = (response.status, await response.read())
        return listing, served


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    (custom_nodes / PACK).symlink_to(ROOT, target_is_directory=True)
    saved = folder_paths.folder_names_and_paths["custom_nodes"]
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    try:
        return asyncio.run(serve_templates(custom_nodes))
    finally:
        folder_paths.folder_names_and_paths["custom_nodes"] = saved


def test_the_template_list_holds_only_the_ui_workflows(templates):
    listing, _ = templates
    expected = sorted(name[:-len("_api.json")] for name in API_FILES)
    assert sorted(listing[PACK]) == expected  # one template per workflow, no *_api, no repeats


def test_every_listed_template_opens_as_a_ui_workflow_with_a_thumbnail(templates):
    listing, served = templates
    for name in listing[PACK]:
        status, body = served[f"/api/workflow_templates/{PACK}/{name}.json"]
        assert status == 200, name
        workflow = json.loads(body)
        assert {"nodes", "links", "version"} <= set(workflow) and workflow["nodes"], name
        status, picture = served[f"/api/workflow_templates/{PACK}/{name}.jpg"]
        assert status == 200, f"{name}.jpg"
        image = Image.open(io.BytesIO(picture))
        assert image.format == "JPEG" and image.width >= 128 and len(picture) < 32 * 1024, name


def test_the_api_workflows_are_not_served_as_templates(templates):
    _, served = templates
    for name in API_FILES:
        assert served[f"/api/workflow_templates/{PACK}/{name}"][0] == 404, name

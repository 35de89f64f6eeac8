"""Load time and peak memory of reading a full-size motion-module file (issue 3: at most one copy of the
weights besides the module). Each measurement runs in a fresh process so peaks do not mix."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .extension import import_extension_module


def _rss_mib() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(path: str) -> dict:
    """In this process: read the file into a MotionModule; peak RSS before/after and the time it took."""
    formats = import_extension_module("motion_modules.formats")
    baseline = _rss_mib()
    start = time.perf_counter()
    module = formats.load_motion_module(path)
    seconds = time.perf_counter() - start
    after_load = _rss_mib() - baseline
    # Files are memory-mapped: pages become resident when used. Touch every weight, as sampling would.
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values() if t.sum() is not None) / 2**20
    return {"file": Path(path).name, "seconds": round(seconds, 2), "weights_mib": round(weights),
            "peak_rss_after_load_mib": round(after_load), "peak_rss_after_use_mib": round(_rss_mib() - baseline)}


def make_files(folder: Path) -> list[Path]:
    mm = import_extension_module("motion_modules")
    module = mm.MotionModule(mm.LAYOUTS["AnimateDiff v2"])
    sd = mm.published_state_dict(module)
    files = [folder / "mm_sd_v15_v2.ckpt", folder / "mm_sd_v15_v2.safetensors", folder / "mm_sd15_v2.fp16.safetensors"]
    torch.save(sd, files[0])
    save_file(sd, files[1])
    save_file({k: v.half() for k, v in sd.items()}, files[2])
    return files


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        files = make_files(Path(folder))
        for path in files:
            out = subprocess.run([sys.executable, "-c", "import json, sys; from headless.bench_load import measure; "
                                  "print(json.dumps(measure(sys.argv[1])))", str(path)],
                                 capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
            print(json.dumps({**json.loads(out.stdout.strip().splitlines()[-1]),
                              "file_mib": round(path.stat().st_size / 2**20)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

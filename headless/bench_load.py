"""Load time and memory of a full-size motion module read from a file (issue 3: at most one copy of the
weights; issue 16: on the CPU its resident cost is its weights' size). Each file is measured in a fresh process
so figures do not mix: ``.venv/bin/python -m headless.bench_load``."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .extension import ROOT, import_extension_module


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmHWM, the peak, is not inherited from the
    parent, unlike ru_maxrss), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(path: str) -> dict:
    """In this process, the path a workflow takes: Load Motion Module (``load_motion_patcher``), then the host
    loading it for sampling (``load_models_gpu``, on the CPU), then every weight read as sampling reads them.
    The module's resident cost is the resident set above its level before, against the weights' size."""
    sys.path.insert(0, str(ROOT / ".host" / "ComfyUI"))
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management
    patcher = import_extension_module("model_patcher.motion_patcher")
    gc.collect()
    before = {field: _status_mib(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    start = time.perf_counter()
    motion = patcher.load_motion_patcher(path)
    seconds = time.perf_counter() - start
    comfy.model_management.load_models_gpu([motion])
    tensors = motion.model.state_dict()
    for tensor in tensors.values():  # memory-mapped pages become resident when read
        tensor.sum()
    gc.collect()
    grown = {field: _status_mib(field) - before[field] for field in before}
    weights = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    return {"file": Path(path).name, "seconds": round(seconds, 2), "dtype": str(next(iter(tensors.values())).dtype),
            "weights_mib": round(weights), "resident_mib": round(grown["VmRSS"]),
            "resident_over_weights": round(grown["VmRSS"] / weights, 3), "of_which_file_backed_mib": round(grown["RssFile"]),
            "peak_mib": round(_status_mib("VmHWM") - before["VmRSS"]), "torch_threads": torch.get_num_threads()}


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
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            print(json.dumps({**json.loads(out.stdout.strip().splitlines()[-1]),
                              "file_mib": round(path.stat().st_size / 2**20)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

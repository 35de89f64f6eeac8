"""Long clips in context windows: peak memory and time for 16..128 frames with window 16, and seams.

Every clip length runs in a fresh process (peak memory is per process): the real SD1.5 UNet and an AnimateDiff
v2 module (random weights, real layouts: headless/demo_models.py), Euler, CFG 7.5, window 16 / overlap 4
(standard_static, so window boundaries stay put and seams can be measured). Seams: the mean absolute difference
between consecutive output latents, at the frame pairs where one window ends and the next begins, against the
pairs inside windows.

    .venv/bin/python -m headless.bench_windows [--frames 16 32 64 128] [--size 64] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(frames: int, size: int, steps: int, window: int, overlap: int) -> dict:
    import torch
    sys.path.insert(0, str(ROOT / ".host" / "ComfyUI"))
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    import comfy.sample
    import comfy.sd

    from .demo_models import ensure_random_models
    from .extension import import_extension_module
    patcher = import_extension_module("model_patcher.motion_patcher")
    windows = import_extension_module("model_patcher.context_windows")

    paths = ensure_random_models(ROOT / ".host" / "test-models")
    model = comfy.sd.load_checkpoint_guess_config(str(paths["checkpoint"]), output_vae=False, output_clip=False)[0]
    animated = patcher.apply_motion_module(model, patcher.load_motion_patcher(paths["motion_module"]))
    handler = windows.make_handler(window, overlap, "standard_static", "pyramid")
    animated = windows.apply_context_windows(animated, handler)
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    uncond = [[torch.randn(1, 77, 768, generator=g), {}]]
    noise = torch.randn(frames, 4, size // 8, size // 8, generator=g)
    comfy.model_management.load_models_gpu([animated])
    loaded = peak_rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: from here on it is the sampling's own
    start = time.perf_counter()
    out = comfy.sample.sample(animated, noise, steps, 7.5, "euler", "normal", cond, uncond, torch.zeros_like(noise),
                              seed=0, disable_pbar=True)
    seconds = time.perf_counter() - start
    starts = [w[0] for w in handler.context_schedule.func(frames, handler, {})]
    boundary = {s - 1 for s in starts[1:]}  # pair (s-1, s): the previous window's last new frame, the next's first
    diffs = (out[1:] - out[:-1]).abs().mean(dim=(1, 2, 3))
    inside = [d.item() for i, d in enumerate(diffs) if i not in boundary]
    seams = [diffs[i].item() for i in sorted(boundary)]
    return {"frames": frames, "windows": len(starts), "seconds": round(seconds, 1),
            "peak_rss_sampling_mib": round(peak_rss_mib()), "peak_rss_loading_mib": round(loaded),
            "latents_mib": round(noise.numel() * 4 * 6 / 2**20, 1),  # x, noise, output, sampler buffers
            "seam_mad": round(sum(seams) / len(seams), 4) if seams else None,
            "inside_mad": round(sum(inside) / len(inside), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--size", type=int, default=64, help="pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.frames[0], args.size, args.steps, args.window, args.overlap)))
        return 0
    for frames in args.frames:
        out = subprocess.run([sys.executable, "-m", "headless.bench_windows", "--one", "--frames", str(frames),
                              "--size", str(args.size), "--steps", str(args.steps), "--window", str(args.window),
                              "--overlap", str(args.overlap)], cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

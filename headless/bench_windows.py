"""Long clips in context windows: peak memory and time for 16..128 frames with window 16, and seams.

Every clip length runs in a fresh process (peak memory is per process): the real SD1.5 UNet and an AnimateDiff
v2 module (random weights, real layouts: headless/demo_models.py), Euler, CFG 7.5, window 16 / overlap 4
(standard_static, so window boundaries stay put and seams can be measured).

Seams are measured on a test clip (``--clip smooth``, the default): vid2vid at denoise 0.5 of a smooth pattern
drifting one latent pixel per frame, so every frame-to-frame change that is not the drift comes from the
sampling. Reported: the mean absolute difference between consecutive output latents over the pairs inside one
window, over the hand-overs between windows, and for the worst hand-over (see ``seam_report``). ``--clip noise``
is txt2vid from pure noise instead.

    .venv/bin/python -m headless.bench_windows [--frames 16 32 64 128] [--size 64] [--steps 2] [--clip smooth]

``--windows-per-batch 1 5`` runs each clip length once per value (each in a fresh process): the windows of a
step evaluated one by one, or up to N of them in one UNet call (the Context Windows node's windows_per_batch).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported inside the measuring child process only
    import torch

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def drifting_pattern(frames: int, size: int) -> torch.Tensor:
    """Latents [frames, 4, size/8, size/8] of a smooth pattern that drifts one latent pixel per frame."""
    import torch
    side = size // 8
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    t = torch.arange(frames).view(frames, 1, 1, 1)
    phase = torch.arange(4).view(1, 4, 1, 1)
    return torch.sin(2 * torch.pi * (x - t) / side + phase) * torch.cos(2 * torch.pi * y / side + phase)


def seam_report(out: torch.Tensor, windows: list[list[int]]) -> dict:
    """Mean absolute difference (MAD) between consecutive frames of ``out``: over the pairs inside one window
    (both frames covered by that window alone, with the pairs' standard deviation), over the hand-overs between
    windows (every other pair: from the last frame one window has alone, through the overlap, to the first frame
    the next has alone), and the worst hand-over's own mean, so one bad seam is not averaged away."""
    frames = out.shape[0]
    covering = [frozenset(n for n, window in enumerate(windows) if i in window) for i in range(frames)]
    diffs = (out[1:] - out[:-1]).abs().mean(dim=(1, 2, 3)).tolist()
    inside, hand_overs = [], []
    for i, diff in enumerate(diffs):
        if covering[i] == covering[i + 1] and len(covering[i]) == 1:
            inside.append(diff)
        elif i > 0 and hand_overs and not (covering[i - 1] == covering[i] and len(covering[i]) == 1):
            hand_overs[-1].append(diff)  # the hand-over the previous pair belongs to goes on
        else:
            hand_overs.append([diff])
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    sd = (sum((d - mean(inside)) ** 2 for d in inside) / max(1, len(inside) - 1)) ** 0.5
    return {"inside_mad": round(mean(inside), 4), "inside_pair_sd": round(sd, 4),
            "seam_mad": round(mean(sum(hand_overs, [])), 4) if hand_overs else None,
            "worst_seam_mad": round(max(map(mean, hand_overs)), 4) if hand_overs else None,
            "hand_overs": len(hand_overs)}


def measure(frames: int, size: int, steps: int, window: int, overlap: int, clip: str, fuse: str,
            per_batch: int = 1, threads: int | None = None) -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)
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
    handler = windows.make_handler(window, overlap, "standard_static", fuse, windows_per_batch=per_batch)
    animated = windows.apply_context_windows(animated, handler)
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    uncond = [[torch.randn(1, 77, 768, generator=g), {}]]
    noise = torch.randn(frames, 4, size // 8, size // 8, generator=g)
    latent, denoise = (drifting_pattern(frames, size), 0.5) if clip == "smooth" else (torch.zeros_like(noise), 1.0)
    comfy.model_management.load_models_gpu([animated])
    loaded = peak_rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: from here on it is the sampling's own
    start = time.perf_counter()
    out = comfy.sample.sample(animated, noise, steps, 7.5, "euler", "normal", cond, uncond, latent,
                              denoise=denoise, seed=0, disable_pbar=True)
    seconds = time.perf_counter() - start
    schedule = [list(w) for w in handler.context_schedule.func(frames, handler, {})]
    return {"frames": frames, "windows": len(schedule), "windows_per_batch": per_batch,
            "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
            "peak_rss_sampling_mib": round(peak_rss_mib()), "peak_rss_loading_mib": round(loaded),
            "latents_mib": round(noise.numel() * 4 * 6 / 2**20, 1),  # x, noise, output, sampler buffers
            "clip": clip, "fuse": fuse, **seam_report(out, schedule)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--size", type=int, default=64, help="pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--clip", choices=["smooth", "noise"], default="smooth",
                        help="smooth: vid2vid (denoise 0.5) of a drifting pattern; noise: txt2vid")
    parser.add_argument("--fuse", default="pyramid", help="the windows' fuse method")
    parser.add_argument("--windows-per-batch", type=int, nargs="+", default=[1],
                        help="windows per UNet call; each value is a run of its own (default: 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.frames[0], args.size, args.steps, args.window, args.overlap, args.clip,
                                 args.fuse, args.windows_per_batch[0], args.threads)))
        return 0
    for frames in args.frames:
        for per_batch in args.windows_per_batch:
            argv = [sys.executable, "-m", "headless.bench_windows", "--one", "--frames", str(frames),
                    "--size", str(args.size), "--steps", str(args.steps), "--window", str(args.window),
                    "--overlap", str(args.overlap), "--clip", args.clip, "--fuse", args.fuse,
                    "--windows-per-batch", str(per_batch), *(["--threads", str(args.threads)] if args.threads else [])]
            out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What image and camera conditioning costs: CPU time and peak memory of sampling one clip with PIA,
AnimateLCM-I2V, SparseCtrl or CameraCtrl against plain text-to-video with the motion-module layout each is built on, at the same size.

Full-size SD1.5 UNet and modules with random weights (real layouts), one fresh process per variant (the machine
has no room for several full-size models at once), a warm-up clip, then ``--rounds`` timed clips; CPU time of the
process (all threads), which a shared machine inflates less than wall time. The start image's VAE encode is a
one-time cost outside sampling and is replaced by a stand-in.

    .venv/bin/python -m headless.bench_conditioning --frames 16 --size 64 --rounds 3
    .venv/bin/python -m headless.bench_conditioning --flops     # SparseCtrl's FLOPs against txt2vid's
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys

import torch

from . import bench
from .extension import import_extension_module

# variant -> (motion-module family, the txt2vid variant it is compared with)
VARIANTS = {"plain": (None, None), "txt2vid_v2": ("AnimateDiff v2", None), "txt2vid_v3": ("AnimateDiff v3", None),
            "pia": ("PIA", "txt2vid_v3"), "animatelcm_i2v": ("AnimateLCM-I2V", "txt2vid_v2"),
            "sparsectrl_rgb": ("AnimateDiff v3", "txt2vid_v3"), "cameractrl": ("AnimateDiff v3", "txt2vid_v3")}


class StandInVAE:
    """Pixels [n, h, w, 3] -> latents [n, 4, h/8, w/8]; the real encode runs once per image, before sampling."""

    def encode(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8).repeat(1, 2, 1, 1)[:, :4]


def random_sparse_ctrl(frames: int, side: int, generator: torch.Generator):
    """A full-size rgb SparseCtrl with random weights (unit norms, 1/sqrt(fan_in) kernels) and its hint for
    keyframes at the first and last frame."""
    sparse_ctrl = import_extension_module("motion_modules.sparse_ctrl")
    control = import_extension_module("model_patcher.sparse_ctrl")
    with torch.device("meta"):
        meta = sparse_ctrl.SparseCtrlModel(sparse_ctrl.SparseCtrlConfig(kind=sparse_ctrl.RGB)).state_dict()
    sd = {k: ((torch.ones if k.endswith("weight") else torch.zeros)(v.shape) if v.dim() == 1 else
              torch.randn(v.shape, generator=generator) / math.sqrt(math.prod(v.shape[1:])))
          for k, v in meta.items() if not k.endswith("pos_encoder.pe")}
    model = control.SparseCtrlControl(sparse_ctrl.build(sd, sparse_ctrl.detect(sd, "random")),
                                      load_device=torch.device("cpu"))
    hint = control.keyframe_hint(torch.randn(2, 4, side, side, generator=generator), [0, frames - 1], frames)
    return control.apply_sparse_ctrl, model, hint


def random_camera_ctrl(frames: int, generator: torch.Generator):
    """A full-size CameraCtrl (pose encoder + a qkv_merge on every v3 down/up module) with random weights, as a
    ModelPatcher, and ``frames`` poses of a camera moving forward."""
    camera = import_extension_module("motion_modules.camera_ctrl")
    layout = import_extension_module("motion_modules").LAYOUTS["AnimateDiff v3"]
    import comfy.model_patcher
    attention = "temporal_transformer.transformer_blocks.0.attention_blocks.0"
    merges = {f"{kind}.{i}.motion_modules.{j}.{attention}": width
              for kind, blocks in (("down_blocks", layout.down), ("up_blocks", layout.up))
              for i, block in enumerate(blocks) for j, width in enumerate(block)}
    model = camera.CameraCtrl(camera.CameraCtrlConfig(merges=merges)).requires_grad_(False)
    for name, p in model.named_parameters():
        p.copy_(torch.ones_like(p) if p.dim() == 1 and name.endswith("weight") else torch.zeros_like(p)
                if p.dim() == 1 else torch.randn(p.shape, generator=generator) / math.sqrt(math.prod(p.shape[1:])))
    lines = [f"{i} 0.47 0.84 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 {-0.05 * i}" for i in range(frames)]
    poses = camera.parse_poses("url\n" + "\n".join(lines), "bench poses")
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu")), poses


def sparse_ctrl_tflop(frames: int, size: int) -> float:
    """FLOPs of one rgb SparseCtrl call on a CFG batch (2 clips), on fake tensors (shapes only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sparse_ctrl = import_extension_module("motion_modules.sparse_ctrl")
    with FakeTensorMode(), sdpa_kernel([SDPBackend.MATH]):  # math SDPA: matmuls the counter knows
        model = sparse_ctrl.SparseCtrlModel(sparse_ctrl.SparseCtrlConfig(kind=sparse_ctrl.RGB))
        side, batch = size // 8, 2 * frames
        hint = torch.randn(batch, model.config.condition_channels + 1, side, side)
        with FlopCounterMode(display=False) as counter:
            model(hint, torch.full((batch,), 500.0), torch.randn(batch, 77, 768), frames)
    return counter.get_total_flops() / 1e12


def probe(variant: str, args: argparse.Namespace) -> dict:
    """Sample ``variant`` in this process: CPU seconds per timed clip and the peak RSS while sampling."""
    bench.setup_host(args)
    import comfy.model_management

    sample = bench.Sampler(args)
    model = bench.unet_patcher(torch.float32)
    family = VARIANTS[variant][0]
    if family:
        apply = import_extension_module("model_patcher.motion_patcher").apply_motion_module
        model = apply(model, bench.motion_patcher(family, torch.float32))
    image = torch.rand(1, args.size, args.size, 3, generator=torch.Generator().manual_seed(1))
    image_to_video = import_extension_module("model_patcher.image_to_video")
    if variant == "pia":
        model = image_to_video.apply_pia(model, image, StandInVAE(), "moderate motion")
    elif variant == "animatelcm_i2v":
        model = image_to_video.apply_animatelcm_i2v(model, image, StandInVAE())
    elif variant == "sparsectrl_rgb":
        apply_sparse_ctrl, control, hint = random_sparse_ctrl(args.frames, args.size // 8, torch.Generator().manual_seed(2))
        sample.positive, sample.negative = apply_sparse_ctrl(sample.positive, sample.negative, control, hint, 1.0, 0.0, 1.0)
    elif variant == "cameractrl":
        camera, poses = random_camera_ctrl(args.frames, torch.Generator().manual_seed(3))
        model = import_extension_module("model_patcher.camera_ctrl").apply_camera_ctrl(model, camera, poses)
    comfy.model_management.load_models_gpu([model, *model.get_nested_additional_models()])
    sample(model)  # warm-up
    with open("/proc/self/clear_refs", "w") as refs:  # peak RSS from here on
        refs.write("5")
    seconds = []
    for _ in range(args.rounds):
        sample(model)
        seconds.append(sample.cpu)
    return {"variant": variant, "cpu_s": seconds, "peak_rss_mib": bench._rss_kib("VmHWM") / 1024}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flops", action="store_true", help="print SparseCtrl's FLOP ratio instead (shapes only)")
    parser.add_argument("--only", choices=list(VARIANTS), action="append",
                        help="run only this variant (repeatable; its txt2vid is run too)")
    parser.add_argument("--probe", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.comfyui, args.device, args.dtype, args.threads, args.cfg, args.sampler = None, "cpu", "fp32", 0, 7.5, "euler"
    if args.probe:
        print(json.dumps(probe(args.probe, args)))
        return
    if args.flops:
        bench.setup_host(args)
        unet = bench.unet_patcher(torch.float32).model.model_config.unet_config
        for size in bench.FLOP_SIZES:
            flops = bench.flop_ratio(unet, "AnimateDiff v3", args.frames, size)
            extra = sparse_ctrl_tflop(args.frames, size)
            print(f"{size}x{size}, {args.frames} frames, CFG: UNet {flops['plain_tflop']:.3f} TFLOP, with v3 module "
                  f"{flops['animated_tflop']:.3f}, SparseCtrl rgb +{extra:.3f}: "
                  f"{(flops['animated_tflop'] + extra) / flops['animated_tflop']:.3f}x txt2vid")
        return
    results = {}
    wanted = set(args.only or VARIANTS) | {VARIANTS[v][1] for v in args.only or ()} - {None}
    for variant in (v for v in VARIANTS if v in wanted):
        out = subprocess.run([sys.executable, "-m", "headless.bench_conditioning", "--probe", variant,
                              "--frames", str(args.frames), "--size", str(args.size), "--steps", str(args.steps),
                              "--rounds", str(args.rounds)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]), flush=True)
    print(f"\n{args.frames} frames, {args.size}x{args.size}, {args.steps} step(s), CFG {args.cfg}, fp32, CPU")
    print("| variant | CPU s per clip (median) | vs its txt2vid | peak RSS MiB | vs its txt2vid |\n|---|---|---|---|---|")
    for variant, (_, base) in ((v, VARIANTS[v]) for v in results):
        seconds, rss = statistics.median(results[variant]["cpu_s"]), results[variant]["peak_rss_mib"]
        if base:
            ratio_s = f"{seconds / statistics.median(results[base]['cpu_s']):.2f}"
            ratio_m = f"{rss / results[base]['peak_rss_mib']:.2f}"
        else:
            ratio_s = ratio_m = "-"
        print(f"| {variant} | {seconds:.1f} | {ratio_s} | {rss:.0f} | {ratio_m} |")


if __name__ == "__main__":
    main()

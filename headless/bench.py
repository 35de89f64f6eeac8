"""``python -m headless bench``: what a motion module costs inside the real host (issue 7).

Everything runs in-process on the host's own code: its SD1.5 UNet (``comfy.sd.load_state_dict_guess_config`` on
the random-weight checkpoint of :mod:`headless.demo_models`, UNet only), its ModelPatcher and KSampler, and a
full-size AnimateDiff v2 or v3 module with random non-zero weights applied with ``apply_motion_module``. It
samples the same N-frame latent batch plain (A) and animated (B), with CFG so cond and uncond both run, in
interleaved pairs A B A B ... after a warm-up, and reports the median of the per-pair ratios B/A with their
spread; pairs are run again while the spread is over ``--max-spread``. Besides: peak memory of each variant
(CPU: the resident set of a fresh process per variant while it samples; CUDA: peak allocated), one temporal
block in isolation at the C=320 64x64 and C=1280 8x8 shapes of a 512x512 clip, and the FLOP ratio counted with
``torch.utils.flop_counter`` on one UNet call (on fake tensors, so no arithmetic runs).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .demo_models import _random_like, sd15_state_dict
from .extension import ROOT, import_extension_module

FAMILIES = {"v2": "AnimateDiff v2", "v3": "AnimateDiff v3"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNET_PREFIX = "model.diffusion_model."
BLOCKS = ((320, 64), (1280, 8))  # (channels, latent side) of the outermost and innermost modules at 512x512
FLOP_SIZES = (128, 512)          # the reference FLOP ratios: 1.42 at 128x128, 1.38 at 512x512 (v2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="width = height in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps per clip (default: 25 on cuda, 1 on cpu)")
    parser.add_argument("--cfg", type=float, default=7.0, help="CFG scale, > 1 (default: %(default)s)")
    parser.add_argument("--sampler", default="euler", help="host sampler name (default: %(default)s)")
    parser.add_argument("--module", choices=sorted(FAMILIES), default="v2", help="motion module layout")
    parser.add_argument("--pairs", type=int, default=7, help="timed A/B pairs per round (default: %(default)s)")
    parser.add_argument("--max-spread", type=float, default=5.0,
                        help="run the pairs again while the IQR of the ratios is over this %% of the median")
    parser.add_argument("--rounds", type=int, default=3, help="at most this many rounds of pairs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when there is one")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="UNet and module dtype (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the temporal blocks")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--block-reps", type=int, default=5, help="timed calls per isolated block (default: 5)")
    parser.add_argument("--skip", action="append", default=[], choices=["pairs", "memory", "blocks", "flops"],
                        help="leave out a part, repeatable")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--comfyui", metavar="DIR", type=Path, help="ComfyUI folder (default: as for demo)")
    parser.add_argument("--memory-probe", choices=["plain", "animated"], help=argparse.SUPPRESS)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the host and the models

def setup_host(args: argparse.Namespace) -> None:
    """Import the host from its folder, on the device asked for (before anything imports comfy)."""
    from .server import default_comfyui_dir

    args.comfyui = Path(args.comfyui or default_comfyui_dir()).resolve()
    sys.path.insert(0, str(args.comfyui))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "fp16" if args.device == "cuda" else "fp32"
    if args.steps is None:
        args.steps = 25 if args.device == "cuda" else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from comfy.cli_args import args as host_args
    host_args.cpu = args.device == "cpu"


def unet_patcher(dtype: torch.dtype):
    import comfy.sd

    sd = {k: v for k, v in sd15_state_dict().items() if k.startswith(UNET_PREFIX)}
    return comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False,
                                                 model_options={"dtype": dtype})[0]


def motion_state_dict(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A published-layout file of ``family`` with random weights (output projections included: non-zero)."""
    mm = import_extension_module("motion_modules")
    with torch.device("meta"):
        meta = mm.published_state_dict(mm.MotionModule(mm.LAYOUTS[family]))
    generator = torch.Generator().manual_seed(seed)
    return {k: mm.sinusoidal_encoding(v.shape[1], v.shape[2]).half() if k.endswith("pos_encoder.pe")
            else _random_like(k, v, generator) for k, v in meta.items()}


def motion_patcher(family: str, dtype: torch.dtype):
    """As ``load_motion_patcher`` does with a file, in ``dtype``."""
    import comfy.model_management as mm_
    import comfy.ops
    from comfy.model_patcher import ModelPatcher

    mm = import_extension_module("motion_modules")
    sd = motion_state_dict(family)
    module = mm.build_module(sd, mm.detect(sd, f"RANDOM-WEIGHTS {family}"), ops=comfy.ops.disable_weight_init)
    return ModelPatcher(module.to(dtype), load_device=mm_.get_torch_device(), offload_device=mm_.unet_offload_device())


def compile_modules(motion) -> None:
    for layer in motion.model.in_unet_order():
        layer.compile(dynamic=False)


# ------------------------------------------------------------------------------------ timing

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Sampler:
    """One clip of ``frames`` latents sampled with the host's KSampler, timed without the model load. Returns
    the wall time; ``cpu`` is the process CPU time of the same call (all threads), which a busy machine
    inflates less than the wall time."""

    def __init__(self, args: argparse.Namespace):
        generator = torch.Generator().manual_seed(0)
        side = args.size // 8
        self.noise = torch.randn(args.frames, 4, side, side, generator=generator)
        self.positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
        self.negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
        self.args = args

    def __call__(self, patcher) -> float:
        import comfy.model_management
        import comfy.sample

        args = self.args
        # Switching between the plain model and its animated clone re-injects or ejects the modules (and on a
        # GPU may move weights): done before the clock starts, so the figure is the sampling alone.
        comfy.model_management.load_models_gpu([patcher, *patcher.get_nested_additional_models()])
        synchronize(args.device)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():  # as the host's executor runs nodes
            comfy.sample.sample(patcher, self.noise, args.steps, args.cfg, args.sampler, "normal", self.positive,
                                self.negative, torch.zeros_like(self.noise), seed=0, disable_pbar=True)
        synchronize(args.device)
        self.cpu = time.process_time() - cpu
        return time.perf_counter() - start


def spread(values: list[float]) -> dict:
    median = statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (median, 0, median)
    return {"median": median, "iqr_pct": 100 * (q3 - q1) / median,
            "range_pct": 100 * (max(values) - min(values)) / median}


def time_pairs(args, sample, plain, animated) -> dict:
    rounds = []
    for n in range(args.rounds):
        times, cpu_times, load = [], [], [os.getloadavg()[0]]
        for i in range(args.pairs):
            a, a_cpu = sample(plain), sample.cpu
            b, b_cpu = sample(animated), sample.cpu
            times.append((a, b))
            cpu_times.append((a_cpu, b_cpu))
            log(f"  round {n + 1} pair {i + 1}: plain {a:.3f} s, animated {b:.3f} s, ratio {b / a:.3f} "
                f"(CPU time ratio {b_cpu / a_cpu:.3f})")
        load.append(os.getloadavg()[0])
        ratios = [b / a for a, b in times]
        rounds.append({"times": times, "ratio": spread(ratios),
                       "plain_s": statistics.median(a for a, _ in times),
                       "animated_s": statistics.median(b for _, b in times),
                       "cpu_times": cpu_times, "cpu_ratio": spread([b / a for a, b in cpu_times]),
                       "load_average_1min": load})
        if rounds[-1]["ratio"]["iqr_pct"] <= args.max_spread:
            break
        if n + 1 < args.rounds:
            log(f"  spread {rounds[-1]['ratio']['iqr_pct']:.1f}% > {args.max_spread}%: running the pairs again")
    best = min(rounds, key=lambda r: r["ratio"]["iqr_pct"])
    return {"rounds": rounds, "reported_round": rounds.index(best) + 1, **best}


def time_blocks(args, motion, dtype) -> list[dict]:
    """One module called as the UNet calls it (through the patch), on a CFG batch (2 clips) at the 512x512
    shapes."""
    import comfy.model_management

    patch = import_extension_module("model_patcher.motion_patcher").TemporalPatch(motion.model.config, 1.0)
    options = {"cond_or_uncond": [0, 1]}
    comfy.model_management.load_models_gpu([motion])
    layers = motion.model.in_unet_order()
    device = comfy.model_management.get_torch_device()
    results = []
    for channels, side in BLOCKS:
        # The first module of that width at that depth: 320 is down block 0, 1280 at 8x8 is down block 3.
        layer = layers[0] if channels == 320 else layers[6]
        assert layer.channels == channels
        x = torch.randn(2 * args.frames, channels, side, side, device=device, dtype=dtype)
        times = []
        with torch.inference_mode():
            for i in range(args.block_reps + 1):
                synchronize(args.device)
                start = time.perf_counter()
                patch(layer, x, None, None, options)
                synchronize(args.device)
                times.append(time.perf_counter() - start)
        flops = block_flops(channels, side, args.frames)
        t = statistics.median(times[1:])
        results.append({"channels": channels, "latent": f"{side}x{side}", "batch": 2 * args.frames,
                        "ms": 1000 * t, "spread": spread(times[1:]), "gflop": flops / 1e9,
                        "tflop_per_s": flops / t / 1e12})
        log(f"  block C={channels} {side}x{side}: {1000 * t:.2f} ms ({flops / t / 1e12:.3f} TFLOP/s)")
    return results


def block_flops(channels: int, side: int, frames: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    from torch._subclasses.fake_tensor import FakeTensorMode

    mm = import_extension_module("motion_modules")
    with FakeTensorMode(), FlopCounterMode(display=False) as counter:
        layer = mm.VanillaTemporalModule(channels)
        layer(torch.randn(2 * frames, channels, side, side), frames)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------ FLOPs

def flop_ratio(unet_config: dict, family: str, frames: int, size: int) -> dict:
    """FLOPs of one CFG UNet call (2 clips) with and without the modules, on fake tensors (shapes only)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    mm = import_extension_module("motion_modules")
    patcher = import_extension_module("model_patcher.motion_patcher")
    placement = import_extension_module("model_patcher.placement")
    config = mm.LAYOUTS[family]
    counts = {}
    # The math SDPA is made of matmuls the counter knows (it has no formula for e.g. the CPU flash kernel).
    with FakeTensorMode(), sdpa_kernel([SDPBackend.MATH]):
        unet = UNetModel(**{**unet_config, "dtype": torch.float32}, operations=comfy.ops.disable_weight_init,
                         device="cpu")
        side, batch = size // 8, 2 * frames
        x, t, context = torch.randn(batch, 4, side, side), torch.full((batch,), 500.0), torch.randn(batch, 77, 768)
        for variant in ("plain", "animated"):
            options = {"cond_or_uncond": [0, 1]}
            if variant == "animated":
                module = mm.MotionModule(config, ops=comfy.ops.disable_weight_init)
                placement.inject(unet, config, module.in_unet_order(), family)
                options["patches"] = {"forward_timestep_embed_patch": [
                    (mm.VanillaTemporalModule, patcher.TemporalPatch(config, 1.0))]}
            with FlopCounterMode(display=False) as counter:
                unet(x, t, context, transformer_options=options)
            counts[variant] = counter.get_total_flops()
    return {"size": size, "plain_tflop": counts["plain"] / 1e12, "animated_tflop": counts["animated"] / 1e12,
            "ratio": counts["animated"] / counts["plain"]}


# ------------------------------------------------------------------------------------ memory

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def memory_probe(args: argparse.Namespace) -> dict:
    """In a fresh process: load one variant, then the peak resident set while it samples one clip."""
    import resource

    dtype = DTYPES[args.dtype]
    model = unet_patcher(dtype)
    if args.memory_probe == "animated":
        motion = motion_patcher(FAMILIES[args.module], dtype)
        if args.compile:
            compile_modules(motion)
        model = import_extension_module("model_patcher.motion_patcher").apply_motion_module(model, motion)
    import comfy.model_management
    comfy.model_management.load_models_gpu([model, *model.get_nested_additional_models()])
    gc.collect()
    before = _rss_kib("VmRSS")
    try:  # resets the high-water mark to the current resident set (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    Sampler(args)(model)
    peak = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.memory_probe, "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024,
            "peak_is_while_sampling": exact}


def cpu_memory(args: argparse.Namespace) -> dict:
    results = {}
    for variant in ("plain", "animated"):
        argv = [sys.executable, "-m", "headless.bench", "--memory-probe", variant, "--comfyui", str(args.comfyui),
                "--frames", str(args.frames), "--size", str(args.size), "--steps", str(args.steps),
                "--cfg", str(args.cfg), "--sampler", args.sampler, "--module", args.module,
                "--device", args.device, "--dtype", args.dtype, *(["--compile"] if args.compile else []),
                *(["--threads", str(args.threads)] if args.threads else [])]
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"memory probe {variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"  {variant}: peak RSS {results[variant]['peak_rss_mib']:.0f} MiB while sampling "
            f"({results[variant]['rss_before_mib']:.0f} MiB before)")
    return results


def cuda_memory(sample, plain, animated) -> dict:
    """Peak allocated while sampling; plain first, before the motion module was ever on the GPU."""
    results = {}
    for variant, patcher in (("plain", plain), ("animated", animated)):
        import comfy.model_management
        comfy.model_management.load_models_gpu([patcher, *patcher.get_nested_additional_models()])
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        sample(patcher)
        results[variant] = {"variant": variant, "allocated_before_mib": before / 2**20,
                            "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20}
        log(f"  {variant}: peak allocated {results[variant]['peak_allocated_mib']:.0f} MiB "
            f"({before / 2**20:.0f} MiB before)")
    return results


# ------------------------------------------------------------------------------------ the command

def machine() -> str:
    import platform

    text = f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def run(args: argparse.Namespace) -> int:
    setup_host(args)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)), flush=True)
        return 0
    if args.cfg <= 1:
        log("error: --cfg must be > 1 so that cond and uncond both run")
        return 2
    family, dtype = FAMILIES[args.module], DTYPES[args.dtype]
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "settings": {k: v for k, v in vars(args).items() if k not in ("func", "json", "memory_probe")},
               "module": family}
    results["settings"]["comfyui"] = str(args.comfyui)
    log(f"{results['machine']}; {family}, {args.frames} frames {args.size}x{args.size}, {args.steps} steps, "
        f"CFG {args.cfg}, {args.device} {args.dtype}{', compiled' if args.compile else ''}")

    if "memory" not in args.skip and args.device == "cpu":  # first: the probes' processes need the memory
        log("peak memory (a fresh process per variant)")
        results["memory"] = cpu_memory(args)

    log("building the models (random weights)")
    began = time.perf_counter()
    plain = unet_patcher(dtype)
    motion = motion_patcher(family, dtype)
    if args.compile:
        compile_modules(motion)
    animated = import_extension_module("model_patcher.motion_patcher").apply_motion_module(plain, motion)
    log(f"  built in {time.perf_counter() - began:.1f} s")
    sample = Sampler(args)

    if "flops" not in args.skip:
        sizes = sorted({args.size, *FLOP_SIZES})
        results["flops"] = [flop_ratio(plain.model.model_config.unet_config, family, args.frames, size) for size in sizes]
        for f in results["flops"]:
            log(f"FLOP ratio at {f['size']}x{f['size']}: {f['ratio']:.3f} "
                f"({f['animated_tflop']:.2f} / {f['plain_tflop']:.2f} TFLOP per CFG UNet call)")

    if "memory" not in args.skip and args.device == "cuda":
        log("peak memory")
        results["memory"] = cuda_memory(sample, plain, animated)

    if "pairs" not in args.skip:
        log("warm-up")
        results["warmup_s"] = {"plain": sample(plain), "animated": sample(animated)}
        log("pairs (plain, animated)")
        pairs = results["pairs"] = time_pairs(args, sample, plain, animated)
        for variant in ("plain", "animated"):
            pairs[f"{variant}_it_per_s"] = args.steps / pairs[f"{variant}_s"]

    if "blocks" not in args.skip:
        log("isolated blocks")
        results["blocks"] = time_blocks(args, motion, dtype)

    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict) -> None:
    s = r["settings"]
    print(f"machine: {r['machine']}")
    print(f"{r['module']}, {s['frames']} frames, {s['size']}x{s['size']}, {s['steps']} steps, {s['sampler']}, "
          f"CFG {s['cfg']}, {s['device']} {s['dtype']}{', compiled temporal blocks' if s['compile'] else ''}")
    flops = {f["size"]: f for f in r.get("flops", [])}
    for f in flops.values():
        print(f"FLOP ratio {f['size']}x{f['size']}: {f['ratio']:.3f}  "
              f"({f['animated_tflop']:.3f} / {f['plain_tflop']:.3f} TFLOP per CFG UNet call)")
    if "pairs" in r:
        p = r["pairs"]
        q = p["ratio"]
        print(f"time ratio animated/plain: median {q['median']:.3f}, IQR {q['iqr_pct']:.1f}%, "
              f"max-min {q['range_pct']:.1f}% of median ({len(p['times'])} pairs, round {p['reported_round']} "
              f"of {len(p['rounds'])})")
        print(f"seconds per clip: plain {p['plain_s']:.3f}, animated {p['animated_s']:.3f}; it/s: plain "
              f"{p['plain_it_per_s']:.3f}, animated {p['animated_it_per_s']:.3f}")
        c = p["cpu_ratio"]
        if s["device"] == "cpu":
            print(f"process CPU time ratio: median {c['median']:.3f}, IQR {c['iqr_pct']:.1f}%; 1-min load average "
                  f"{p['load_average_1min'][0]:.2f} -> {p['load_average_1min'][1]:.2f} on {os.cpu_count()} CPUs")
        if s["size"] in flops:
            bound = 1.05 * flops[s["size"]]["ratio"]
            print(f"time ratio / FLOP ratio: {q['median'] / flops[s['size']]['ratio']:.3f} "
                  f"(bound 1.05: time ratio <= {bound:.3f}: {'met' if q['median'] <= bound else 'NOT met'})")
    for variant, m in r.get("memory", {}).items():
        if "peak_rss_mib" in m:
            print(f"peak RSS {variant}: {m['peak_rss_mib']:.0f} MiB while sampling ({m['rss_before_mib']:.0f} MiB "
                  f"resident before; fresh process)")
        else:
            print(f"peak allocated {variant}: {m['peak_allocated_mib']:.0f} MiB ({m['allocated_before_mib']:.0f} "
                  f"MiB before sampling)")
    for b in r.get("blocks", []):
        print(f"one temporal block, C={b['channels']} {b['latent']} x{b['batch']}: {b['ms']:.2f} ms "
              f"(IQR {b['spread']['iqr_pct']:.1f}%), {b['gflop']:.1f} GFLOP, {b['tflop_per_s']:.3f} TFLOP/s")


def main(argv: list[str] | None = None) -> int:
    """``python -m headless.bench``: the same command without the other subcommands' imports."""
    parser = argparse.ArgumentParser(prog="python -m headless.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m headless train``: train a motion module (or motion LoRA) from a folder of videos, in this process,
with a checkpoint loaded through the host (``comfy.sd.load_checkpoint_guess_config``).

``torchrun --nproc_per_node N -m headless train ...`` (from the repository root) runs it on N processes with
torch.distributed: gloo on CPU, NCCL on CUDA (one GPU per process), each process on its own shard of the
clips; process 0 writes the files.

Nothing here imports torch or the host until the command runs, so ``python -m headless --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a motion module or motion LoRA on a folder of videos (image model frozen)",
        description="Train an AnimateDiff motion module (or, with --lora-rank, a motion LoRA on an existing one) "
                    "inside the frozen UNet of --checkpoint, on clips of the videos in --data. Saves .safetensors "
                    "in the published AnimateDiff layout. Run under torchrun for several processes.",
        epilog="data: a folder of videos (.mp4 .webm .mkv .mov .avi .m4v .gif .webp, searched recursively) with "
               "captions in a CSV (WebVid's videoid,name columns or file/caption) and/or a .txt beside each video. "
               "exit codes: 0 done, 1 failed, 2 bad usage (an option, or a file or folder it names that cannot be "
               "used: missing, of the wrong kind, damaged), 130 interrupted (the state is saved; --resume latest).")
    data = parser.add_argument_group("data")
    data.add_argument("--checkpoint", required=True, type=Path, metavar="FILE",
                      help="the image model: an SD1.5 (or SDXL) checkpoint with UNet, CLIP and VAE")
    data.add_argument("--data", required=True, type=Path, metavar="DIR", help="folder of videos")
    data.add_argument("--captions", type=Path, metavar="CSV",
                      help="captions CSV (default: the folder's only .csv, if any; .txt files beside videos win)")
    data.add_argument("--id-column", help="CSV column naming the video (default: videoid, video_id, video, file, ...)")
    data.add_argument("--caption-column", help="CSV column with the caption (default: name, caption, text, prompt)")
    data.add_argument("--frames", type=int, default=16, help="frames per clip (default: %(default)s)")
    data.add_argument("--stride", type=int, default=4, help="source frames between clip frames (default: %(default)s)")
    data.add_argument("--size", default="256", metavar="S|WxH", type=_size,
                      help="training size in pixels: resize to cover, center crop (default: %(default)s)")
    data.add_argument("--caption-dropout", type=float, default=0.1, help="empty-caption probability (default: %(default)s)")
    data.add_argument("--first-frames", action="store_true", help="clips start at frame 0 instead of a random frame")
    data.add_argument("--hflip", action="store_true",
                      help="random horizontal flips (the original did this; it reverses horizontal motion)")
    data.add_argument("--latent-cache", type=Path, metavar="DIR",
                      help="keep VAE latents of frames here so later epochs skip the VAE (default: no cache)")

    model = parser.add_argument_group("what to train")
    model.add_argument("--init", type=Path, metavar="FILE",
                       help="continue from this motion module (default: a new one, output projections zero)")
    model.add_argument("--layout", choices=("v3", "v2"), default="v3",
                       help="a new module's layout: v3 (no mid-block module) or v2 (with one) (default: %(default)s)")
    model.add_argument("--lora-rank", type=int, default=0,
                       help="train a motion LoRA of this rank on --init instead of the module (MotionDirector: 32)")
    model.add_argument("--lora-scale", type=float, default=1.0, help="LoRA output scale while training (default: 1)")
    model.add_argument("--lora-init", type=Path, metavar="FILE", help="continue training this motion LoRA")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: %(default)s)")
    optim.add_argument("--batch-size", type=int, default=1, help="clips per step and process (default: %(default)s)")
    optim.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=1e-2, help="(default: %(default)s)")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default: %(default)s)")
    optim.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    optim.add_argument("--warmup-steps", type=int, default=0)
    optim.add_argument("--noise-schedule", choices=("sqrt_linear", "linear", "model"), default="sqrt_linear",
                       help="sqrt_linear: AnimateDiff's betas 0.00085->0.012; linear: SD's scaled-linear; model: "
                            "the checkpoint's own (default: %(default)s)")
    optim.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="autocast; auto = bf16 (else fp16) on CUDA, fp32 on CPU")
    optim.add_argument("--gradient-checkpointing", choices=("off", "motion", "full"), default="off",
                       help="recompute temporal modules (motion) or also the frozen UNet layers (full) in the "
                            "backward pass: less memory, more time")
    optim.add_argument("--seed", type=int, default=42)

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="FILE",
                     help="the .safetensors to write (default: <ComfyUI>/models/animatediff_models/<data>.safetensors, "
                          "or models/animatediff_motion_lora for a LoRA; never overwrites a default name)")
    out.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    out.add_argument("--state-dir", type=Path, metavar="DIR",
                     help="resumable training states (default: output/training/<out name>)")
    out.add_argument("--save-every", type=int, default=500, help="write a state every K steps (default: %(default)s)")
    out.add_argument("--resume", metavar="FILE|latest", help="continue from a training state ('latest' in --state-dir)")
    out.add_argument("--log-every", type=int, default=10, help="print the loss every N steps (default: %(default)s)")

    host = parser.add_argument_group("host")
    host.add_argument("--comfyui", type=Path, metavar="DIR",
                      help="ComfyUI folder (default: $COMFYUI_DIR, else <repo>/.host/ComfyUI)")
    host.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    parser.set_defaults(func=run)
    return parser


def _size(text: str) -> tuple[int, int]:
    """argparse type of --size: S or WxH pixels."""
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not S or WxH in pixels, e.g. 256 or 512x320") from None


def _unusable_path(args: argparse.Namespace) -> str | None:
    """The first file or folder of the command line that cannot be used, as an error message naming it and the
    fix; checked before torch and the host are imported."""
    resume = args.resume if args.resume not in (None, "latest") else None
    for flag, path, folder in (("--checkpoint", args.checkpoint, False), ("--data", args.data, True),
                               ("--captions", args.captions, False), ("--init", args.init, False),
                               ("--lora-init", args.lora_init, False), ("--resume", resume, False)):
        if path is None:
            continue
        path = Path(path)
        if not path.exists():
            return f"{flag} {path} does not exist: check the path."
        if folder and not path.is_dir():
            return f"{flag} {path} is a file: give the folder that holds the training videos."
        if not folder and path.is_dir():
            return f"{flag} {path} is a folder: give the file itself."
    return None


def init_distributed(cpu: bool = False) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment: NCCL with one GPU per process (LOCAL_RANK)
    when CUDA is used, else gloo. (rank, world size); (0, 1) outside torchrun. Call before the host picks a
    device, so that its device is this process's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _free_name(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.safetensors", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.safetensors"
    return path


class _Printer:
    """Loss lines on stderr every ``every`` steps (process 0), and a stop request on SIGINT/SIGTERM."""

    def __init__(self, every: int, quiet: bool):
        self.every, self.quiet = max(1, every), quiet
        self.began = time.monotonic()
        self.first_step: int | None = None
        self.stop = False

    def install(self) -> dict:
        """Catch SIGINT/SIGTERM; returns the handlers they replace, for :meth:`restore`."""
        def handler(signum, frame):
            if self.stop:  # a second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self.stop = True
            print("stopping after this step (the training state is saved; press again to abort)", file=sys.stderr)
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    @staticmethod
    def restore(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def __call__(self, step: int, total: int, loss: float, losses: list) -> bool:
        if self.first_step is None:
            self.first_step, self.began = step, time.monotonic()
        if not self.quiet and (step % self.every == 0 or step == total or self.stop):
            window = losses[-self.every:]
            rate = (time.monotonic() - self.began) / max(1, step - self.first_step) if step > self.first_step else 0.0
            eta = rate * (total - step)
            print(f"step {step}/{total}  loss {loss:.4f}  mean {sum(window) / len(window):.4f}  "
                  f"{rate:.2f} s/step  eta {int(eta // 60)}m{int(eta % 60):02d}s", file=sys.stderr, flush=True)
        return self.stop


def run(args: argparse.Namespace) -> int:
    comfyui = Path(args.comfyui or os.environ.get("COMFYUI_DIR") or ROOT / ".host" / "ComfyUI").resolve()
    if not (comfyui / "comfy").is_dir():
        print(f"error: no ComfyUI at {comfyui}; pass --comfyui or set COMFYUI_DIR", file=sys.stderr)
        return EXIT_USAGE
    unusable = _unusable_path(args)
    if unusable:
        print(f"error: {unusable}", file=sys.stderr)
        return EXIT_USAGE
    if args.lora_rank and not args.init:
        print("error: --lora-rank trains a LoRA on an existing motion module: give it with --init", file=sys.stderr)
        return EXIT_USAGE

    import torch
    rank, world = init_distributed(args.cpu)
    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args as host_args
    host_args.cpu = args.cpu or not torch.cuda.is_available()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")

    import comfy.sd
    from ..motion_modules.formats import MotionModuleError
    from . import loop
    from .dataset import ClipSpec, DatasetError, VideoDataset

    lora = args.lora_rank > 0
    out = args.out or _free_name(comfyui / "models" / ("animatediff_motion_lora" if lora else "animatediff_models"),
                                 args.data.resolve().name + ("_motion_lora" if lora else "_motion"))
    state_dir = args.state_dir or Path("output") / "training" / Path(out).stem
    printer = _Printer(args.log_every, quiet=rank != 0)
    previous_handlers = printer.install()
    try:
        width, height = args.size
        spec = ClipSpec(args.frames, args.stride, width, height, random_start=not args.first_frames,
                        hflip=args.hflip, caption_dropout=args.caption_dropout)
        dataset = VideoDataset(args.data, spec, args.captions, args.id_column, args.caption_column, args.latent_cache)
        options = loop.TrainingOptions(
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
            grad_clip=args.grad_clip, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
            noise_schedule=args.noise_schedule, precision=args.precision,
            gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, save_every=args.save_every,
            state_dir=str(state_dir))
        resume = args.resume
        if resume == "latest":
            resume = loop.latest_state(state_dir)
            if resume is None:
                print(f"no training state in {state_dir}: starting from step 0", file=sys.stderr)
        try:
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True,
                                                                     output_clip=True)[:3]
        except Exception as e:  # damaged (safetensors, pickle), another kind of file, a model the host does not know
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"error: --checkpoint {args.checkpoint} cannot be loaded as a checkpoint ({reason}): give an SD1.5 "
                  "or SDXL checkpoint that ComfyUI's Load Checkpoint reads (download it again if it is damaged).",
                  file=sys.stderr)
            return EXIT_USAGE
        result, path = loop.train_motion(model, clip, vae, dataset, options, out, init=args.init, style=args.layout,
                                         lora_rank=args.lora_rank, lora_scale=args.lora_scale, progress=printer,
                                         resume=resume, save_dtype=args.save_dtype, lora_init=args.lora_init)
    except MotionModuleError as e:  # --init or --lora-init is not a readable motion module / LoRA
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DatasetError, loop.TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        printer.restore(previous_handlers)
        _leave_process_group()
    if rank == 0:
        memory = f"{result.peak_memory / 2 ** 20:.0f} MiB peak"
        print(f"{result.steps} steps, {result.seconds_per_step:.2f} s/step, {memory}, "
              f"{world} process(es)", file=sys.stderr)
        if result.stopped:
            print(f"stopped at step {result.steps}: resume with --resume latest --state-dir {state_dir}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(path, flush=True)
    return EXIT_INTERRUPTED if result.stopped else EXIT_OK


def _leave_process_group() -> None:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass

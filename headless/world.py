"""``python -m headless world``: the small world of issue 15, in this process on the host's own code.

Trains the world's text-to-image base, its personalized fine-tune, a motion module, a camera-move motion
LoRA and an rgb SparseCtrl (world/study.py), then samples and measures the paper's table and the quality-feature
rows, and writes ``study.md``, ``study.json`` and GIFs into ``--out``. About 85 minutes on 2 CPU cores before the
SparseCtrl stage (400 steps, 1.2 s each); ``--mini`` runs a few steps of everything (minutes) to check the
pipeline, not the figures. Models are cached in ``<out>/models``, so a stopped run picks up where it was.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .extension import ROOT, import_extension_module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", type=Path,
                        help="where models, tables and GIFs go (default: output/world, with --mini output/world-mini, "
                             "so a miniature run never replaces the full run's models)")
    parser.add_argument("--mini", action="store_true", help="a few steps of everything: checks the pipeline")
    parser.add_argument("--comfyui", metavar="DIR", type=Path, help="ComfyUI folder (default: as for demo)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")


def run(args: argparse.Namespace) -> int:
    from .server import default_comfyui_dir

    sys.path.insert(0, str(Path(args.comfyui or default_comfyui_dir()).resolve()))
    import torch
    from comfy.cli_args import args as host_args
    host_args.cpu = not torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    study = import_extension_module("world.study")
    bars = {}

    def bar(name: str):
        def update(step: int, total: int, loss: float) -> None:
            if name not in bars:
                bars[name] = tqdm(total=total, desc=name, file=sys.stderr, dynamic_ncols=True)
            shown = bars[name]
            shown.update(step - shown.n)
            if loss:
                shown.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if step >= total:
                shown.close()
        return update

    args.out = args.out or ROOT / "output" / ("world-mini" if args.mini else "world")
    began = time.perf_counter()
    study.run(args.out, study.MINI if args.mini else study.FULL, log=lambda text: tqdm.write(text, file=sys.stderr),
              bar=bar)
    print((args.out / "study.md").read_text())
    print(f"{args.out}: study.md, study.json, gifs/ ({(time.perf_counter() - began) / 60:.1f} min)")
    return 0

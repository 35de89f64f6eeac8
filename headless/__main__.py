"""Command line: ``python -m headless COMMAND ...`` (see ``--help``).

Each subcommand is one function decorated with :func:`command`, which receives the subparsers object,
adds its parser and sets ``func`` to the function that runs it (returning the exit code).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from .client import DEFAULT_TIMEOUT, run_workflow
from .convert import load_workflow, parse_workflow
from .errors import HeadlessError, ServerError, WorkflowError
from .overrides import parse_override
from .server import DEFAULT_STARTUP_TIMEOUT, ServerProcess, default_comfyui_dir

EXIT_OK, EXIT_WORKFLOW, EXIT_USAGE, EXIT_SERVER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(add: Callable[[argparse._SubParsersAction], None]) -> Callable:
    """Register a function that adds one subcommand's parser."""
    COMMANDS.append(add)
    return add


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def exit_code(ex: HeadlessError) -> int:
    """2 when the command line or a file it names cannot be used, 3 when the server failed or cannot be
    reached, else 1 (the workflow failed)."""
    if ex.usage:
        return EXIT_USAGE
    if isinstance(ex, ServerError) or getattr(ex, "kind", None) == "connection":
        return EXIT_SERVER
    return EXIT_WORKFLOW


def seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


# ------------------------------------------------------------------------------------ shared server options

def add_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--server", metavar="URL",
                       help="use a running ComfyUI at URL (e.g. http://127.0.0.1:8188) instead of starting one")
    group.add_argument("--comfyui", metavar="DIR", type=Path,
                       help="ComfyUI folder to start (default: $COMFYUI_DIR, else <repo>/.host/ComfyUI)")
    group.add_argument("--host-arg", metavar="ARG", action="append", default=[], dest="host_args",
                       help="extra argument for ComfyUI's main.py, repeatable; write it with '=', e.g. "
                            "--host-arg=--output-directory=/tmp/out")
    group.add_argument("--startup-timeout", metavar="SECONDS", type=seconds, default=DEFAULT_STARTUP_TIMEOUT,
                       help="how long to wait for the started server to answer (default: %(default)g)")
    group.add_argument("--server-log", metavar="FILE", type=Path,
                       help="write the started server's log here (default: a temporary file, kept on failure)")


@contextlib.contextmanager
def server_from_args(args: argparse.Namespace, quiet: bool = False) -> Iterator[tuple[str, ServerProcess | None]]:
    """Yields (base URL, the started ServerProcess or None for --server); stops the server on exit."""
    if args.server:
        yield args.server.rstrip("/"), None
        return
    server = ServerProcess(args.comfyui or default_comfyui_dir(), host_args=args.host_args, log_path=args.server_log)
    if not quiet:
        err(f"starting ComfyUI from {server.comfyui_dir} on {server.url} (log: {server.log_path})")
    ok = False
    try:
        server.start(args.startup_timeout)
        if not quiet:
            err(f"server ready in {server.startup_seconds:.1f} s")
        yield server.url, server
        ok = True
    except KeyboardInterrupt:
        ok = True  # asked to stop: nothing to diagnose in the log
        raise
    finally:
        server.stop()
        if ok:
            server.cleanup_log()
        elif server.log_path.exists():
            err(f"server log kept at {server.log_path}")


def _raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------------ run

@command
def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run a workflow on ComfyUI and download its outputs",
        description="Run a workflow (API or UI format JSON) on a ComfyUI server started for the purpose (or on "
                    "--server), show its progress on stderr, download every output file into --out and print "
                    "the saved paths on stdout, one per line.",
        epilog="exit codes: 0 done, 1 the workflow failed (conversion, validation, execution, timeout), "
               "2 bad usage (an option, --set, or a workflow file that cannot be read as a workflow), "
               "3 the server failed or cannot be reached, 130 interrupted")
    parser.add_argument("workflow", type=Path, help="workflow JSON file, API or UI format ('-' reads stdin)")
    parser.add_argument("--set", metavar="NODE.INPUT=VALUE", action="append", default=[], dest="overrides",
                        help="override an input, repeatable; NODE is a node id, title or class type (when unique); "
                             "VALUE is read as JSON when it parses, else as a string")
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("output"),
                        help="where to save the outputs, the server's subfolders kept (default: %(default)s)")
    parser.add_argument("--timeout", metavar="SECONDS", type=seconds, default=DEFAULT_TIMEOUT,
                        help="give up (and cancel the prompt) when it has not finished after this long, time in "
                             "the server's queue included (default: %(default)g)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="on an execution error, also show the node's inputs and the server's traceback")
    add_server_options(parser)
    parser.set_defaults(func=cmd_run)


def _load(path: Path) -> dict:
    if str(path) == "-":
        return parse_workflow(sys.stdin.buffer.read(), "stdin")
    return load_workflow(path)


def cmd_run(args: argparse.Namespace) -> int:
    _raise_on_sigterm()
    server = None
    try:
        workflow = _load(args.workflow)
        for text in args.overrides:  # syntax errors before the slow start
            parse_override(text)
        if args.out.exists() and not args.out.is_dir():
            raise WorkflowError(f"--out {args.out} is a file: give a folder for the outputs.", kind="input")
        with server_from_args(args, quiet=args.quiet) as (url, server):
            began = time.monotonic()
            paths = run_workflow(url, workflow, args.overrides, args.out, args.timeout, progress=not args.quiet,
                                 verbose=args.verbose)
            if not args.quiet:
                err(f"done in {time.monotonic() - began:.1f} s, {len(paths)} file(s) saved under {args.out}")
        for path in paths:
            print(path, flush=True)
        return EXIT_OK
    except HeadlessError as ex:
        err(f"error: {ex}")
        if getattr(ex, "kind", None) == "connection" and server is not None and not server.alive():
            err(f"the server exited (code {server.proc.returncode}); last lines of its log:\n{server.log_tail()}")
        return exit_code(ex)
    except KeyboardInterrupt:
        err("interrupted")
        return EXIT_INTERRUPTED


# ------------------------------------------------------------------------------------ demo: the main job

DEMO_WORKFLOW = Path(__file__).resolve().parents[1] / "api_workflows" / "txt2vid_api.json"
CPU_SIZE = ["Frames.width=64", "Frames.height=64", "Frames.batch_size=8", "KSampler.steps=4"]


@command
def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="render the text-to-video workflow with the models this ComfyUI has (or random stand-ins)",
        description="Run api_workflows/txt2vid_api.json on the embedded (or --comfyui) ComfyUI. Uses the first "
                    "checkpoint and motion module in its models folders; when there are none, creates clearly "
                    "labelled random-weight files with the real SD1.5 and AnimateDiff v2 layouts, once.")
    parser.add_argument("--out", metavar="DIR", type=Path, default=Path("output"), help="default: %(default)s")
    parser.add_argument("--full", action="store_true",
                        help="the workflow's own size (16 frames, 512x512, 20 steps) even without a GPU")
    parser.add_argument("--set", metavar="NODE.INPUT=VALUE", action="append", default=[], dest="overrides",
                        help="override an input, as for run")
    add_server_options(parser)
    parser.set_defaults(func=cmd_demo, workflow=DEMO_WORKFLOW, timeout=DEFAULT_TIMEOUT, quiet=False, verbose=False)


def cmd_demo(args: argparse.Namespace) -> int:
    comfyui = Path(args.comfyui or default_comfyui_dir())
    sys.path.insert(0, str(comfyui))  # the random checkpoint is built from the host's own model classes
    from comfy.cli_args import args as host_args
    from .server import cuda_available
    host_args.cpu = not cuda_available()
    from .demo_models import pick_models

    models, random = pick_models(comfyui / "models")
    if random:
        err(f"no real models in {comfyui / 'models'}: using RANDOM-WEIGHT stand-ins with the real layouts "
            f"({models['checkpoint']}, {models['motion_module']}). The clip will be noise.")
    else:
        err(f"using {models['checkpoint']} and {models['motion_module']}")
    small = [] if args.full or cuda_available() else CPU_SIZE
    if small:
        err("no GPU: rendering 8 frames at 64x64 in 4 steps (--full for the workflow's own size)")
    args.overrides = [f"1.ckpt_name={models['checkpoint']}", f"2.model_name={models['motion_module']}",
                      *small, *args.overrides]
    return cmd_run(args)


# ------------------------------------------------------------------------------------ bench (issue 7)

@command
def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    from . import bench

    parser = subparsers.add_parser(
        "bench", help="time sampling with and without a motion module inside the host (random weights)",
        description="Sample the same N-frame latent batch with the host's SD1.5 UNet plain and with a full-size "
                    "motion module (random weights), in interleaved pairs, in-process; report the time ratio, "
                    "the FLOP ratio, peak memory and the time of single temporal blocks.")
    bench.add_arguments(parser)
    parser.set_defaults(func=lambda args: bench.run(args))


# ------------------------------------------------------------------------------------ train (issue 5)

@command
def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    """``train``: train a motion module / motion LoRA in this process; options and run live in training/cli.py."""
    from .extension import import_extension_module
    import_extension_module("training.cli").add_parser(subparsers)


# ------------------------------------------------------------------------------------ world (issue 15)

@command
def add_world_command(subparsers: argparse._SubParsersAction) -> None:
    from . import world

    parser = subparsers.add_parser(
        "world", help="train the small world's models and measure AnimateDiff's claim and features there",
        description=world.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    world.add_arguments(parser)
    parser.set_defaults(func=world.run)


# ------------------------------------------------------------------------------------ ui: API -> UI format

@command
def add_ui_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ui", help="write the UI-format twin of an API-format workflow, and its thumbnail (for example_workflows/)",
        description="Convert an API-format workflow into the UI format the editor loads, using the server's "
                    "/object_info for widget order and output types; the result converts back to the same API "
                    "workflow.")
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON")
    parser.add_argument("--out", metavar="FILE", type=Path, help="default: the input name without _api (in "
                        "example_workflows/ for a file of api_workflows/); the thumbnail goes beside it as .jpg")
    add_server_options(parser)
    parser.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    import urllib.request
    from .to_ui import ui_twin_path, write_ui_twin

    api = load_workflow(args.workflow)
    out = args.out or ui_twin_path(args.workflow)
    if out == args.workflow:
        err("error: give --out (the input has no _api suffix to drop)")
        return EXIT_USAGE
    with server_from_args(args) as (url, _server):
        with urllib.request.urlopen(url + "/object_info", timeout=120) as response:
            object_info = json.load(response)
    for path in write_ui_twin(api, object_info, out):
        print(path)
    return EXIT_OK


# ------------------------------------------------------------------------------------ entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m headless",
                                     description="Run ComfyUI workflows from the command line, without a browser.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HeadlessError as ex:  # the commands that do not render their own
        err(f"error: {ex}")
        return exit_code(ex)


if __name__ == "__main__":
    sys.exit(main())

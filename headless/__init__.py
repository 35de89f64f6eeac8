"""Headless runner: run ComfyUI workflows from the command line or from tests.

``python -m headless run WORKFLOW.json [--set NODE.INPUT=VALUE] [--out DIR]`` (see ``--help``).

Library use::

    from headless import start_server, run_workflow, WorkflowError
    with start_server(comfyui_dir, host_args=["--output-directory=/tmp/out"]) as url:
        paths = run_workflow(url, workflow, ["3.seed=1"], out_dir="out", timeout=600)

This package is a tool beside the extension: ComfyUI never imports it.
"""
from .client import output_files, prepare_prompt, run_workflow, run_workflow_async
from .convert import is_api_workflow, is_ui_workflow, load_workflow, ui_to_api
from .errors import HeadlessError, ServerError, WorkflowError, render_execution_error, render_prompt_error
from .overrides import apply_overrides, parse_override
from .server import ServerProcess, default_comfyui_dir, start_server

__all__ = [
    "start_server", "run_workflow", "run_workflow_async", "prepare_prompt", "WorkflowError", "ServerError",
    "HeadlessError", "ServerProcess", "default_comfyui_dir", "load_workflow", "ui_to_api", "is_ui_workflow",
    "is_api_workflow", "apply_overrides", "parse_override", "output_files", "render_prompt_error",
    "render_execution_error",
]

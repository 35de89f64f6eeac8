"""The training nodes and the command line end to end on the tiny host model: videos on disk -> Video Dataset ->
Train Motion Module -> a file in the motion-module folder that Load Motion Module reads; progress, previews,
cancel and resume; the latent cache; ``python -m headless train``. CLIP and VAE are small stand-ins with the
host's interfaces (the real ones are hundreds of MB)."""
import hashlib

import numpy as np
import pytest
import torch

import comfy.model_management
import comfy.utils
import folder_paths

from adm.headless.__main__ import main as headless_main
from adm.model_patcher import folders
from adm.motion_modules import load_motion_module
from adm.nodes.training import TrainMotionModule, VideoDataset
from adm.video import write_video
from unets import tiny_sd15_patcher

pytestmark = pytest.mark.training


class StandInVAE:
    """VAE.encode's contract: IMAGE [B, H, W, 3] in 0..1 -> latents [B, 4, H/8, W/8]."""

    def __init__(self):
        self.first_stage_model = torch.nn.Conv2d(3, 4, 8, stride=8)
        torch.nn.init.normal_(self.first_stage_model.weight, std=0.05)
        self.calls = 0

    def encode(self, pixels):
        self.calls += 1
        with torch.no_grad():
            return self.first_stage_model(pixels.movedim(-1, 1) * 2 - 1)


class StandInCLIP:
    """CLIP's contract: tokenize(text) and encode_from_tokens(tokens, return_pooled=True) -> ([1, 77, 32], [1, 32])."""

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        seed = int(hashlib.sha1(tokens.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1, 77, 32, generator=g), torch.randn(1, 32, generator=g)


def square_video(shift: int, frames: int = 12) -> np.ndarray:
    """A white square on grey moving right by ``shift`` pixels per frame, 64x64."""
    out = np.full((frames, 64, 64, 3), 96, dtype=np.uint8)
    for i in range(frames):
        x = (8 + shift * i) % 48
        out[i, 24:40, x:x + 16] = 255
    return out


@pytest.fixture
def host_folders(tmp_path, monkeypatch):
    """Models and output in a temporary folder, not in the host's own."""
    for key in (folders.MOTION_MODULES, folders.MOTION_LORAS):
        (tmp_path / key).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, key, ([str(tmp_path / key)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    videos = tmp_path / "input" / "squares"
    for n, shift in enumerate((2, 3, 4)):
        write_video(square_video(shift), videos / f"clip{n}.mp4", "mp4", fps=8)
        (videos / f"clip{n}.txt").write_text(f"a square moving right, {shift} px per frame")
    (videos / "truncated.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom")
    return tmp_path


@pytest.fixture
def progress_events():
    events = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total, preview)))
    yield events
    comfy.utils.set_progress_bar_global_hook(None)


def dataset(**kw):
    args = dict(folder="squares", frames=4, stride=2, width=64, height=64, caption_dropout=0.1)
    return VideoDataset().load(**{**args, **kw})


def train(data, steps=3, **kw):
    args = dict(model=tiny_sd15_patcher(), clip=StandInCLIP(), vae=StandInVAE(), dataset=data,
                init_motion_module="(new)", new_module_layout="v3 (no mid block)", lora_rank=0, steps=steps,
                learning_rate=1e-3, batch_size=2, seed=1, save_name="squares")
    return TrainMotionModule().train(**{**args, **kw})


def test_the_nodes_train_and_save_a_module_load_motion_module_reads(host_folders, progress_events):
    data, report = dataset()
    assert "3 videos" in report and "truncated.mp4" in report
    vae = StandInVAE()
    out = train(data, vae=vae)
    name, curve, summary = out["result"]
    assert name == "squares.safetensors" and name in folders.names(folders.MOTION_MODULES)
    module = load_motion_module(folders.full_path(folders.MOTION_MODULES, name))
    assert module.config.family == "AnimateDiff v3"
    assert curve.shape == (1, 256, 512, 3) and 0 <= curve.min() and curve.max() <= 1
    assert "3 steps" in summary and out["ui"]["text"] == [summary]
    assert [e[0] for e in progress_events] == [1, 2, 3] and progress_events[-1][2][0] == "PNG"
    # A second run with the same name never overwrites the first; the latent cache spares the VAE (the same
    # seed draws the same clips); another VAE gets entries of its own.
    encoded = vae.calls
    name2 = train(data, vae=vae)["result"][0]
    assert name2 == "squares_2.safetensors" and vae.calls == encoded == 6
    cache = host_folders / "output" / "animatediff_training" / "latent_cache"
    frames = len(list(cache.rglob("*.safetensors")))
    other = StandInVAE()
    train(data, vae=other, steps=1)
    assert other.calls == 2 and len(list(cache.rglob("*.safetensors"))) > frames


def test_a_cancelled_run_saves_its_state_and_resume_finishes_it(host_folders):
    data, _ = dataset(cache_latents=False)

    def cancel_at_two(value, total, preview, node_id=None):
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(cancel_at_two)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(data, steps=4)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    states = host_folders / "output" / "animatediff_training" / "squares"
    # The host stops the third step inside its forward pass: the state holds the two completed steps.
    assert [p.name for p in states.glob("step-*.pt")] == ["step-0000002.pt"]
    assert not folders.names(folders.MOTION_MODULES)
    name, _, summary = train(data, steps=4, resume=True)["result"]
    assert name == "squares.safetensors" and "4 steps" in summary
    # Starting over (resume off) replaces the earlier states.
    train(data, steps=1, save_name="squares")
    assert [p.name for p in states.glob("step-*.pt")] == ["step-0000001.pt"]


def test_a_motion_lora_is_saved_in_the_motion_lora_folder(host_folders):
    data, _ = dataset()
    base = train(data, steps=1, save_name="base")["result"][0]
    name = train(data, steps=1, init_motion_module=base, lora_rank=4, save_name="lora")["result"][0]
    assert name in folders.names(folders.MOTION_LORAS) and name not in folders.names(folders.MOTION_MODULES)


def test_the_command_line_trains_with_a_checkpoint_loaded_in_process(host_folders, monkeypatch, capsys):
    """``python -m headless train`` with comfy.sd.load_checkpoint_guess_config answering the tiny model and the
    stand-ins (a real SD1.5 checkpoint is 2 GB): options, saving, the printed path, resuming from 'latest'."""
    import comfy.sd
    checkpoint = host_folders / "tiny.safetensors"
    checkpoint.write_bytes(b"stand-in")
    loaded = []

    def load(path, output_vae=True, output_clip=True, **kw):
        loaded.append(path)
        return tiny_sd15_patcher(), StandInCLIP(), StandInVAE(), None
    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", load)
    out, states = host_folders / "cli.safetensors", host_folders / "states"
    args = ["train", "--checkpoint", str(checkpoint), "--data", str(host_folders / "input" / "squares"),
            "--frames", "4", "--stride", "2", "--size", "64", "--batch-size", "2", "--lr", "1e-3", "--steps", "2",
            "--save-every", "1", "--state-dir", str(states), "--out", str(out), "--comfyui", str(comfy_dir()),
            "--log-every", "1", "--layout", "v2"]
    assert headless_main(args) == 0
    assert loaded == [str(checkpoint)] and capsys.readouterr().out.strip() == str(out)
    assert load_motion_module(out).config.family == "AnimateDiff v2"
    assert sorted(p.name for p in states.glob("step-*.pt")) == ["step-0000001.pt", "step-0000002.pt"]
    assert headless_main([*args, "--steps", "3", "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert "step 3/3" in err and "step 1/3" not in err  # continued from step 2
    assert headless_main([*args, "--layout", "v3", "--steps", "4", "--resume", "latest"]) == 1
    assert "resume with the same init, layout and LoRA rank" in capsys.readouterr().err
    assert headless_main(["train", "--checkpoint", str(checkpoint), "--data", str(host_folders / "nothing"),
                          "--comfyui", str(comfy_dir())]) == 2  # bad usage (tests/unit/test_hostile_cli.py: the rest)
    assert "does not exist" in capsys.readouterr().err


def test_the_progress_bar_of_hosts_without_node_id_is_used(monkeypatch):
    """Hosts before node_id= (December 2024) have ProgressBar(total) only: the node feature-detects it."""
    from adm.nodes import training as node

    class OldProgressBar:  # the December 2024 signature
        def __init__(self, total):
            self.total, self.updates = total, []

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total))

    class ProgressBar(OldProgressBar):  # today's signature
        def __init__(self, total, node_id=None):
            super().__init__(total)
            self.node_id = node_id

    for bar in (OldProgressBar, ProgressBar):
        monkeypatch.setattr(comfy.utils, "ProgressBar", bar)
        progress = node._Progress(4, "7")
        assert progress(1, 4, 0.5, [0.5]) is False
        assert type(progress.bar) is bar and progress.bar.total == 4 and progress.bar.updates == [(1, 4)]
    assert progress.bar.node_id == "7"


def comfy_dir():
    from conftest import COMFYUI_DIR
    return COMFYUI_DIR


def test_the_shipped_workflows_match_the_nodes_and_each_other():
    """example_workflows/train_motion_module.json (UI) converts to api_workflows/train_motion_module_api.json, and every input the API
    file sets is one the nodes declare."""
    import json

    import nodes as core
    from adm.headless.convert import ui_to_api
    from adm.nodes.training import NODE_CLASS_MAPPINGS
    from conftest import ROOT
    classes = {**NODE_CLASS_MAPPINGS, "CheckpointLoaderSimple": core.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"],
               "PreviewImage": core.NODE_CLASS_MAPPINGS["PreviewImage"]}

    def info(cls):
        spec = {k: v for k, v in cls.INPUT_TYPES().items() if k in ("required", "optional")}
        return {"input": spec, "input_order": {k: list(v) for k, v in spec.items()}, "output": list(cls.RETURN_TYPES)}
    api = json.loads((ROOT / "api_workflows" / "train_motion_module_api.json").read_text())
    ui = json.loads((ROOT / "example_workflows" / "train_motion_module.json").read_text())
    converted = ui_to_api(ui, {k: info(v) for k, v in classes.items()})
    assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in api.items()}
    for node in api.values():
        spec = classes[node["class_type"]].INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(node["inputs"]) <= set(declared), node["class_type"]

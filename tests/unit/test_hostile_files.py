"""Hostile and damaged files, one row each, through every reader that opens a user's file: Load Motion Module,
Load Motion LoRA, and training's ``--init`` / ``--lora-init``. Each row must be refused with a MotionModuleError
that names the file and says what is wrong, within a few seconds (a loop in a reader fails the row, not the
suite), and without quoting the folder the file is in."""
import ctypes
import pickle
import re
import threading

import pytest
import torch
from safetensors.torch import save_file

from adm.motion_modules import MotionModule, MotionModuleError, load_motion_module, read_state_dict
from adm.motion_modules.diffusers_format import to_diffusers
from adm.motion_modules.formats import published_state_dict
from unets import tiny_motion_config

SECONDS = 10  # a healthy read of these tiny files takes milliseconds
CONFIG = tiny_motion_config(down=((32, 32),) * 4, mid=(32,), up=((32,) * 3,) * 4, max_frames=8)
KEY = "down_blocks.0.motion_modules.0.temporal_transformer"
ATTN = f"{KEY}.transformer_blocks.0.attention_blocks.0"


def module_sd():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in published_state_dict(MotionModule(CONFIG)).items()}


def lora_sd(rank=2):
    """A published-layout motion LoRA for every attention projection of CONFIG."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, weight in module_sd().items():
        proj = re.search(r"\.(to_[qkv]|to_out)(?:\.0)?\.weight$", key)
        if proj and ".attention_blocks." in key:
            stem = key[: proj.start()] + f".processor.{proj[1]}_lora"
            sd[f"{stem}.down.weight"] = torch.randn(rank, weight.shape[1], generator=g)
            sd[f"{stem}.up.weight"] = torch.randn(weight.shape[0], rank, generator=g)
    return sd


def changed(sd, **tensors):
    return {**sd, **{k.replace("__", "."): v for k, v in tensors.items()}}


def with_value(sd, key, value):
    sd = dict(sd)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    return sd


def self_loop(key):
    d = {}
    d[key] = d
    return d


def nested(depth, inner):
    for _ in range(depth):
        inner = {"state_dict": {"module": inner}}
    return inner


class RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


# -- file builders: each writes `name` under the folder and returns its path --------------------------------------

def torch_file(obj):
    def build(path):
        torch.save(obj() if callable(obj) else obj, path)
    return build


def safetensors_file(sd):
    def build(path):
        save_file({k: v.contiguous() for k, v in sd().items()}, path)
    return build


def raw_file(data):
    def build(path):
        path.write_bytes(data() if callable(data) else data)
    return build


def truncated_safetensors():
    from safetensors.torch import save
    data = save(module_sd())
    return data[: len(data) // 2]


def diffusers_with_scalar_query():
    sd, _ = to_diffusers(module_sd())
    key = next(k for k in sd if k.endswith("attn1.to_q.weight"))
    return {**sd, key: torch.tensor(1.0)}


LORA_UP, LORA_DOWN = f"{ATTN}.processor.to_q_lora.up.weight", f"{ATTN}.processor.to_q_lora.down.weight"

# (row id, file name, builder, reader, expected message after the file name)
ROWS = [
    # a dict that contains itself, or nests without end, passes the safe unpickler: the walk must be bounded
    ("loop state_dict", "mm.ckpt", torch_file(lambda: self_loop("state_dict")), "module", "contains itself"),
    ("loop module", "mm.pt", torch_file(lambda: self_loop("module")), "module", "contains itself"),
    ("deep nesting", "mm.pth", torch_file(lambda: nested(5, module_sd())), "module", "wrapped more than 8 times"),
    ("huge entry count", "mm.ckpt", torch_file(lambda: {str(i): i for i in range(100_001)}), "module", "100,001 entries"),
    ("loop lora", "lora.ckpt", torch_file(lambda: self_loop("state_dict")), "lora", "contains itself"),
    ("loop init", "init.ckpt", torch_file(lambda: self_loop("module")), "init", "contains itself"),
    ("loop lora init", "lora.ckpt", torch_file(lambda: self_loop("state_dict")), "lora init", "contains itself"),
    # non-finite weights would give an all-NaN clip reported as success
    ("nan weight", "mm.safetensors", safetensors_file(lambda: with_value(module_sd(), f"{ATTN}.to_q.weight", float("nan"))),
     "module", rf"tensor '{re.escape(ATTN)}\.to_q\.weight' holds NaN/inf values; the file is damaged"),
    ("inf fp16 weight", "mm.safetensors",
     safetensors_file(lambda: {k: v.half() for k, v in with_value(module_sd(), f"{KEY}.proj_out.bias", float("inf")).items()}),
     "module", "proj_out.bias' holds NaN/inf"),
    ("nan weight init", "init.ckpt", torch_file(lambda: with_value(module_sd(), f"{KEY}.norm.bias", float("-inf"))),
     "init", "norm.bias' holds NaN/inf"),
    ("nan lora", "lora.safetensors", safetensors_file(lambda: with_value(lora_sd(), LORA_UP, float("nan"))),
     "lora", "to_q_lora.up.weight' holds NaN/inf"),
    ("nan lora init", "lora.safetensors", safetensors_file(lambda: with_value(lora_sd(), LORA_DOWN, float("nan"))),
     "lora init", "to_q_lora.down.weight' holds NaN/inf"),
    # malformed shapes: named, not an IndexError, and not a module that fails only when sampling
    ("1-D encoding", "mm.safetensors",
     safetensors_file(lambda: {k: v[0, :, 0] if k.endswith("pe") else v for k, v in module_sd().items()}),
     "module", r"positional encoding '.*pos_encoder\.pe' has shape \[8\]"),
    ("empty encoding", "mm.safetensors",
     safetensors_file(lambda: {k: v[:, :0] if k.endswith("pe") else v for k, v in module_sd().items()}),
     "module", r"has shape \[1, 0, 32\], not \[1, frames, channels\] with at least one frame"),
    ("scalar norm", "mm.safetensors", safetensors_file(lambda: changed(module_sd(), **{f"{KEY}.norm.weight": torch.tensor(1.0)})),
     "module", r"norm\.weight' has shape \[\], but a norm weight is a list"),
    ("diffusers scalar", "diffusion_pytorch_model.safetensors", safetensors_file(diffusers_with_scalar_query),
     "module", "diffusers MotionAdapter file.*to_q.weight has shape"),
    ("lora ranks differ", "lora.safetensors", safetensors_file(lambda: changed(lora_sd(), **{LORA_UP: torch.randn(32, 3)})),
     "lora", r"to_q_lora\.up\.weight' has rank 3 but '.*to_q_lora\.down\.weight' has rank 2"),
    ("lora ranks differ init", "lora.safetensors",
     safetensors_file(lambda: changed(lora_sd(), **{LORA_DOWN: torch.randn(3, 32)})), "lora init", "has rank 2 but .* has rank 3"),
    ("lora 1-D", "lora.safetensors", safetensors_file(lambda: changed(lora_sd(), **{LORA_DOWN: torch.randn(32)})),
     "lora", r"down\.weight' is torch\.float32 \[32\]; LoRA weights are 2-D"),
    ("lora bad alpha", "lora.safetensors",
     safetensors_file(lambda: changed(lora_sd(), **{f"{ATTN}.processor.to_q_lora.alpha": torch.ones(2)})),
     "lora", r"to_q_lora\.alpha' is \[2\] \[1\.0, 1\.0\], not one finite number"),
    ("lora nan alpha", "lora.safetensors",
     safetensors_file(lambda: changed(lora_sd(), **{f"{ATTN}.processor.to_q_lora.alpha": torch.tensor(float("nan"))})),
     "lora", "not one finite number"),
    ("lora unknown tensor", "lora.safetensors",
     safetensors_file(lambda: changed(lora_sd(), **{f"{ATTN}.processor.to_q_lora.scale": torch.ones(1)})),
     "lora", r"unknown motion-LoRA tensor '.*to_q_lora\.scale'"),
    ("lora wrong width", "lora.safetensors",
     safetensors_file(lambda: changed(lora_sd(), **{LORA_UP: torch.randn(64, 2)})),
     "lora", r"does not fit the AnimateDiff v2 module: layer .*to_q\.weight is \(32, 32\) but the LoRA makes \(64, 32\)"),
    # the cases that already held, kept as rows so they stay held
    ("code-running pickle", "evil.ckpt", raw_file(lambda: pickle.dumps({**module_sd(), "x": RunsCode()}, protocol=2)),
     "module", "refused to load. The pickle holds objects other than tensors"),
    ("truncated", "cut.safetensors", raw_file(truncated_safetensors), "module", "cannot be read as a .safetensors.*truncated"),
    ("empty", "empty.ckpt", raw_file(b""), "module", r"the file is empty \(0 bytes\)"),
    ("wrong suffix", "mm.bin", raw_file(b"x"), "module", "unknown file type '.bin'"),
    ("not there", "missing.ckpt", None, "lora", "no such file"),
    ("SD checkpoint", "model.safetensors",
     safetensors_file(lambda: {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}),
     "module", "Stable Diffusion checkpoint.*models/checkpoints"),
    ("non-dict payload", "list.pt", torch_file([torch.zeros(2)]), "module", "holds a list, not a dictionary"),
    ("motion lora as module", "lora.safetensors", safetensors_file(lora_sd), "module", "motion LoRA.*animatediff_motion_lora"),
]


def read(reader, path):
    if reader == "module":
        return load_motion_module(path)
    if reader == "lora":
        from adm.model_patcher.motion_patcher import add_motion_lora
        from unets import tiny_motion_patcher
        return add_motion_lora(tiny_motion_patcher(CONFIG), path, 1.0)
    from adm.training import loop
    if reader == "init":
        return loop.motion_module_for_training(path)
    from adm.training.lora import MotionLoRA
    # as make_trainee reads --lora-init (it should pass the file name, as here, for the checks' messages)
    return MotionLoRA(MotionModule(CONFIG), rank=2).load_published(read_state_dict(path), path.name)


def bounded(fn, seconds=SECONDS):
    """What ``fn`` raised (None if nothing); fails the test, instead of hanging it, if it runs on."""
    outcome = []
    def run():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():  # stop it (a pure-Python loop), so that one regression does not slow every other row
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
        pytest.fail(f"the reader was still running after {seconds} s (a loop on a hostile file)")
    return outcome[0]


@pytest.mark.parametrize("name, build, reader, message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_hostile_file_is_refused_with_its_name(tmp_path, name, build, reader, message):
    folder = tmp_path / "models" / "animatediff_models"
    folder.mkdir(parents=True)
    path = folder / name
    if build:
        build(path)
    error = bounded(lambda: read(reader, path))
    assert isinstance(error, MotionModuleError), f"expected a MotionModuleError, got {error!r}"
    text = str(error)
    assert re.search(rf"{re.escape(name)}:? .*{message}", text, re.S), text
    assert str(folder) not in text and "animatediff_models" not in text, f"the message reveals the folder: {text}"

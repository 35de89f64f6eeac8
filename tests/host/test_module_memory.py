"""The motion module's weights exist once (issue 16: on the CPU its resident cost is its weights' size).
Reading the file, Apply, and the host loading both models for sampling make no copy of the weights and no
weight-sized temporaries. Counted, not timed: the bytes torch allocates along the path a workflow takes, and
where the module's parameters live."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import comfy.model_management

from adm.model_patcher.motion_patcher import apply_motion_module, load_motion_patcher
from adm.motion_modules import MotionModule, formats
from unets import tiny_motion_config, tiny_sd15_patcher


class Allocations(TorchDispatchMode):
    """Bytes of the fresh storages that torch ops create while active (views, in-place ops and tensors taken
    from a file create none; every copy, conversion and temporary does)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable:
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            self.bytes += sum(t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                              and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs)
        return out


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process has ``path`` memory-mapped (/proc/self/maps, Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.fixture(scope="module")
def module_file(tmp_path_factory):
    torch.manual_seed(0)
    module = MotionModule(tiny_motion_config())
    path = (tmp_path_factory.mktemp("mm") / "tiny.safetensors").resolve()
    save_file({k: v.contiguous() for k, v in formats.published_state_dict(module).items()}, path)
    return path


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_load_apply_and_host_load_keep_the_weights_where_the_file_put_them(module_file):
    unet = tiny_sd15_patcher()
    counter = Allocations()
    try:
        with counter:  # Load Motion Module -> Apply -> the host loads both for sampling (ModelPatcher.patch_model)
            motion = load_motion_patcher(module_file)
            model = apply_motion_module(unet, motion)
            comfy.model_management.load_models_gpu([model, *model.get_nested_additional_models()])
        tensors = motion.model.state_dict()
        weights = sum(t.numel() * t.element_size() for t in tensors.values())
        # A copy of the weights, a dtype conversion, a backup or a weight-sized temporary (a NaN check through
        # torch.isfinite allocates 7 bytes per float32 value) would show here.
        assert counter.bytes < 0.01 * weights, f"{counter.bytes} bytes allocated for {weights} bytes of weights"
        # The parameters are the file's own pages (memory-mapped, assigned as they are), not a copy of them.
        ranges = mapped_ranges(module_file)
        assert ranges, "the file is not memory-mapped"
        copied = [k for k, t in tensors.items() if t.numel() and not any(a <= t.data_ptr() < b for a, b in ranges)]
        assert not copied, f"{len(copied)} of {len(tensors)} tensors are not the file's memory, e.g. {copied[:3]}"
    finally:
        comfy.model_management.unload_all_models()


def test_nan_check_allocates_nothing_weight_sized_and_still_finds_every_bad_value():
    values = torch.randn(1000, 1000)
    counter = Allocations()
    with counter:
        formats.check_finite({"w": values}, "x.safetensors")
    assert counter.bytes < 1024, f"{counter.bytes} bytes allocated to check {values.numel()} values"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bad in (float("inf"), float("-inf"), float("nan")):
            values = torch.zeros(4, 5, dtype=dtype)
            values[2, 3] = bad
            with pytest.raises(formats.MotionModuleError, match="'w' holds NaN/inf"):
                formats.check_finite({"ok": torch.ones(3, dtype=dtype), "w": values}, "x.safetensors")
    # Finite values whose sum overflows (past fp16's 65504, past float32's 3.4e38) are fine.
    formats.check_finite({"w": torch.full((4, 5), 60000.0, dtype=torch.float16), "v": torch.full((3,), 3e38)},
                         "x.safetensors")

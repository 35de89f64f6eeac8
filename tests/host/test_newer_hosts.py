"""Behaviour of newer ComfyUI hosts (0.15-0.38, which cannot be installed here) reproduced at our seams.

Each stand-in mirrors one piece of the newer host's code, named where it is defined; the tests show that our
code does the right thing against it (and they fail on the code before it learned to).
"""
import copy
import logging
import math

import pytest
import torch

import comfy.model_patcher
import comfy.sample
from comfy.patcher_extension import WrappersMP
from safetensors.torch import save_file

from adm.model_patcher import context_windows, free_init, free_noise, frame_groupnorm, schedules
from adm.model_patcher.motion_patcher import (ON_DEEPCLONE_MULTIGPU, MotionOptions, TemporalPatch,
                                              apply_motion_module, load_motion_patcher)
from adm.motion_modules import published_state_dict
from unets import tiny_motion_config, tiny_motion_patcher, tiny_sd15_patcher

FRAMES = 6

pytestmark = pytest.mark.skipif(not context_windows.HOST_HAS_WINDOWS, reason="needs comfy.context_windows")


def sample(model, frames=FRAMES, seed=3, steps=2):
    g = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, 32, generator=g), {}]]
    negative = [[torch.randn(1, 77, 32, generator=g), {}]]
    noise = torch.randn(frames, 4, 8, 8, generator=g)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative,
                               torch.zeros_like(noise), seed=seed, disable_pbar=True), noise


# --- Anchor frames in context windows (comfy/context_windows.py, PR #13563, around 0.20) ----------------------

class AnchoredWindow:
    """IndexListContextWindow of newer hosts with ``causal_window_fix`` on: ``evaluate_context_windows`` sets
    ``causal_anchor_index = index_list[0] - 1`` and ``get_tensor`` puts that frame first."""

    def __init__(self, index_list, anchor):
        self.index_list, self.causal_anchor_index = index_list, anchor


def stock_handler(length=4, overlap=1, **newer_host_options):
    """The stock Context Windows node's handler (frames on the batch axis), with the options newer hosts give it
    (``causal_window_fix`` defaults to True there, ``freenoise`` is a node input)."""
    host = context_windows.host_windows
    handler = host.IndexListContextHandler(host.get_matching_context_schedule("standard_static"),
                                           host.get_matching_fuse_method("pyramid"), context_length=length,
                                           context_overlap=overlap, dim=0)
    for name, value in newer_host_options.items():
        setattr(handler, name, value)
    return handler


def with_stock_windows(model, handler):
    patched = model.clone()
    patched.model_options["context_handler"] = handler
    return patched


def test_our_windows_and_the_stock_nodes_run_without_the_anchor_frame(caplog):
    assert context_windows.make_handler(16, 4, "standard_uniform", "pyramid").causal_window_fix is False
    handler = stock_handler(causal_window_fix=True)
    seen = {}

    class Executor:  # an OUTER_SAMPLE executor: its class_obj is the guider with this run's model options
        class_obj = type("Guider", (), {"model_options": {"context_handler": handler}})()

        def __call__(self, noise, *args, **kwargs):
            seen["handler"] = self.class_obj.model_options["context_handler"]
            return noise

    with caplog.at_level(logging.INFO):
        context_windows.adopt_stock_handler(Executor(), torch.zeros(8, 4, 2, 2))
    assert isinstance(seen["handler"], context_windows.AnimateDiffContextHandler)
    assert seen["handler"].causal_window_fix is False
    assert handler.causal_window_fix is True  # the node's own handler is left as it was
    assert "without the anchor frame" in caplog.text


def test_per_frame_scales_stay_aligned_in_a_window_that_carries_an_anchor():
    patch = TemporalPatch(tiny_motion_config(), tuple(float(i) for i in range(10)))
    x = torch.zeros(2 * 5, 1, 1, 1)
    window = AnchoredWindow([4, 5, 6, 7], anchor=3)  # the UNet sees frames 3, 4, 5, 6, 7
    scales = patch.frame_scale(5, 2, {"context_window": window}, x).flatten().tolist()
    assert scales == [3.0, 4.0, 5.0, 6.0, 7.0] * 2


def test_a_window_too_long_with_its_anchor_is_refused_naming_the_anchor():
    patch = TemporalPatch(tiny_motion_config(max_frames=4), 1.0)
    options = {"context_window": AnchoredWindow([1, 2, 3, 4], anchor=0), "cond_or_uncond": [0]}
    with pytest.raises(ValueError, match=r"5 frames.*anchor frame.*causal_window_fix.*at most 3"):
        patch(None, torch.zeros(5, 4, 2, 2), None, None, options)


# --- FreeNoise on the stock node (comfy/context_windows.py _sampler_sample_wrapper, PR #10975) ----------------

def host_free_noise(ran: list):
    """The stock node's SAMPLER_SAMPLE wrapper: shuffles the noise across frames when the handler says so."""
    def wrapper(executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        if extra_args["model_options"]["context_handler"].freenoise:
            ran.append(True)
            noise = noise.flip(0)  # any frame shuffle stands for the host's
        return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)
    return wrapper


def noise_spy(seen: list):
    def wrapper(executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        seen.append(noise.clone())
        return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)
    return wrapper


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


@pytest.mark.parametrize("ours", ["off", "free_noise", "free_noise+free_init"])
def test_freenoise_runs_once_when_the_stock_node_asks_for_it_too(model, ours):
    animated = apply_motion_module(model, tiny_motion_patcher(), MotionOptions(schedule="use existing"))
    patched = with_stock_windows(animated, stock_handler(length=4, overlap=1, freenoise=True, causal_window_fix=True))
    if "free_noise" in ours:
        free_noise.add_free_noise(patched, 4, 1)
    if "free_init" in ours:
        free_init.add_free_init(patched, 2, "gaussian", 0.25, 0.25, 4)
    ran, seen = [], []
    patched.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, "ContextWindows_sampler_sample", host_free_noise(ran))
    patched.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, "spy", noise_spy(seen))
    _, noise = sample(patched)
    assert not ran, "the host's FreeNoise shuffled the noise as well"
    assert torch.equal(seen[0], free_noise.reschedule_noise(noise, 4, 1, 3))  # ours, once, with the node's windows
    assert len(seen) == (2 if "free_init" in ours else 1)


# --- Dynamic VRAM (comfy/model_patcher.py ModelPatcherDynamic.load / restore_loaded_backups, from 0.15) --------

def set_attr_buffer(obj, path, value):
    """comfy/utils.py set_attr_buffer: resolve the path, then register_buffer on whatever object is there."""
    *parents, name = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    obj.register_buffer(name, value, persistent=name not in getattr(obj, "_non_persistent_buffers_set", set()))


class DynamicLikePatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcherDynamic's buffer handling: ``load`` first writes every backup back by path
    (``restore_loaded_backups``), then backs each named buffer up by path (unless one is already there) and puts
    a copy (the device copy) in its place. Clones share ``backup_buffers`` (``get_clone_model_override``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backup_buffers = {}

    def clone(self):
        n = super().clone()
        n.backup_buffers = self.backup_buffers
        return n

    def restore_loaded_backups(self):
        for key in list(self.backup_buffers):
            set_attr_buffer(self.model, key, self.backup_buffers.pop(key))

    def load(self, *args, **kwargs):
        self.restore_loaded_backups()
        super().load(*args, **kwargs)
        for key, buffer in self.model.named_buffers(recurse=True):
            self.backup_buffers.setdefault(key, buffer)
            set_attr_buffer(self.model, key, buffer.clone())


def sigma_max(linear_start, linear_end, in_sqrt):
    """Independent of the host: the last sigma of a 1000-step DDPM schedule."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, 1000, dtype=torch.float64) ** 2 if in_sqrt \
        else torch.linspace(linear_start, linear_end, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[-1]
    return math.sqrt((1 - alpha_bar) / alpha_bar)


CHECKPOINT = sigma_max(0.00085, 0.012, in_sqrt=True)    # SD1.5's own ("linear" in ComfyUI's names)
ANIMATEDIFF = sigma_max(0.00085, 0.012, in_sqrt=False)  # AnimateDiff's sqrt_linear


def test_schedules_do_not_leak_between_runs_under_the_dynamic_vram_loader():
    base = tiny_sd15_patcher()
    model = DynamicLikePatcher(base.model, base.load_device, base.offload_device)
    used = []

    def spy(apply_model, args):  # the schedule the model really samples with
        used.append(float(apply_model.__self__.model_sampling.sigmas[-1]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    plain = model.clone()
    plain.set_model_unet_function_wrapper(spy)
    animated = apply_motion_module(plain, tiny_motion_patcher())
    for run, expected in ((plain, CHECKPOINT), (animated, ANIMATEDIFF), (plain, CHECKPOINT), (animated, ANIMATEDIFF)):
        used.clear()
        sample(run, frames=2)
        assert used and all(v == pytest.approx(expected, rel=1e-4) for v in used), (expected, used)


def test_a_write_of_another_schedule_into_ours_keeps_ours():
    ours = schedules.model_sampling(schedules.SQRT_LINEAR, tiny_sd15_patcher().model.model_sampling)
    set_attr_buffer(torch.nn.ModuleDict({"model_sampling": ours}), "model_sampling.sigmas", torch.ones(1000, dtype=torch.float64))
    assert ours.sigmas.dtype == torch.float64 and float(ours.sigmas[-1]) == pytest.approx(ANIMATEDIFF, rel=1e-5)


# --- Multi-GPU (comfy/model_patcher.py ModelPatcher.deepclone_multigpu) --------------------------------------

def test_motion_modules_can_be_deep_cloned_for_another_gpu(tmp_path):
    motion = tiny_motion_patcher()
    path = tmp_path / "tiny_v2.safetensors"
    save_file(published_state_dict(motion.model), str(path))
    loaded = load_motion_patcher(path)
    # deepclone_multigpu refuses a model without cached_patcher_init; it calls the factory as (*args) and
    # clone(disable_dynamic=True) calls it with disable_dynamic=True.
    factory, args = loaded.cached_patcher_init
    for fresh in (factory(*args), factory(*args, disable_dynamic=True)):
        assert fresh.model is not loaded.model
        assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), loaded.model.state_dict().values()))


def test_frame_groupnorm_is_rebuilt_on_each_gpus_copy():
    v1 = tiny_motion_patcher(tiny_motion_config(family="AnimateDiff v1", mid=(), max_frames=24))
    patched = apply_motion_module(tiny_sd15_patcher(), v1)
    copy_for_gpu = patched.clone()  # deepclone_multigpu: a clone around a fresh model of its own ...
    copy_for_gpu.model = copy.deepcopy(patched.model)
    for callback in patched.get_all_callbacks(ON_DEEPCLONE_MULTIGPU):  # ... then these callbacks
        callback(patched, copy_for_gpu)
    norms = {k: v for k, v in copy_for_gpu.object_patches.items() if isinstance(v, frame_groupnorm.FrameGroupNorm)}
    own = dict(copy_for_gpu.model.named_parameters())
    assert norms and all(norm.weight is own[key + ".weight"] for key, norm in norms.items())
    assert len(copy_for_gpu.get_wrappers(WrappersMP.DIFFUSION_MODEL, "animatediff_motion")) == 1
    assert torch.equal(sample(copy_for_gpu)[0], sample(patched)[0])

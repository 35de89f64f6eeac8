"""Hostile and careless node values, one row each: refused before sampling with a message naming the input, and
a process that switches motion modules of any family in any order keeps working."""
import pytest
import torch

import comfy.sample

from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
from adm.nodes.motion import ApplyMotionModule
from adm.nodes.sampling_options import SamplingOptions
from unets import tiny_motion_config, tiny_motion_patcher, tiny_sd15_patcher

NAN, INF = float("nan"), float("inf")
FAMILIES = {
    "v1": tiny_motion_config(family="AnimateDiff v1", mid=(), max_frames=24),
    "v2": tiny_motion_config(),
    "v3": tiny_motion_config(family="AnimateDiff v3", mid=()),
    "lcm": tiny_motion_config(family="AnimateLCM"),
}


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


def sample(model, frames=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, 32, generator=g), {}]]
    negative = [[torch.randn(1, 77, 32, generator=g), {}]]
    noise = torch.randn(frames, 4, 8, 8, generator=g)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


APPLY = dict(motion_scale=1.0, noise_schedule="autoselect", frame_groupnorm="autoselect")
SAMPLING = dict(free_noise=True, free_noise_context_length=16, free_noise_context_overlap=4, free_init_iterations=3,
                free_init_filter="gaussian", free_init_spatial_stop=0.25, free_init_temporal_stop=0.25,
                free_init_butterworth_order=4)


@pytest.mark.parametrize("node, values, message", [
    ("apply", {"motion_scale": NAN}, r"motion_scale must be a number from 0 to 10.*nan"),
    ("apply", {"motion_scale": INF}, r"motion_scale must be.*inf"),
    ("apply", {"motion_scale": -1.0}, r"motion_scale must be.*-1"),
    ("apply", {"effect": NAN}, r"effect must be a number from 0 to 1.*nan"),
    ("apply", {"effect": 1.5}, r"effect must be a number from 0 to 1"),
    ("apply", {"motion_scale_per_frame": "1, nan, 1"}, r"motion_scale must be.*per frame.*nan"),
    ("apply", {"motion_scale_per_frame": "1e400"}, r"motion_scale must be.*per frame.*inf"),
    ("apply", {"motion_scale_per_frame": "1, 11"}, r"motion_scale must be.*per frame.*11"),
    ("apply", {"motion_scale_per_frame": "1, -0.5"}, r"motion_scale must be.*per frame.*-0.5"),
    ("apply", {"motion_scale_per_frame": "1, fast"}, r"motion_scale_per_frame must be numbers"),
    ("sampling", {"free_init_spatial_stop": NAN}, r"free_init_spatial_stop must be a number from 0 to 1.*nan"),
    ("sampling", {"free_init_temporal_stop": INF}, r"free_init_temporal_stop must be a number from 0 to 1.*inf"),
])
def test_node_values_are_refused_naming_the_input(model, node, values, message):
    with pytest.raises(ValueError, match=message):
        if node == "apply":
            ApplyMotionModule().apply(model, tiny_motion_patcher(), **{**APPLY, **values})
        else:
            SamplingOptions().execute(model, **{**SAMPLING, **values})
    assert not model.injections and not model.get_additional_models()  # the MODEL passed in is untouched


def test_finite_values_in_range_are_accepted():
    assert MotionOptions(scale=(0.0, 10.0, 1.0), effect=0.0).scale == (0.0, 10.0, 1.0)


def test_any_sequence_of_module_families_works_in_one_process(model):
    """v2 then v1 used to fail in one server (frame GroupNorm keys read off a UNet that still held the last
    run's modules): each run of a sequence samples exactly as the same apply on a model never animated."""
    sequence = ["v2", "v1", "v3", "lcm", "v1", "v2", "v1"]
    motion = {name: tiny_motion_patcher(config) for name, config in FAMILIES.items()}
    runs = [sample(apply_motion_module(model, motion[name])) for name in sequence]
    for name, run in zip(sequence, runs):
        fresh = tiny_sd15_patcher()  # same weights, never patched
        assert torch.equal(run, sample(apply_motion_module(fresh, motion[name]))), name

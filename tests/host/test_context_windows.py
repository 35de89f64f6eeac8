"""Long clips through the host's context windows with our temporal modules inside."""
import pytest
import torch

import comfy.sample

from adm.model_patcher.context_windows import window_hints
from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
from adm.nodes.context import ContextWindows
from unets import tiny_motion_config, tiny_motion_patcher, tiny_sd15_patcher

PLAIN = MotionOptions(schedule="use existing")


@pytest.fixture(scope="module")
def animated():
    return apply_motion_module(tiny_sd15_patcher(), tiny_motion_patcher(tiny_motion_config(max_frames=8)), PLAIN)


def sample(model, noise, steps=2):
    cond = [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5)), {}]]
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", cond, cond, torch.zeros_like(noise),
                               seed=1, disable_pbar=True)


def windows(model, length, overlap, schedule="standard_static", fuse="pyramid", closed_loop=False):
    return ContextWindows().apply(model, length, overlap, schedule, fuse, closed_loop)[0]


def test_clips_longer_than_the_module_need_windows_and_work_with_them(animated):
    noise = torch.randn(20, 4, 8, 8)
    with pytest.raises(ValueError, match="context windows"):
        sample(animated, noise)
    out = sample(windows(animated, 8, 2), noise)
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_each_window_is_denoised_as_its_own_clip(animated):
    # Batched windows do not overlap: 16 frames in windows of 8 == two separate 8-frame clips.
    noise = torch.randn(16, 4, 8, 8)
    whole = sample(windows(animated, 8, 0, schedule="batched", fuse="flat"), noise)
    halves = torch.cat([sample(animated, noise[:8]), sample(animated, noise[8:])])
    torch.testing.assert_close(whole, halves, rtol=1e-4, atol=1e-3)


def test_closed_loop_uses_the_looped_schedule(animated):
    handler = windows(animated, 8, 2, closed_loop=True).model_options["context_handler"]
    assert handler.closed_loop and handler.context_schedule.name == "looped_uniform"


def test_overlap_must_be_smaller_than_the_window(animated):
    with pytest.raises(ValueError, match="context_overlap"):
        windows(animated, 8, 8)


class FakeControl:
    def __init__(self, hint, previous=None):
        self.cond_hint_original, self.cond_hint, self.previous_controlnet = hint, "cached", previous


def test_per_frame_controlnet_hints_follow_the_window():
    hints, other = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10.0, 20.0).view(10, 1, 1, 1)
    inner = FakeControl(other)
    outer = FakeControl(hints, previous=inner)
    single = FakeControl(torch.ones(1, 1, 1, 1))
    conds = [[{"control": outer}], [{"control": single}]]
    with window_hints(conds, [4, 5, 6], 10):
        assert outer.cond_hint_original.flatten().tolist() == [4, 5, 6] and outer.cond_hint is None
        assert inner.cond_hint_original.flatten().tolist() == [14, 15, 16]
        assert single.cond_hint_original.shape[0] == 1  # one hint for all frames: left alone
    assert outer.cond_hint_original is hints and outer.cond_hint == "cached" and inner.cond_hint_original is other
    with pytest.raises(RuntimeError), window_hints(conds, [0, 1], 10):
        raise RuntimeError("sampling failed")
    assert outer.cond_hint_original is hints

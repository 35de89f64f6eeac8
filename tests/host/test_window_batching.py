"""Several context windows per UNet call (Context Windows' windows_per_batch): the same result as window by
window, fewer calls, and every per-frame input (conds, ControlNet hints, motion scales) still on its frame."""
import pytest
import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management
import comfy.ops
import comfy.sample
import nodes as host_nodes  # the host's core nodes: ControlNetApplyAdvanced is "Apply ControlNet"

from adm.model_patcher.context_windows import make_handler, window_share
from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
from adm.nodes.context import ContextWindows
from unets import tiny_motion_config, tiny_motion_patcher, tiny_sd15_patcher, unet_config

FRAMES = 10  # windows of 4, overlap 1, standard_static: [0..3], [3..6], [6..9]
WINDOWS = [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
SCALES = tuple(0.5 + i / FRAMES for i in range(FRAMES))  # a motion scale per frame


def tiny_controlnet():
    """The host's ControlNet shaped like the tiny UNet (what it computes does not matter here: which hints it
    holds for each call does)."""
    config = unet_config(model_channels=32, context_dim=32)
    config.pop("out_channels")
    torch.manual_seed(0)
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **config)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.01 if p.dim() == 1 else 0.05)
    return comfy.controlnet.ControlNet(net.eval().requires_grad_(False),
                                       load_device=comfy.model_management.get_torch_device())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is fast, two on a busy shared CPU spin-wait (measured 0.5 s vs 17 s per
    UNet call here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


@pytest.fixture(scope="module")
def noise_and_prompts():
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(FRAMES, 4, 8, 8, generator=g)
    per_frame = torch.randn(FRAMES, 77, 32, generator=g)  # a prompt per frame, as Prompt Travel gives
    return noise, per_frame, [[per_frame, {}]], [[torch.zeros(1, 77, 32), {}]]


def spied(model, calls, control, run):
    """A clone of ``model`` that records each UNet call's frames, its cond chunk's text embeddings and the hints
    the ControlNet holds for the call; with ``run`` False it skips the UNet (a zero prediction), to be quick."""
    def wrapper(apply_model, args):
        c, chunks = args["c"], args["cond_or_uncond"]
        if 0 in chunks:
            frames = list(c["transformer_options"]["context_window"].index_list)
            hint = None if control is None else control.cond_hint_original
            calls.append((frames, c["c_crossattn"].chunk(len(chunks))[chunks.index(0)], hint))
        return apply_model(args["input"], args["timestep"], **c) if run else torch.zeros_like(args["input"])
    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone


def sample(model, noise, positive, negative, per_batch, steps=2, frame_groupnorm="off", run=True):
    animated = apply_motion_module(model, tiny_motion_patcher(tiny_motion_config(max_frames=4)),
                                   MotionOptions(scale=SCALES, schedule="use existing", frame_groupnorm=frame_groupnorm))
    calls = []
    spy = spied(animated, calls, positive[0][1].get("control"), run)
    windowed = ContextWindows().apply(spy, 4, 1, "standard_static", "pyramid", False, 1, per_batch)[0]
    out = comfy.sample.sample(windowed, noise, steps, 5.0, "euler", "normal", positive, negative,
                              torch.zeros_like(noise), seed=1, disable_pbar=True)
    return out, calls


def test_windows_in_one_call_give_the_window_by_window_result(model, noise_and_prompts):
    noise, per_frame, positive, negative = noise_and_prompts
    alone, alone_calls = sample(model, noise, positive, negative, 1)
    together, together_calls = sample(model, noise, positive, negative, 3)
    assert [call[0] for call in alone_calls] == WINDOWS * 2  # 2 steps
    assert [call[0] for call in together_calls] == [sum(WINDOWS, [])] * 2
    for frames, cond, _ in alone_calls + together_calls:  # each frame's own prompt, in batch order
        assert torch.equal(cond, per_frame[frames])
    # Motion scales per frame, and each window a clip of its own for the temporal modules: either misaligned
    # changes the result far beyond rounding. The random-weight UNet's outputs reach 342 here; measured: the
    # batch moves them by 1.6e-3, float32 rounding alone (this run with a ControlNet, on 1 thread instead of 2)
    # by 2.4e-3, the per-frame scales applied in reverse order by 125.
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5 * float(alone.abs().max()))


def test_per_frame_prompts_and_controlnet_hints_follow_each_window_in_a_batch(model, noise_and_prompts):
    noise, per_frame, positive, negative = noise_and_prompts
    images = torch.rand(FRAMES, 64, 64, 3, generator=torch.Generator().manual_seed(8))  # a hint per frame
    positive, negative = host_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, tiny_controlnet(), images, strength=1.0, start_percent=0.0, end_percent=1.0)
    _, calls = sample(model, noise, positive, negative, 2, steps=1, run=False)
    assert [call[0] for call in calls] == [WINDOWS[0] + WINDOWS[1], WINDOWS[2]]
    hints = images.movedim(-1, 1)
    for frames, cond, hint in calls:
        assert torch.equal(cond, per_frame[frames]) and torch.equal(hint, hints[frames])


def test_groupnorm_across_frames_counts_the_whole_batch_so_windows_go_one_by_one(model, noise_and_prompts):
    noise, _, positive, negative = noise_and_prompts
    _, calls = sample(model, noise, positive, negative, 3, steps=1, frame_groupnorm="on", run=False)
    assert [call[0] for call in calls] == WINDOWS


@pytest.mark.parametrize("bad", [0, 17, 2.5, True, "2", float("nan")])
def test_windows_per_batch_must_be_a_whole_number_from_1_to_16(bad):
    with pytest.raises(ValueError, match="windows_per_batch must be a whole number from 1 to 16"):
        make_handler(8, 2, "standard_static", "pyramid", windows_per_batch=bad)


def test_a_window_gets_its_share_of_per_cond_and_per_modality_outputs():
    """0.3.75 gives one tensor per cond; newer hosts one tensor per cond and modality (comfy/context_windows.py,
    IndexListContextHandler.execute reads ``result.sub_conds_out[ci][mod_idx]``): both are cut per window."""
    out = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)  # (cond, frames of 2 windows of 3, channel)
    per_cond = [out[0], out[1]]
    assert all(torch.equal(a, b[3:6]) for a, b in zip(window_share(per_cond, 0, 3, 3), per_cond))
    per_modality = [[out[0]], [out[1]]]
    share = window_share(per_modality, 0, 0, 3)
    assert len(share) == 2 and len(share[0]) == 1 and torch.equal(share[1][0], out[1][:3])

"""Prompt Travel against the host: a real (tiny) CLIP, and per-frame conds through the host's samplers and its
context windows."""
import logging

import pytest
import torch

import comfy.context_windows
import comfy.sample
import comfy.sd
import comfy.sd1_clip

from adm.model_patcher.context_windows import adopt_stock_handler
from adm.model_patcher.prompt_schedule import PromptScheduleError, check_frames
from adm.nodes.prompt_travel import PromptTravel
from adm.nodes.sampling_options import SamplingOptions
from unets import tiny_sd15_patcher


class _Target:
    params = {}
    clip = comfy.sd1_clip.SD1ClipModel
    tokenizer = comfy.sd1_clip.SD1Tokenizer


@pytest.fixture(scope="module")
def clip():
    """The host's SD1.5 CLIP (its tokenizer, its 77-token chunking) at width 32 with random weights."""
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "projection_dim": 32}
    clip = comfy.sd.CLIP(_Target(), model_options={"clip_l_model_config": small})
    torch.manual_seed(0)
    for p in clip.cond_stage_model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return clip


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


def encode(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)


def travel(clip, text, frames, interpolation="linear", **kw):
    (conditioning,) = PromptTravel().encode(clip, text, frames, interpolation, **kw)
    assert len(conditioning) == 1
    return conditioning[0]


def test_one_embedding_per_frame_exact_at_keyframes_mean_halfway(clip):
    cond, extra = travel(clip, '"2": "a cat in a garden",\n"6": "a dog in the snow"', 8)
    cat, dog = encode(clip, "a cat in a garden"), encode(clip, "a dog in the snow")
    assert cond.shape == (8, 77, 32) and extra["pooled_output"].shape == (8, 32)
    for f in (0, 1, 2):  # up to the first keyframe: its prompt
        assert torch.equal(cond[f], cat["cond"][0]) and torch.equal(extra["pooled_output"][f], cat["pooled_output"][0])
    for f in (6, 7):  # from the last keyframe on: its prompt
        assert torch.equal(cond[f], dog["cond"][0]) and torch.equal(extra["pooled_output"][f], dog["pooled_output"][0])
    torch.testing.assert_close(cond[4], (cat["cond"][0] + dog["cond"][0]) / 2)
    torch.testing.assert_close(extra["pooled_output"][4], (cat["pooled_output"][0] + dog["pooled_output"][0]) / 2)


def test_hold_cuts_at_keyframes_and_pre_app_text_wrap_every_prompt(clip):
    cond, _ = travel(clip, "0: a cat\n3: a dog", 5, "hold", pre_text="masterpiece,", app_text="4k")
    cat, dog = encode(clip, "masterpiece, a cat, 4k")["cond"][0], encode(clip, "masterpiece, a dog, 4k")["cond"][0]
    assert [torch.equal(c, cat) for c in cond] == [True, True, True, False, False]
    assert [torch.equal(c, dog) for c in cond] == [False, False, False, True, True]


def test_a_prompt_longer_than_77_tokens_blends_with_a_short_one(clip):
    long_prompt = ", ".join(["a very detailed cat"] * 20)
    cond, _ = travel(clip, f'"0": "a dog",\n"2": "{long_prompt}"', 3)
    dog, cat = encode(clip, "a dog")["cond"][0], encode(clip, long_prompt)["cond"][0]
    assert cat.shape[0] == 154 and cond.shape == (3, 154, 32)
    assert torch.equal(cond[0], torch.cat([dog, dog])) and torch.equal(cond[2], cat)  # the 77 tokens, twice
    torch.testing.assert_close(cond[1], (torch.cat([dog, dog]) + cat) / 2)


def test_errors_name_the_line(clip):
    with pytest.raises(PromptScheduleError, match="line 2: frame 0 already has a prompt"):
        travel(clip, '"0": "a",\n"0": "b"', 16)
    with pytest.raises(PromptScheduleError, match="line 1: no ':'"):
        travel(clip, "a cat", 16)


def test_the_shipped_schedule_at_fewer_frames_drops_the_keyframes_past_the_clip(clip, caplog):
    text = '"0": "a cat",\n"4": "a dog",\n"8": "a bird",\n"12": "a fish"'
    with caplog.at_level(logging.WARNING):
        cond, _ = travel(clip, text, 6)
    cat, dog = encode(clip, "a cat")["cond"][0], encode(clip, "a dog")["cond"][0]
    assert cond.shape == (6, 77, 32) and "8 (line 3), 12 (line 4)" in caplog.text
    assert torch.equal(cond[4], dog) and torch.equal(cond[5], dog)  # holds: no blend toward "a bird"
    torch.testing.assert_close(cond[2], (cat + dog) / 2)


def test_one_line_json_and_a_tab_encode_like_the_plain_schedule(clip):
    plain, _ = travel(clip, '"0": "a cat sitting",\n"2": "a dog"', 3)
    pasted, _ = travel(clip, '{"0": "a cat\tsitting", "2": "a dog"}', 3)
    assert torch.equal(pasted, plain)


def test_prompts_of_many_lengths_are_padded_to_the_longest_not_their_multiple(clip):
    prompts = [", ".join(["a very detailed cat"] * n) for n in (1, 20, 40)]  # 1, 2 and 3 chunks: exact
    cond, _ = travel(clip, "\n".join(f'"{i}": "{p}"' for i, p in enumerate(prompts)), 3)
    assert cond.shape == (3, 462, 32)
    prompts = [", ".join(["a very detailed cat"] * n) for n in (74, 104)]  # 5 and 7 chunks: 35 is past 32
    cond, _ = travel(clip, "\n".join(f'"{i}": "{p}"' for i, p in enumerate(prompts)), 2)
    five = encode(clip, prompts[0])["cond"][0]
    assert five.shape[0] == 385 and cond.shape == (2, 539, 32)
    assert torch.equal(cond[0], torch.cat([five, five[:154]]))


# --- per-frame conds in the host's samplers ------------------------------------------------------------------

def spy(model):
    """A clone of model that records, per UNet call, the window (or None) and each chunk's c_crossattn, and
    skips the UNet (a zero prediction), to be quick."""
    calls = []

    def wrapper(apply_model, args):
        c = args["c"]
        window = c["transformer_options"].get("context_window")
        chunks = c["c_crossattn"].chunk(len(args["cond_or_uncond"]))
        calls.append((None if window is None else list(window.index_list), dict(zip(args["cond_or_uncond"], chunks))))
        return torch.zeros_like(args["input"])

    spied = model.clone()
    spied.set_model_unet_function_wrapper(wrapper)
    return spied, calls


def sample(model, positive, frames, seed=3, steps=2, cfg=5.0):
    torch.manual_seed(seed)
    noise = torch.randn(frames, 4, 8, 8)
    negative = [[torch.zeros(1, 77, 32), {}]]
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative,
                               torch.zeros_like(noise), seed=seed, disable_pbar=True)


def with_context_windows(model, length=4, overlap=1, schedule="standard_static"):
    """What the host's Context Windows (Manual) node does to a MODEL."""
    windowed = model.clone()
    windowed.model_options["context_handler"] = comfy.context_windows.IndexListContextHandler(
        context_schedule=comfy.context_windows.get_matching_context_schedule(schedule),
        fuse_method=comfy.context_windows.get_matching_fuse_method("pyramid"),
        context_length=length, context_overlap=overlap, context_stride=1, closed_loop=False, dim=0)
    comfy.context_windows.create_prepare_sampling_wrapper(windowed)
    return windowed


def test_the_unet_sees_frame_ks_embedding_for_frame_k(model):
    per_frame = torch.randn(5, 77, 32)
    spied, calls = spy(model)
    sample(spied, [[per_frame, {}]], 5)
    assert len(calls) == 2  # cond and uncond in one batch per step
    for window, chunks in calls:
        assert window is None and torch.equal(chunks[0], per_frame)  # not repeated, not reordered
        assert torch.equal(chunks[1], torch.zeros(5, 77, 32))        # the negative, repeated to the batch


def test_a_per_frame_batch_samples_like_each_frame_alone(model):
    torch.manual_seed(1)
    a, b = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    run = lambda positive: sample(model, positive, 2, steps=1)  # noqa: E731
    both, only_a, only_b = run([[torch.cat([a, b]), {}]]), run([[a, {}]]), run([[b, {}]])
    torch.testing.assert_close(both, torch.cat([only_a[:1], only_b[1:]]), rtol=1e-4, atol=1e-3)  # rounding only
    assert not torch.allclose(only_a[0], only_b[0], atol=1e-3)  # the conds do matter


def test_the_sampler_refuses_a_schedule_whose_frames_is_not_the_latent_batch(model, clip):
    """check_frames, which every model with a motion module carries (an OUTER_SAMPLE wrapper), in the host's
    sampler: without it the host repeats a 4-frame schedule over 8 latents without a word."""
    from adm.model_patcher.motion_patcher import KEY, MotionOptions, apply_motion_module
    from comfy.patcher_extension import WrappersMP
    from unets import tiny_motion_patcher

    spied, calls = spy(model)  # motion scale 0: the module is on the model but changes nothing
    checked = apply_motion_module(spied, tiny_motion_patcher(), MotionOptions(scale=0.0, schedule="use existing"))
    assert check_frames in checked.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY)
    (positive,) = PromptTravel().encode(clip, '"0": "a cat",\n"3": "a dog"', 4, "linear")
    with pytest.raises(PromptScheduleError, match=r"frames is 4, but the latent batch has 8 frames.*Set Prompt "
                                                  r"Travel's frames to 8 \(the latent's batch size\)"):
        sample(checked, positive, 8, steps=1)
    assert not calls
    (positive,) = PromptTravel().encode(clip, '"0": "a cat",\n"3": "a dog"', 8, "linear")
    sample(checked, positive, 8, steps=1)
    assert torch.equal(calls[0][1][0], positive[0][0])


def windows_and_conds(model, frames=8, steps=2):
    per_frame = torch.randn(frames, 77, 32)
    spied, calls = spy(model)
    sample(spied, [[per_frame, {}]], frames, steps=steps)
    return per_frame, calls


def test_the_host_alone_fails_frames_in_the_batch(model):
    """Host 0.3.75, dim 0: the step lookup compares the schedule with the per-frame timesteps (so it only runs
    when frames == steps + 1), and then every window gets the first frames' conds."""
    windowed = with_context_windows(model)
    try:
        windows_and_conds(windowed, frames=8, steps=2)
    except RuntimeError as error:
        assert "must match the size" in str(error)
    else:
        pytest.skip("this host finds the step of a batch of frames itself")
    per_frame, calls = windows_and_conds(windowed, frames=8, steps=7)
    assert [w for w, _ in calls[:3]] == [[0, 1, 2, 3], [3, 4, 5, 6], [4, 5, 6, 7]]
    if torch.equal(calls[1][1][0], per_frame[[3, 4, 5, 6]]):
        pytest.skip("this host cuts per-frame conds to the window itself")
    assert all(torch.equal(chunks[0], per_frame[:4]) for _, chunks in calls)


@pytest.mark.parametrize("schedule", ["standard_static", "standard_uniform", "looped_uniform", "batched"])
def test_with_window_cond_slicing_each_window_gets_its_own_frames_conds(model, schedule):
    windowed = with_context_windows(model, schedule=schedule)
    adopt(windowed)
    per_frame, calls = windows_and_conds(windowed, frames=9)
    assert len(calls) >= 6 and all(w is not None for w, _ in calls)
    for window, chunks in calls:
        assert torch.equal(chunks[0], per_frame[window])
        assert torch.equal(chunks[1], torch.zeros(len(window), 77, 32))


def test_a_model_with_a_motion_module_makes_the_stock_context_windows_node_right(model):
    from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
    from unets import tiny_motion_config, tiny_motion_patcher

    animated = apply_motion_module(model, tiny_motion_patcher(tiny_motion_config(max_frames=4)),
                                   MotionOptions(scale=0.0, schedule="use existing"))
    per_frame, calls = windows_and_conds(with_context_windows(animated))
    assert [torch.equal(chunks[0], per_frame[w]) for w, chunks in calls] == [True] * 6  # 3 windows, 2 steps


def test_our_context_windows_node_gives_each_window_its_own_frames_conds(model):
    from adm.nodes.context import ContextWindows

    (windowed,) = ContextWindows().apply(model, 4, 1, "standard_static", "pyramid", False)
    per_frame, calls = windows_and_conds(windowed)
    assert [w for w, _ in calls] == [[0, 1, 2, 3], [3, 4, 5, 6], [4, 5, 6, 7]] * 2
    assert all(torch.equal(chunks[0], per_frame[w]) for w, chunks in calls)


def test_sdxl_style_pooled_outputs_are_cut_to_the_window_too():
    import comfy.conds
    from adm.model_patcher.context_windows import make_handler

    handler = make_handler(4, 1, "standard_static", "pyramid")
    window = comfy.context_windows.IndexListContextWindow([4, 5, 6, 7])
    cond = {"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(torch.arange(8.0).view(8, 1, 1)),
                            "y": comfy.conds.CONDRegular(torch.arange(8.0).view(8, 1)),
                            "single": comfy.conds.CONDRegular(torch.ones(1, 3))}}
    out = handler.get_resized_cond([cond], torch.zeros(8, 4, 2, 2), window)[0]["model_conds"]
    assert out["c_crossattn"].cond.flatten().tolist() == [4, 5, 6, 7]
    assert out["y"].cond.flatten().tolist() == [4, 5, 6, 7]
    assert out["single"] is cond["model_conds"]["single"]
    assert cond["model_conds"]["y"].cond.shape[0] == 8  # the sampler's own conds are not changed


def adopt(model):
    """What a model with a motion module does with the stock node's handler (these tests use the UNet alone)."""
    from comfy.patcher_extension import WrappersMP
    model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "test", adopt_stock_handler)


@pytest.mark.parametrize("node", [PromptTravel, SamplingOptions])
def test_nodes_explain_every_input_and_output(node):
    inputs = {**node.INPUT_TYPES()["required"], **node.INPUT_TYPES().get("optional", {})}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES) and node.DESCRIPTION
    assert node.CATEGORY.startswith("AnimateDiff Motion/")
    assert list(inputs)[:1] == ["clip" if node is PromptTravel else "model"]

"""Prompt travel's schedule: reading the keyframe text, and blending per-keyframe embeddings into frames."""
import logging

import pytest
import torch

from adm.model_patcher.prompt_schedule import (PromptScheduleError, blend, common_token_length, frame_blend,
                                               join_prompt, parse_schedule)


def pairs(text, frames=None):
    return [(k.frame, k.prompt) for k in parse_schedule(text, frames)]


def test_the_batch_prompt_schedule_format():
    text = '"0" :"a cat in a garden",\n"16": "a dog in the snow"\n'
    assert pairs(text) == [(0, "a cat in a garden"), (16, "a dog in the snow")]


@pytest.mark.parametrize("text", [
    '"0": "a cat, sitting",\n"8": "a dog"',             # commas inside quoted prompts
    '0: a cat, sitting,\n8: a dog',                     # bare frames and prompts, trailing comma dropped
    "'0': 'a cat, sitting'\n'8': 'a dog',",             # single quotes
    '{\n  "0": "a cat, sitting",\n  "8": "a dog"\n}',   # written as a JSON object
    '{"0": "a cat, sitting",\n"8": "a dog"}',           # braces on the keyframe lines
    '\n# comment\n"8": "a dog",\n\n// another\n"0": "a cat, sitting",\n',  # comments, blank lines, any order
])
def test_accepted_variants(text):
    assert pairs(text) == [(0, "a cat, sitting"), (8, "a dog")]


def test_prompt_details_survive():
    assert pairs('"0": "(cat:1.2), \\"quoted\\" words"') == [(0, '(cat:1.2), "quoted" words')]
    assert pairs("0: (cat:1.2) on a mat") == [(0, "(cat:1.2) on a mat")]
    assert pairs('"4": ""') == [(4, "")]


@pytest.mark.parametrize("text, line, why", [
    ('"0": "a cat",\n"8" "a dog"', 2, "no ':'"),
    ('"0": "a cat",\n\na dog', 3, "no ':'"),
    ('"0": "a cat",\n"x": "a dog"', 2, "'x' is not a frame number"),
    ('"-4": "a cat"', 1, "'-4' is not a frame number"),
    ('"0": "a cat', 1, 'the prompt.s opening quote " has no closing quote'),
    ('"0": "a cat" and more', 1, "unexpected text after the prompt"),
    ('"0": "a cat",\n"0": "a dog"', 2, r"frame 0 already has a prompt \(line 1\)"),
])
def test_malformed_lines_are_named_with_the_expected_format(text, line, why):
    with pytest.raises(PromptScheduleError, match=rf"line {line}: {why}") as error:
        parse_schedule(text)
    assert '"0": "a cat in a garden"' in str(error.value)  # the expected format, with an example


def test_keyframes_past_the_clip_are_dropped_with_a_warning_and_the_last_one_inside_holds(caplog):
    text = '"0": "a",\n"4": "b",\n"16": "c"'
    with caplog.at_level(logging.WARNING):
        assert pairs(text, frames=16) == [(0, "a"), (4, "b")]
    assert "ignored keyframe(s) 16 (line 3) at or past the end of the clip (frames is 16)" in caplog.text
    # No blending toward the dropped keyframe: frames after the last kept one are exactly its prompt.
    assert frame_blend([k.frame for k in parse_schedule(text, 16)], 16)[4:] == [(1, 1, 0.0)] * 12
    caplog.clear()
    assert pairs('"0": "a",\n"15": "b"', frames=16) == [(0, "a"), (15, "b")] and not caplog.records
    with pytest.raises(PromptScheduleError, match=r"every keyframe is at or past the end of the clip: frames is 4"):
        parse_schedule('"4": "a",\n"8": "b"', frames=4)


@pytest.mark.parametrize("text", [
    '{"0": "a cat, sitting", "8": "a dog"}',            # one-line JSON
    '"0": "a cat, sitting", "8": "a dog",',             # several quoted keyframes on a line
    '"0": "a cat,\tsitting",\n"8": "a dog"',           # a TAB inside a quoted prompt
    "0: a cat,\x0c sitting\n8: a dog",                 # a form feed in a bare prompt: not a line break
])
def test_pasted_forms(text):
    assert [(f, " ".join(p.split())) for f, p in pairs(text)] == [(0, "a cat, sitting"), (8, "a dog")]


def test_an_empty_schedule_is_refused():
    with pytest.raises(PromptScheduleError, match="no keyframes"):
        parse_schedule("\n  \n# nothing\n")


def test_pre_and_app_text():
    assert join_prompt("masterpiece, best quality,", "a cat", ", 4k") == "masterpiece, best quality, a cat, 4k"
    assert join_prompt("", "a cat", "") == "a cat"
    assert join_prompt("style", "", "") == "style"


def test_frames_before_between_and_after_keyframes():
    plan = frame_blend([2, 6], 9)
    assert plan[:3] == [(0, 0, 0.0)] * 3                 # before and at the first keyframe
    assert plan[3:6] == [(0, 1, 0.25), (0, 1, 0.5), (0, 1, 0.75)]
    assert plan[6:] == [(1, 1, 0.0)] * 3                 # at and after the last keyframe
    assert frame_blend([2, 6], 9, "hold") == [(0, 0, 0.0)] * 6 + [(1, 1, 0.0)] * 3
    assert frame_blend([0], 3) == [(0, 0, 0.0)] * 3
    with pytest.raises(ValueError, match="interpolation"):
        frame_blend([0], 3, "cubic")


def test_keyframes_are_exact_and_halfway_is_the_mean():
    torch.manual_seed(0)
    a, b = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    out = blend([a, b], frame_blend([0, 4], 6))
    assert out.shape == (6, 77, 8)
    assert torch.equal(out[0], a[0]) and torch.equal(out[4], b[0]) and torch.equal(out[5], b[0])
    torch.testing.assert_close(out[2], (a[0] + b[0]) / 2)
    torch.testing.assert_close(out[1], 0.75 * a[0] + 0.25 * b[0])


def test_long_prompts_are_padded_by_repeating_to_a_common_length():
    torch.manual_seed(0)
    short, long = torch.randn(1, 77, 8), torch.randn(1, 154, 8)
    padded = common_token_length([short, long])
    assert [p.shape[1] for p in padded] == [154, 154]
    assert torch.equal(padded[0][:, :77], short) and torch.equal(padded[0][:, 77:], short)
    assert padded[1] is long
    assert [p.shape[1] for p in common_token_length([short, long, torch.randn(1, 231, 8)])] == [462] * 3


def test_padding_is_bounded_past_the_limit_it_repeats_to_the_longest(caplog):
    chunks = [torch.full((1, 77, 1), float(i)) for i in range(7)]
    five, seven = torch.cat(chunks[:5], 1), torch.cat(chunks, 1)
    with caplog.at_level(logging.WARNING):
        padded = common_token_length([five, seven], limit=32 * 77)  # exact would be 35 chunks
    assert [p.shape[1] for p in padded] == [7 * 77] * 2 and padded[1] is seven
    assert torch.equal(padded[0], torch.cat([five, chunks[0], chunks[1]], 1))  # repeated from its start
    assert "padded to 539" in caplog.text and "need 2695 tokens" in caplog.text
    assert common_token_length([five, seven], limit=35 * 77)[0].shape[1] == 35 * 77  # within it: exact
    lengths = [p.shape[1] for p in common_token_length([torch.zeros(1, 77 * n, 1) for n in range(1, 13)])]
    assert lengths == [12 * 77] * 12  # not the 27720 chunks of their least common multiple


def test_repeat_padding_does_not_change_cross_attention():
    torch.manual_seed(0)
    q, kv = torch.randn(1, 5, 8), torch.randn(1, 77, 8)
    padded = common_token_length([kv, torch.randn(1, 231, 8)])[0]
    attend = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(attend(q, padded, padded), attend(q, kv, kv))

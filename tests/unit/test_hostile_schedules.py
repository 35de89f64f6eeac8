"""Hostile and careless prompt schedules, one row each: what a user pastes, the clip length, and what must come of
it: the keyframes kept, the tokens per frame and any warning, or an error naming the line and the fix.

The text encoder is a stand-in that encodes a prompt of n x 75 words to n chunks of 77 tokens of width 1, as the
host's CLIP does, so the rows run in milliseconds and a padding blow-up shows as a shape, not as an hour.
"""
import logging
import re
from typing import NamedTuple

import pytest
import torch

from adm.model_patcher.prompt_schedule import FRAMES_KEY, PromptScheduleError, check_frames, parse_schedule
from adm.nodes.prompt_travel import encode_schedule


class StandInClip:
    def tokenize(self, text):
        return text

    def encode_from_tokens(self, text, return_pooled=True, return_dict=True):
        chunks = max(1, -(-len(text.split()) // 75))
        return {"cond": torch.zeros(1, 77 * chunks, 1), "pooled_output": torch.zeros(1, 4)}


def words(chunks):
    """A prompt that encodes to ``chunks`` chunks of 77 tokens."""
    return " ".join(["cat"] * 75 * chunks)


class Ok(NamedTuple):
    keyframes: list            # (frame, prompt) kept, in order
    tokens: int = 77           # per frame, after padding
    warns: str | None = None   # a fragment of the logged warning


CAT_DOG = [(0, "a cat"), (8, "a dog")]
SEASONS = '"0": "spring",\n"16": "summer",\n"32": "autumn",\n"48": "winter"'  # example_workflows/prompt_travel.json's

HOSTILE = [
    # --- forms people paste -------------------------------------------------------------------------------------
    ("json one line", '{"0": "a cat", "8": "a dog"}', 16, Ok(CAT_DOG)),
    ("json one line, no braces", '"0": "a cat", "8": "a dog",', 16, Ok(CAT_DOG)),
    ("json multi-line", '{\n    "0": "a cat",\n    "8": "a dog"\n}\n', 16, Ok(CAT_DOG)),
    ("json, comment before the brace", '# my clip\n{\n"0": "a cat",\n"8": "a dog"\n}', 16, Ok(CAT_DOG)),
    ("pasted lines, trailing commas", '"0" :"a cat",\n"8" :"a dog",\n', 16, Ok(CAT_DOG)),
    ("pasted lines in braces, comma before }", '{"0": "a cat",\n"8": "a dog",}', 16, Ok(CAT_DOG)),
    ("bare prompt ending in }", "0: a cat\n8: a {dog}", 16, Ok([(0, "a cat"), (8, "a {dog}")])),
    ("CRLF line ends", '"0": "a cat",\r\n"8": "a dog"\r\n', 16, Ok(CAT_DOG)),
    # --- control characters -------------------------------------------------------------------------------------
    ("TAB inside a quoted prompt", '"0": "a\tcat",\n"8": "a dog"', 16, Ok(CAT_DOG)),
    ("form feed inside a quoted prompt", '"0": "a\x0ccat",\n"8": "a dog"', 16, Ok(CAT_DOG)),
    ("BEL inside a quoted prompt", '"0": "a\x07cat", "8": "a dog"', 16, Ok(CAT_DOG)),
    ("TAB inside a single-quoted prompt", "'0': 'a\tcat'\n'8': 'a dog'", 16, Ok(CAT_DOG)),
    ("escaped \\t inside a quoted prompt", '"0": "a\\tcat",\n"8": "a dog"', 16, Ok(CAT_DOG)),
    ("line separator inside a quoted prompt", '"0": "a\u2028cat"', 16, Ok([(0, "a\u2028cat")])),
    # --- keyframes past the clip: dropped, the last one inside holds ------------------------------------------
    ("shipped schedule, frames 20", SEASONS, 20,
     Ok([(0, "spring"), (16, "summer")], warns=r"ignored keyframe\(s\) 32 \(line 3\), 48 \(line 4\).*frames is 20")),
    ("shipped schedule, frames 16", SEASONS, 16, Ok([(0, "spring")], warns=r"16 \(line 2\), 32 \(line 3\)")),
    ("every keyframe past the clip", '"16": "a dog",\n"99999999999999999999": "x"', 8,
     r"every keyframe is at or past the end of the clip: frames is 8.*16 \(line 1\).*Raise frames"),
    # --- prompts of different lengths: padded, bounded --------------------------------------------------------
    ("2 and 3 chunks: exact padding", f'"0": "{words(2)}",\n"1": "{words(3)}"', 2, Ok([(0, words(2)), (1, words(3))],
                                                                                      tokens=6 * 77)),
    ("1..12 chunks: padded to the longest", "\n".join(f'"{i}": "{words(i + 1)}"' for i in range(12)), 12,
     Ok([(i, words(i + 1)) for i in range(12)], tokens=12 * 77, warns="padded to 924")),
    ("33 chunks: refused", f'"0": "a cat",\n"1": "{words(33)}"', 2,
     r"line 2: the prompt of frame 1 .*encodes to 2541 tokens; .*at most 2464 \(32 chunks of 77\)"),
    # --- mistakes, named with their line ----------------------------------------------------------------------
    ("unclosed quote", '"0": "a cat', 16, r"line 1: the prompt's opening quote \" has no closing quote"),
    ("bad key in one-line json", '{"0": "a cat", "x": "a dog"}', 16, r"line 1: 'x' is not a frame number"),
    ("missing ':' inside a json object", '{\n"0": "a cat",\n"8" "a dog"\n}', 16, r"line 3: no ':'"),
    ("duplicate frame on one line", '"0": "a", "0": "b"', 16, r"line 1: frame 0 already has a prompt \(line 1\)"),
    ("text after a comma", '"0": "a cat", and more', 16, r"line 1: unexpected text after the prompt: 'and more'"),
    ("invalid escape in a quoted prompt", '"0": "a \\(cat\\)"', 16, r"line 1: the double-quoted prompt is not a "
                                                                    r"valid string: Invalid \\escape"),
    ("negative frame", '"-4": "a cat"', 16, r"line 1: '-4' is not a frame number"),
    ("empty", "", 16, "no keyframes"),
    ("empty json object", "{}", 16, "no keyframes"),
    ("comments only", "# nothing\n// here\n", 16, "no keyframes"),
]


@pytest.mark.parametrize("text, frames, expected", [row[1:] for row in HOSTILE], ids=[row[0] for row in HOSTILE])
def test_hostile_schedule(text, frames, expected, caplog):
    if isinstance(expected, str):
        with pytest.raises(PromptScheduleError, match=expected):
            encode_schedule(StandInClip(), text, frames)
        return
    with caplog.at_level(logging.WARNING):
        kept = [(k.frame, k.prompt) for k in parse_schedule(text, frames)]
        cond, extra = encode_schedule(StandInClip(), text, frames)[0]
    assert kept == expected.keyframes
    assert cond.shape == (frames, expected.tokens, 1) and extra["pooled_output"].shape == (frames, 4)
    if expected.warns:
        assert any(re.search(expected.warns, r.getMessage()) for r in caplog.records), caplog.text
    else:
        assert not caplog.records, caplog.text


class _Guider:
    def __init__(self, conds):
        self.conds = conds


class _Executor:
    """What the host passes an OUTER_SAMPLE wrapper: callable, with the CFGGuider as class_obj."""

    def __init__(self, conds):
        self.class_obj = _Guider(conds)

    def __call__(self, noise, *args, **kwargs):
        return "sampled"


@pytest.mark.parametrize("frames, batch, expected", [
    (16, 16, None),
    (8, 16, r"frames is 8, but the latent batch has 16 frames, so the sampler would repeat the schedule from "
            r"frame 8 on. Set Prompt Travel's frames to 16"),
    (20, 16, r"would drop its last 4 frames. Set Prompt Travel's frames to 16"),
])
def test_frames_must_be_the_latent_batch_when_sampling(frames, batch, expected):
    ((cond, extra),) = encode_schedule(StandInClip(), '"0": "a cat"', frames)
    positive = [{"cross_attn": cond, **extra}]  # as the sampler holds it (comfy.sampler_helpers.convert_cond)
    executor = _Executor({"positive": positive, "negative": [{"cross_attn": torch.zeros(1, 77, 1)}]})
    noise = torch.zeros(batch, 4, 2, 2)
    if expected is None:
        assert check_frames(executor, noise) == "sampled" and positive[0][FRAMES_KEY] == frames
    else:
        with pytest.raises(PromptScheduleError, match=expected):
            check_frames(executor, noise)

"""Prompt travel: a keyframed prompt schedule turned into one text embedding per frame.

The schedule is the text format users know from batch prompt schedules::

    "0": "a cat in a garden",
    "16": "a dog in the snow"

(quoted or bare frame numbers, double- or single-quoted or bare prompts, trailing commas optional, an optional
``{`` ... ``}`` around it all, blank lines and ``#`` / ``//`` comment lines ignored).

The host samples a CONDITIONING whose embedding batch equals the latent batch frame by frame (it repeats a
batch of 1, keeps a batch of the same size, and truncates or repeats any other). Inside context windows each
window gets its own frames' embeddings (model_patcher/context_windows.py).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

INTERPOLATIONS = ("linear", "hold")
LINE_FORMAT = '"<frame>": "<prompt>",   e.g.  "0": "a cat in a garden",   (or  0: a cat in a garden)'


class PromptScheduleError(ValueError):
    """A schedule that cannot be read; the message names the line and the expected format."""


@dataclass(frozen=True)
class Keyframe:
    frame: int
    prompt: str
    line: int  # 1-based line number in the schedule text


_KEY = re.compile(r"""^\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^:"']*?))\s*:\s*(?P<rest>.*)$""", re.S)


def _error(line_no: int, line: str, why: str) -> PromptScheduleError:
    return PromptScheduleError(f"Prompt schedule line {line_no}: {why}\n  {line.strip()}\nExpected one keyframe per "
                               f"line: {LINE_FORMAT}")


def _read_prompt(rest: str, line_no: int, line: str) -> str:
    rest = rest.strip()
    if rest[:1] == '"':
        # A JSON string literal (so \" and \\ escapes work), then at most a comma.
        try:
            prompt, end = json.JSONDecoder().raw_decode(rest)
        except json.JSONDecodeError:
            raise _error(line_no, line, "the prompt's opening quote \" has no closing quote.") from None
        tail = rest[end:].strip()
    elif rest[:1] == "'":
        end = rest.find("'", 1)
        if end < 0:
            raise _error(line_no, line, "the prompt's opening quote ' has no closing quote.")
        prompt, tail = rest[1:end], rest[end + 1:].strip()
    else:
        prompt, tail = (rest[:-1] if rest.endswith(",") else rest), ""
    if tail not in ("", ","):
        raise _error(line_no, line, f"unexpected text after the prompt: {tail!r}.")
    return prompt.strip()


def parse_schedule(text: str, frames: int | None = None) -> list[Keyframe]:
    """The keyframes of a schedule, sorted by frame. ``frames`` (the clip length), when given, bounds them."""
    keyframes: dict[int, Keyframe] = {}
    lines = text.splitlines()
    filled = [i for i, s in enumerate(lines) if s.strip()]
    for i, raw in enumerate(lines):
        line_no, line = i + 1, raw.strip()
        if filled and i == filled[0] and line.startswith("{"):
            line = line[1:].strip()  # the schedule written as a JSON object: its opening brace...
        if filled and i == filled[-1] and line.endswith("}"):
            line = line[:-1].strip()  # ...and its closing one
        if not line or line.startswith("#") or line.startswith("//"):
            continue
        match = _KEY.match(line)
        if match is None:
            raise _error(line_no, raw, "no ':' between a frame number and a prompt.")
        key = next(g for g in (match["dq"], match["sq"], match["bare"]) if g is not None).strip()
        if not re.fullmatch(r"\d+", key):
            raise _error(line_no, raw, f"{key!r} is not a frame number (a whole number, 0 or more).")
        frame = int(key)
        prompt = _read_prompt(match["rest"], line_no, raw)
        if frame in keyframes:
            raise _error(line_no, raw, f"frame {frame} already has a prompt (line {keyframes[frame].line}).")
        if frames is not None and frame >= frames:
            raise _error(line_no, raw, f"keyframe {frame} is beyond the clip: frames is {frames}, so the last "
                                       f"frame is {frames - 1}. Raise frames or move the keyframe.")
        keyframes[frame] = Keyframe(frame, prompt, line_no)
    if not keyframes:
        raise PromptScheduleError(f"The prompt schedule has no keyframes. Expected one per line: {LINE_FORMAT}")
    return [keyframes[f] for f in sorted(keyframes)]


def join_prompt(pre_text: str, prompt: str, app_text: str) -> str:
    """``pre_text, prompt, app_text``, without doubled commas or empty parts."""
    parts = [pre_text.strip().rstrip(",").strip(), prompt.strip(), app_text.strip().lstrip(",").strip()]
    return ", ".join(p for p in parts if p)


def frame_blend(keyframe_frames: list[int], frames: int, interpolation: str = "linear") -> list[tuple[int, int, float]]:
    """For each frame: (index of keyframe a, index of keyframe b, t), the frame being (1 - t) * a + t * b.

    Frames before the first keyframe take the first one, frames after the last the last one; at a keyframe
    t is 0 and a is that keyframe. "hold" keeps each keyframe's prompt until the next keyframe (t is always 0).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}.")
    out = []
    k = 0
    for f in range(frames):
        while k + 1 < len(keyframe_frames) and keyframe_frames[k + 1] <= f:
            k += 1
        if f <= keyframe_frames[0]:
            out.append((0, 0, 0.0))
        elif k + 1 == len(keyframe_frames) or interpolation == "hold" or f == keyframe_frames[k]:
            out.append((k, k, 0.0))
        else:
            a, b = keyframe_frames[k], keyframe_frames[k + 1]
            out.append((k, k + 1, (f - a) / (b - a)))
    return out


def common_token_length(embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bring [1, tokens, C] embeddings of different lengths (prompts over 77 tokens come in 77-token chunks) to
    one length by repeating each along the tokens up to the least common multiple of the lengths.

    Repeating every key and value of cross-attention the same number of times leaves its output unchanged (the
    host pads its own cond/uncond batches this way), so each padded prompt still means the same thing.
    """
    length = math.lcm(*(e.shape[1] for e in embeddings))
    return [e if e.shape[1] == length else e.repeat(1, length // e.shape[1], 1) for e in embeddings]


def blend(values: list[torch.Tensor], plan: list[tuple[int, int, float]]) -> torch.Tensor:
    """Per-frame values [frames, ...] from per-keyframe values [1, ...]: keyframes are copied exactly, frames
    between two keyframes are (1 - t) * a + t * b (computed in float32)."""
    out = []
    for a, b, t in plan:
        if t == 0.0:
            out.append(values[a])
        else:
            va, vb = values[a].float(), values[b].float()
            out.append(((1.0 - t) * va + t * vb).to(values[a].dtype))
    return torch.cat(out)

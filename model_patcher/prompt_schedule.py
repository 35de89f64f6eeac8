"""Prompt travel: a keyframed prompt schedule turned into one text embedding per frame.

The schedule is the text format users know from batch prompt schedules, in the forms people paste::

    "0": "a cat in a garden",
    "16": "a dog in the snow"

    {"0": "a cat in a garden", "16": "a dog in the snow"}

(quoted or bare frame numbers, double- or single-quoted or bare prompts, trailing commas optional, an optional
``{`` ... ``}`` around it all, several quoted keyframes on one line separated by commas, blank lines and ``#`` /
``//`` comment lines ignored). Keyframes at or past the clip's end are ignored with a warning.

The host samples a CONDITIONING whose embedding batch equals the latent batch frame by frame (it repeats a
batch of 1, keeps a batch of the same size, and truncates or repeats any other: comfy.utils.repeat_to_batch_size
via CONDRegular.process_cond), so a schedule of the wrong length would loop or lose frames without a word:
``check_frames`` refuses that when sampling. Inside context windows each window gets its own frames' embeddings
(model_patcher/context_windows.py).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass

import torch

INTERPOLATIONS = ("linear", "hold")
LINE_FORMAT = '"<frame>": "<prompt>",   e.g.  "0": "a cat in a garden",   (or  0: a cat in a garden)'
# At most 32 chunks of 77 tokens per prompt and per frame: far past any prompt people write, while a 16-frame
# SDXL clip's embeddings stay near 300 MB in float32.
MAX_TOKENS = 32 * 77
# Set on Prompt Travel's conditioning (a plain int in the cond dict, which the host carries along untouched):
# the number of per-frame embeddings, for check_frames.
FRAMES_KEY = "adm_prompt_travel_frames"


class PromptScheduleError(ValueError):
    """A schedule that cannot be read; the message names the line and the expected format."""


@dataclass(frozen=True)
class Keyframe:
    frame: int
    prompt: str
    line: int  # 1-based line number in the schedule text


_KEY = re.compile(r"""^\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^:"']*?))\s*:\s*(?P<rest>.*)$""", re.S)
# Lines end only at real line breaks: str.splitlines() would also split at a form feed or other control
# character pasted inside a quoted prompt, and report the quote as unclosed.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _error(line_no: int, line: str, why: str) -> PromptScheduleError:
    return PromptScheduleError(f"Prompt schedule line {line_no}: {why}\n  {line.strip()}\nExpected one keyframe per "
                               f"line: {LINE_FORMAT}")


def _read_prompt(rest: str, line_no: int, line: str) -> tuple[str, str]:
    """The prompt at the start of ``rest``, and what follows a quoted prompt's comma (another keyframe, or "")."""
    rest = rest.strip()
    if rest[:1] == '"':
        # A JSON string literal (so \" and \\ escapes work); strict=False lets a TAB or other control character
        # pasted inside it through, as any text editor would show it.
        try:
            prompt, end = json.JSONDecoder(strict=False).raw_decode(rest)
        except json.JSONDecodeError as error:
            if error.msg.startswith("Unterminated string"):
                raise _error(line_no, line, "the prompt's opening quote \" has no closing quote.") from None
            raise _error(line_no, line, f"the double-quoted prompt is not a valid string: {error.msg} at "
                                        f"character {error.pos + 1} (write a backslash as \\\\, or use single "
                                        f"quotes).") from None
        tail = rest[end:].strip()
    elif rest[:1] == "'":
        end = rest.find("'", 1)
        if end < 0:
            raise _error(line_no, line, "the prompt's opening quote ' has no closing quote.")
        prompt, tail = rest[1:end], rest[end + 1:].strip()
    else:  # a bare prompt runs to the end of the line: its commas are part of it
        prompt, tail = (rest[:-1] if rest.endswith(",") else rest), ""
    if tail and not tail.startswith(","):
        raise _error(line_no, line, f"unexpected text after the prompt: {tail!r}.")
    # Control characters become spaces: the tokenizer reads them as word breaks anyway.
    return _CONTROL.sub(" ", prompt).strip(), tail[1:].strip()


def _line_keyframes(line: str, line_no: int, raw: str):
    """(frame, prompt) for each keyframe on a line: one, or several quoted ones separated by commas."""
    rest, first = line, True
    while rest:
        match = _KEY.match(rest)
        if match is None:
            raise _error(line_no, raw, "no ':' between a frame number and a prompt." if first else
                         f"unexpected text after the prompt: {rest!r}.")
        key = next(g for g in (match["dq"], match["sq"], match["bare"]) if g is not None).strip()
        if not re.fullmatch(r"\d+", key):
            raise _error(line_no, raw, f"{key!r} is not a frame number (a whole number, 0 or more).")
        prompt, rest = _read_prompt(match["rest"], line_no, raw)
        yield int(key), prompt
        first = False


def _is_comment(line: str) -> bool:
    return line.startswith("#") or line.startswith("//")


def parse_schedule(text: str, frames: int | None = None) -> list[Keyframe]:
    """The keyframes of a schedule, sorted by frame.

    ``frames`` (the clip length), when given, drops keyframes at or past the clip's end with a warning: the
    last keyframe inside the clip holds to its end (frames before it do not blend toward a dropped keyframe).
    """
    keyframes: dict[int, Keyframe] = {}
    lines = _LINE_BREAK.split(text)
    content = [i for i, s in enumerate(lines) if s.strip() and not _is_comment(s.strip())]
    # The schedule written as a JSON object: strip its braces (as a pair, so a bare prompt may end with "}").
    braced = bool(content) and lines[content[0]].strip().startswith("{") and lines[content[-1]].strip().endswith("}")
    for i, raw in enumerate(lines):
        line_no, line = i + 1, raw.strip()
        if braced and i == content[0]:
            line = line[1:].strip()
        if braced and i == content[-1]:
            line = line[:-1].strip()
        if not line or _is_comment(line):
            continue
        for frame, prompt in _line_keyframes(line, line_no, raw):
            if frame in keyframes:
                raise _error(line_no, raw, f"frame {frame} already has a prompt (line {keyframes[frame].line}).")
            keyframes[frame] = Keyframe(frame, prompt, line_no)
    if not keyframes:
        raise PromptScheduleError(f"The prompt schedule has no keyframes. Expected one per line: {LINE_FORMAT}")
    ordered = [keyframes[f] for f in sorted(keyframes)]
    if frames is None:
        return ordered
    kept, past = [k for k in ordered if k.frame < frames], [k for k in ordered if k.frame >= frames]
    named = ", ".join(f"{k.frame} (line {k.line})" for k in past)
    if not kept:
        raise PromptScheduleError(f"Prompt schedule: every keyframe is at or past the end of the clip: frames is "
                                  f"{frames}, so the last frame is {frames - 1}; keyframes {named}. Raise frames "
                                  f"or put a keyframe at frame 0.")
    if past:
        logging.warning("Prompt Travel: ignored keyframe(s) %s at or past the end of the clip (frames is %d); the "
                        "prompt of keyframe %d holds to the last frame. Raise frames to use them.",
                        named, frames, kept[-1].frame)
    return kept


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


def common_token_length(embeddings: list[torch.Tensor], limit: int = MAX_TOKENS) -> list[torch.Tensor]:
    """Bring [1, tokens, C] embeddings of different lengths (prompts over 77 tokens come in 77-token chunks) to
    one length, at most ``max(limit, longest)`` tokens, by repeating each along the tokens.

    The host's own rule for conds of different lengths (comfy/conds.py, CONDCrossAttn.concat) repeats each to the
    least common multiple of the lengths: every key and value of cross-attention then appears the same number of
    times, which leaves its output unchanged. We do the same while that multiple stays within ``limit``. Past it
    (chunk counts 1..12 would need 27720 chunks; the host itself then runs the conds apart, CONDCrossAttn.can_concat,
    which one batch of frames cannot) each is repeated from its start to the longest length: exact for lengths
    that divide it, and otherwise a prompt's first chunks weigh a little more, which a warning says.
    """
    lengths = [e.shape[1] for e in embeddings]
    exact, longest = math.lcm(*lengths), max(lengths)
    length = exact if exact <= limit else longest
    if length != exact:
        logging.warning("Prompt Travel: prompts of %s tokens are padded to %d by repeating each from its start "
                        "(exact padding would need %d tokens per frame); the first chunks of prompts whose length "
                        "does not divide %d weigh a little more. Prompts of equal chunk counts avoid this.",
                        sorted(set(lengths)), longest, exact, longest)
    return [e if e.shape[1] == length else e.repeat(1, -(-length // e.shape[1]), 1)[:, :length] for e in embeddings]


def check_frames(executor, noise, *args, **kwargs):
    """OUTER_SAMPLE wrapper: refuse a Prompt Travel conditioning whose frame count is not the latent batch.

    Only here do the two meet: the node never sees the latent, and the host fits any cond batch to the latent
    batch by repeating or truncating it (comfy.utils.repeat_to_batch_size), so a schedule made for 8 frames
    would silently loop over 16. ``executor.class_obj`` is the host's CFGGuider, its ``conds`` the sampler's.
    """
    batch = noise.shape[0]
    for conds in (getattr(executor.class_obj, "conds", None) or {}).values():
        for cond in conds or []:
            frames = cond.get(FRAMES_KEY) if isinstance(cond, dict) else None
            if frames is not None and frames != batch:
                effect = (f"repeat the schedule from frame {frames} on" if frames < batch
                          else f"drop its last {frames - batch} frames")
                raise PromptScheduleError(
                    f"Prompt Travel's frames is {frames}, but the latent batch has {batch} frames, so the sampler "
                    f"would {effect}. Set Prompt Travel's frames to {batch} (the latent's batch size).")
    return executor(noise, *args, **kwargs)


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

"""Prompt Travel: a keyframed prompt schedule encoded to one embedding per frame, for the stock KSampler."""
import logging

import torch

from ..model_patcher.prompt_schedule import (FRAMES_KEY, INTERPOLATIONS, MAX_TOKENS, PromptScheduleError, blend,
                                             common_token_length, frame_blend, join_prompt, parse_schedule)

EXAMPLE = '"0": "a cat in a garden",\n"16": "a dog in the snow"'


def encode_schedule(clip, text: str, frames: int, interpolation: str = "linear", pre_text: str = "",
                    app_text: str = "") -> list:
    """CONDITIONING with a batch of ``frames`` embeddings (and pooled outputs) following the schedule."""
    keyframes = parse_schedule(text, frames)
    prompts = [join_prompt(pre_text, k.prompt, app_text) for k in keyframes]
    encoded: dict[str, dict] = {}
    for prompt in prompts:  # each distinct prompt once
        if prompt not in encoded:
            encoded[prompt] = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, return_dict=True)
    for keyframe, prompt in zip(keyframes, prompts):
        tokens = encoded[prompt]["cond"].shape[1]
        if tokens > MAX_TOKENS:
            raise PromptScheduleError(
                f"Prompt schedule line {keyframe.line}: the prompt of frame {keyframe.frame} (with pre_text and "
                f"app_text) encodes to {tokens} tokens; Prompt Travel takes at most {MAX_TOKENS} ({MAX_TOKENS // 77} "
                f"chunks of 77). Shorten it.")
    outputs = [encoded[p] for p in prompts]
    plan = frame_blend([k.frame for k in keyframes], frames, interpolation)

    cond = blend(common_token_length([o["cond"] for o in outputs]), plan)
    extra = {FRAMES_KEY: frames}  # for the sampling-time check that frames is the latent batch size
    for key, first in outputs[0].items():
        if key == "cond":
            continue
        if not isinstance(first, torch.Tensor):
            extra[key] = first  # e.g. the CLIP's hooks: the same for every prompt
        elif all(isinstance(o.get(key), torch.Tensor) and o[key].shape == first.shape for o in outputs) \
                and first.shape[0] == 1:
            extra[key] = blend([o[key] for o in outputs], plan)  # pooled_output (SDXL's size conditioning)
        else:
            logging.warning("Prompt Travel: dropped the text encoder's %r (its shape differs between prompts).", key)
    return [[cond, extra]]


class PromptTravel:
    DESCRIPTION = ("Prompt travel: encodes a keyframed prompt schedule into one text embedding per frame, blended "
                   "between keyframes, for the positive input of the stock KSampler. Set frames to the batch size "
                   "of the latent (the clip length): the sampler pairs embedding k with latent k, also inside "
                   "context windows.")
    CATEGORY = "AnimateDiff Motion/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("One embedding per frame ([frames, tokens, channels], pooled output too): connect it to "
                       "KSampler's positive input.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder (from the checkpoint loader)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": EXAMPLE, "tooltip":
                                    'One keyframe per line: "frame": "prompt", (quotes and trailing commas '
                                    'optional; frames count from 0), or the JSON form {"0": "a cat", "16": "a dog"}. '
                                    "Frames before the first keyframe take its prompt, frames after the last "
                                    "keyframe the last prompt. Keyframes at or past frames are ignored (a warning "
                                    "in the console): the last keyframe inside the clip holds to its end."}),
                "frames": ("INT", {"default": 16, "min": 1, "max": 10000, "tooltip":
                                   "The clip length: must equal the batch size of the latent you sample. A model "
                                   "with a motion module refuses a mismatch when sampling (the host would loop or "
                                   "cut the schedule). Keyframes at or past it are ignored."}),
                "interpolation": (list(INTERPOLATIONS), {"default": "linear", "tooltip":
                                  "linear: frames between two keyframes blend their embeddings in proportion to "
                                  "the distance. hold: each prompt holds until the next keyframe (a cut)."}),
            },
            "optional": {
                "pre_text": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip":
                                        "Put before every keyframe's prompt (joined with a comma), e.g. quality "
                                        "or style words shared by all frames."}),
                "app_text": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip":
                                        "Put after every keyframe's prompt (joined with a comma)."}),
            },
        }

    def encode(self, clip, text, frames, interpolation, pre_text="", app_text=""):
        if clip is None:
            raise RuntimeError("Prompt Travel: the clip input is None; the checkpoint has no text encoder.")
        return (encode_schedule(clip, text, frames, interpolation, pre_text, app_text),)


NODE_CLASS_MAPPINGS = {"ADM_PromptTravel": PromptTravel}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_PromptTravel": "Prompt Travel (AnimateDiff)"}

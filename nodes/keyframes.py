"""Motion Keyframe: motion scale, effect, motion-LoRA strength and module weights that change over the steps."""
from ..model_patcher.keyframes import INTERPOLATIONS, MotionKeyframe, MotionKeyframes

CATEGORY = "AnimateDiff Motion"
MOTION_KEYFRAMES = "ADM_MOTION_KEYFRAMES"


class MotionKeyframeNode:
    DESCRIPTION = ("A keyframe over the sampling steps for Apply Motion Module: from start_percent of sampling on, "
                   "the motion scale, effect and motion-LoRA strengths are multiplied by these values (and the "
                   "module weights replaced). "
                   "Chain several through prev_keyframes; before the first one Apply's own values hold.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (MOTION_KEYFRAMES,)
    RETURN_NAMES = ("keyframes",)
    OUTPUT_TOOLTIPS = ("The keyframes so far, ordered by start_percent: connect to Apply Motion Module's keyframes "
                       "or to another Motion Keyframe.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                              "Where in sampling this keyframe starts, as ControlNet's start_percent: 0 = the first "
                              "step, 0.5 = halfway down the noise schedule, 1 = the end."}),
            "motion_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                             "Multiplies Apply's motion scale from here on: 1 = unchanged, 0 = no motion."}),
            "effect": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                       "Multiplies Apply's effect from here on: 1 = unchanged, 0 = the unanimated prediction. Below "
                       "1 a step runs the UNet twice."}),
            "interpolation": (list(INTERPOLATIONS), {"default": "hold", "tooltip":
                              "How this keyframe's values lead to the next keyframe's: hold = unchanged until the "
                              "next starts; linear = moving evenly to its values."}),
        }, "optional": {
            "prev_keyframes": (MOTION_KEYFRAMES, {"tooltip": "Earlier keyframes to add this one to."}),
            "module_weights": ("STRING", {"default": "", "tooltip":
                               "Optional: one weight per motion module of Apply Motion Module (e.g. '0, 1' to switch "
                               "to motion_module_2 from here on). Empty = Apply's weights."}),
            "motion_lora_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                                     "Multiplies every motion LoRA's strength from here on: 1 = unchanged, 0 = the "
                                     "module without its LoRAs."}),
        }}

    def add(self, start_percent, motion_scale, effect, interpolation, prev_keyframes=None, module_weights="",
            motion_lora_strength=1.0):
        from .motion import parse_numbers  # nodes/motion.py imports this module's type name

        if prev_keyframes is not None and not isinstance(prev_keyframes, MotionKeyframes):
            raise ValueError(f"prev_keyframes must come from a Motion Keyframe node, not {type(prev_keyframes).__name__}.")
        weights = parse_numbers(module_weights, "module_weights", "0, 1") or None
        keyframe = MotionKeyframe(start_percent, motion_scale, effect, interpolation, weights, motion_lora_strength)
        return ((prev_keyframes or MotionKeyframes()).add(keyframe),)


NODE_CLASS_MAPPINGS = {"ADM_MotionKeyframe": MotionKeyframeNode}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_MotionKeyframe": "Motion Keyframe (AnimateDiff)"}

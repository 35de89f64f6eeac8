"""Load Motion Module -> Apply Motion Module: the two nodes that turn a checkpoint into an animation model."""
from ..model_patcher import folders
from ..model_patcher import schedules
from ..model_patcher.block_scales import BlockScales, parse as parse_block_scales
from ..model_patcher.motion_mask import MotionMask
from ..model_patcher.motion_patcher import MotionOptions, add_motion_lora, apply_motion_module, load_motion_patcher
from .keyframes import MOTION_KEYFRAMES

CATEGORY = "AnimateDiff Motion"
MOTION_MODULE = "ADM_MOTION_MODULE"


class LoadMotionModule:
    DESCRIPTION = ("Loads an AnimateDiff motion module (v1, v2, v3, SDXL beta, HotshotXL, AnimateLCM, "
                   "PIA, AnimateLCM-I2V; .safetensors or .ckpt) from models/animatediff_models. Pickled files are "
                   "read without running any code.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MOTION_MODULE,)
    RETURN_NAMES = ("motion_module",)
    OUTPUT_TOOLTIPS = ("The motion module, ready for Apply Motion Module.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (folders.names(folders.MOTION_MODULES), {
            "tooltip": "A motion-module file in models/animatediff_models (the folder other AnimateDiff packs use)."})}}

    def load(self, model_name):
        return (load_motion_patcher(folders.full_path(folders.MOTION_MODULES, model_name)),)


class LoadMotionLoRA:
    DESCRIPTION = ("Adds a motion LoRA (a camera move like the v2 ZoomIn/PanLeft LoRAs, or a MotionDirector-trained "
                   "motion) to a motion module. Chain several for several LoRAs, each with its own strength.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MOTION_MODULE,)
    RETURN_NAMES = ("motion_module",)
    OUTPUT_TOOLTIPS = ("The motion module with the LoRA; the module you passed in is unchanged.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "motion_module": (MOTION_MODULE, {"tooltip": "From Load Motion Module (or another Load Motion LoRA)."}),
            "lora_name": (folders.names(folders.MOTION_LORAS), {"tooltip":
                          "A motion LoRA in models/animatediff_motion_lora. The official camera LoRAs are for "
                          "AnimateDiff v2 modules."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip":
                                   "How much of the LoRA to add: 1 = as trained, 0 = none."}),
        }, "optional": {
            "strength_per_frame": ("STRING", {"default": "", "tooltip":
                                   "Optional strength per frame, comma separated (e.g. 1, 1, 0.5, 0), times strength; "
                                   "the last value holds for the remaining frames. Applied in the forward per frame "
                                   "(a little slower than one strength for all)."}),
        }}

    def load(self, motion_module, lora_name, strength, strength_per_frame=""):
        per_frame = parse_numbers(strength_per_frame, "strength_per_frame", "1, 1, 0.5, 0")
        return (add_motion_lora(motion_module, folders.full_path(folders.MOTION_LORAS, lora_name), strength, per_frame),)


class ApplyMotionModule:
    DESCRIPTION = ("Returns a copy of MODEL that denoises the latent batch as one clip: the motion module's temporal "
                   "layers are inserted into the UNet while it samples. The MODEL you pass in stays unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The animating model: feed it to KSampler with a batch of latents, one per frame.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The image model to animate (any checkpoint of the motion module's base, "
                                           "with LoRAs and patches)."}),
            "motion_module": (MOTION_MODULE, {"tooltip": "From Load Motion Module."}),
            "motion_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                                       "How strongly the temporal layers act: 1 = as trained, 0 = not at all "
                                       "(plain image sampling, bit for bit, with noise_schedule 'use existing'), "
                                       "above 1 = exaggerated."}),
            "noise_schedule": (schedules.CHOICES, {"default": schedules.AUTOSELECT, "tooltip":
                               "autoselect: the schedule the module was trained with (AnimateDiff SD1.5 v1/v2/v3: "
                               "sqrt_linear; SDXL beta: linear to 0.020; HotshotXL: linear; AnimateLCM: lcm). "
                               "'use existing' keeps the checkpoint's own."}),
            "frame_groupnorm": (["autoselect", "on", "off"], {"default": "autoselect", "tooltip":
                                "Normalise the image UNet's ResNets over all frames of the clip, as AnimateDiff v1 "
                                "and HotshotXL were trained. autoselect: on for those, off for v2, v3, SDXL beta "
                                "and AnimateLCM."}),
        }, "optional": {
            "effect": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                 "Blend of the animated (1) and the unanimated (0) model's prediction. Between 0 "
                                 "and 1 each step runs the UNet twice."}),
            "motion_scale_per_frame": ("STRING", {"default": "", "tooltip":
                                       "Optional per-frame motion scales, comma separated (e.g. 1, 1, 0.8, 0.5); "
                                       "replaces motion_scale; the last value holds for the remaining frames."}),
            "stretch_positions": ("BOOLEAN", {"default": False, "tooltip":
                                  "Allow more frames than the module was trained for (24-32) without context windows, "
                                  "by stretching its positional encoding over the clip. Motion gets slower and "
                                  "blurrier; context windows are usually better."}),
            "down_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                           "Factor on the motion of the down (input) blocks' modules. 0 = no motion there."}),
            "mid_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                          "Factor on the motion of the middle block's module (v2 / AnimateLCM have one)."}),
            "up_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                         "Factor on the motion of the up (output) blocks' modules."}),
            "block_scales": ("STRING", {"default": "", "tooltip":
                             "Factors for single blocks, replacing down/mid/up_scale there, e.g. 'output 9: 0, "
                             "output 10: 0, output 11: 0' (motion only in the low-resolution blocks). Slots: input N, "
                             "middle, output N (the UNet's input_blocks[N], middle_block, output_blocks[N])."}),
            "motion_mask": ("MASK", {"tooltip":
                            "Where the motion module acts: white = full motion, black = none (those pixels are "
                            "denoised as by the image model alone where the whole frame is black). One mask for all "
                            "frames, or one per frame; resized to every block's resolution."}),
            "keyframes": (MOTION_KEYFRAMES, {"tooltip":
                          "From Motion Keyframe: motion scale, effect and module weights that change over the "
                          "sampling steps."}),
            "motion_module_2": (MOTION_MODULE, {"tooltip":
                                "A second motion module, run side by side with the first in each block: x + w1 * "
                                "motion1(x) + w2 * motion2(x). Same base (SD1.5 / SDXL) as the first."}),
            "motion_module_3": (MOTION_MODULE, {"tooltip": "A third motion module (see motion_module_2)."}),
            "module_weights": ("STRING", {"default": "", "tooltip":
                               "One weight per motion module, comma separated, e.g. '0.7, 0.3'. Empty = equal "
                               "weights summing to 1 (1 for a single module). Keyframes can change them per step."}),
        }}

    def apply(self, model, motion_module, motion_scale, noise_schedule, frame_groupnorm, effect=1.0,
              motion_scale_per_frame="", stretch_positions=False, down_scale=1.0, mid_scale=1.0, up_scale=1.0,
              block_scales="", motion_mask=None, keyframes=None, motion_module_2=None, motion_module_3=None,
              module_weights=""):
        scale = parse_frame_scales(motion_scale_per_frame) or motion_scale
        blocks = BlockScales(down_scale, mid_scale, up_scale, parse_block_scales(block_scales))
        options = MotionOptions(scale=scale, effect=effect, schedule=noise_schedule, frame_groupnorm=frame_groupnorm,
                                stretch_positions=stretch_positions, block_scales=blocks,
                                mask=None if motion_mask is None else MotionMask(motion_mask), keyframes=keyframes,
                                module_weights=parse_numbers(module_weights, "module_weights", "0.7, 0.3") or None)
        more = tuple(m for m in (motion_module_2, motion_module_3) if m is not None)
        return (apply_motion_module(model, motion_module, options, more),)


def parse_numbers(text: str, name: str, example: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in (text or "").replace("\n", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be numbers separated by commas, like '{example}'; got {text!r}.") from None


def parse_frame_scales(text: str) -> tuple[float, ...]:
    return parse_numbers(text, "motion_scale_per_frame", "1, 0.8, 0.5")


NODE_CLASS_MAPPINGS = {"ADM_LoadMotionModule": LoadMotionModule, "ADM_LoadMotionLoRA": LoadMotionLoRA,
                       "ADM_ApplyMotionModule": ApplyMotionModule}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_LoadMotionModule": "Load Motion Module (AnimateDiff)",
                              "ADM_LoadMotionLoRA": "Load Motion LoRA (AnimateDiff)",
                              "ADM_ApplyMotionModule": "Apply Motion Module (AnimateDiff)"}

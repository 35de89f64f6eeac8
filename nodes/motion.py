"""Load Motion Module -> Apply Motion Module: the two nodes that turn a checkpoint into an animation model."""
from ..model_patcher import folders
from ..model_patcher.motion_patcher import apply_motion_module, load_motion_patcher

CATEGORY = "AnimateDiff Motion"
MOTION_MODULE = "ADM_MOTION_MODULE"


class LoadMotionModule:
    DESCRIPTION = ("Loads an AnimateDiff motion module (v1, v2, v3, SDXL beta, HotshotXL, AnimateLCM; .safetensors "
                   "or .ckpt) from models/animatediff_models. Pickled files are read without running any code.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MOTION_MODULE,)
    RETURN_NAMES = ("motion_module",)
    OUTPUT_TOOLTIPS = ("The motion module, ready for Apply Motion Module.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (folders.motion_module_names(), {
            "tooltip": "A motion-module file in models/animatediff_models (the folder other AnimateDiff packs use)."})}}

    def load(self, model_name):
        return (load_motion_patcher(folders.motion_module_path(model_name)),)


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
                                       "(plain image sampling, bit for bit), above 1 = exaggerated."}),
        }}

    def apply(self, model, motion_module, motion_scale):
        return (apply_motion_module(model, motion_module, motion_scale),)


NODE_CLASS_MAPPINGS = {"ADM_LoadMotionModule": LoadMotionModule, "ADM_ApplyMotionModule": ApplyMotionModule}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_LoadMotionModule": "Load Motion Module (AnimateDiff)",
                              "ADM_ApplyMotionModule": "Apply Motion Module (AnimateDiff)"}

"""Image to video: a start image for PIA and AnimateLCM-I2V motion modules, after Apply Motion Module."""
from ..model_patcher import image_to_video
from ..motion_modules.image_encoder import DEFAULT_DRIFT
from .motion import CATEGORY

_MODEL_TOOLTIP = ("The MODEL output of Apply Motion Module, with the {} motion module loaded by Load Motion Module. "
                  "The MODEL you pass in stays unchanged.")
_VAE_TOOLTIP = "The checkpoint's VAE: encodes the image into the latent space the model samples in."


class PIAImageInput:
    DESCRIPTION = ("PIA (Personalized Image Animator): animates a start image. The UNet gets the image's latent and a "
                   "per-frame mask (how closely each frame should keep to the image) as 5 extra input channels, as PIA "
                   "was trained. Use with Empty Latent Image at the image's size, batch = frames.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, animating from the image: feed it to KSampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": _MODEL_TOOLTIP.format("PIA (pia.ckpt)")}),
            "image": ("IMAGE", {"tooltip": "The start image (one image), best at the clip's size."}),
            "vae": ("VAE", {"tooltip": _VAE_TOOLTIP}),
            "motion_intensity": (list(image_to_video.PIA_PRESETS), {"default": "moderate motion", "tooltip":
                                 "PIA's affinity presets: how far frames may drift from the image, by their distance "
                                 "from it. 'loop' presets return to the image at frame 15 (16-frame loops); 'style "
                                 "transfer' presets keep less of the image itself."}),
            "image_frame": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip":
                                    "The frame the image is at (PIA's cond_frame); frames further from it move more."}),
        }}

    def apply(self, model, image, vae, motion_intensity, image_frame):
        return (image_to_video.apply_pia(model, image, vae, motion_intensity, image_frame),)


class AnimateLCMI2VImageInput:
    DESCRIPTION = ("AnimateLCM-I2V: animates a start image. Its image encoder turns the image's latent into features "
                   "added inside the UNet's down blocks. Sample with the lcm sampler, 4-8 steps, CFG 1-2 (Apply Motion "
                   "Module's autoselect schedule is AnimateLCM-I2V's own).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, animating from the image: feed it to KSampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": _MODEL_TOOLTIP.format("AnimateLCM-I2V (AnimateLCM-I2V.ckpt)")}),
            "image": ("IMAGE", {"tooltip": "The start image (one image), best at the clip's size."}),
            "vae": ("VAE", {"tooltip": _VAE_TOOLTIP}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                                   "Scales the image features: 1 = as trained, 0 = no image (plain AnimateLCM)."}),
            "drift": ("FLOAT", {"default": DEFAULT_DRIFT, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                                "How much each frame's position changes its features (the encoder's frame "
                                "embedding; 0.8 as trained): lower keeps frames closer to the image."}),
        }}

    def apply(self, model, image, vae, strength, drift):
        return (image_to_video.apply_animatelcm_i2v(model, image, vae, strength, drift),)


NODE_CLASS_MAPPINGS = {"ADM_PIAImageInput": PIAImageInput, "ADM_AnimateLCMI2VImageInput": AnimateLCMI2VImageInput}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_PIAImageInput": "PIA Image Input (AnimateDiff)",
                              "ADM_AnimateLCMI2VImageInput": "AnimateLCM-I2V Image Input (AnimateDiff)"}

"""Sampling Options: FreeNoise and FreeInit on a MODEL, for the stock KSampler."""
from ..model_patcher.free_init import FILTERS, add_free_init, remove_free_init
from ..model_patcher.free_noise import add_free_noise, remove_free_noise


class SamplingOptions:
    DESCRIPTION = ("Returns a copy of MODEL that samples with FreeNoise (noise rescheduling: long clips made of "
                   "context windows stay consistent) and/or FreeInit (re-samples the clip, each pass starting from "
                   "the low frequencies of the last: smoother, more consistent motion, at iterations x the time). "
                   "Works with the stock KSampler, anywhere between the model loader and KSampler (with or without the "
                   "host's Context Windows node, which it also makes work with prompt travel).")
    CATEGORY = "AnimateDiff Motion/sampling"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with these sampling options: connect it to KSampler.",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The animating model (from Apply Motion Module, optionally with the "
                                           "host's Context Windows). It stays unchanged."}),
            "free_noise": ("BOOLEAN", {"default": True, "tooltip":
                                       "FreeNoise: frames after the first window reuse the earlier frames' noise in "
                                       "a shuffled order (drawn from the sampler's seed). Changes nothing for a "
                                       "clip no longer than one window."}),
            "free_noise_context_length": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip":
                                                  "FreeNoise's window length when the model has no context windows "
                                                  "(with the host's Context Windows node, its length is used)."}),
            "free_noise_context_overlap": ("INT", {"default": 4, "min": 0, "max": 1024, "tooltip":
                                                   "FreeNoise's window overlap when the model has no context "
                                                   "windows; noise repeats every length - overlap frames."}),
            "free_init_iterations": ("INT", {"default": 3, "min": 0, "max": 20, "tooltip":
                                             "FreeInit: how many times the whole clip is sampled, each pass "
                                             "starting from the last pass's low frequencies. 0 or 1 = off; "
                                             "sampling takes this many times longer."}),
            "free_init_filter": (list(FILTERS), {"default": "gaussian", "tooltip":
                                                 "The low-pass filter: gaussian (smooth, the default), butterworth "
                                                 "(sharper, see order), ideal (hard sphere), box (hard box)."}),
            "free_init_spatial_stop": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                                 "Spatial stop frequency, as a fraction of the highest (Nyquist) "
                                                 "frequency: higher keeps more of the last pass's detail."}),
            "free_init_temporal_stop": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                                  "Temporal stop frequency (across frames), as a fraction of the "
                                                  "highest: higher keeps more of the last pass's motion."}),
            "free_init_butterworth_order": ("INT", {"default": 4, "min": 1, "max": 32, "tooltip":
                                                    "Butterworth filter only: higher is a sharper cut."}),
        }}

    def execute(self, model, free_noise, free_noise_context_length, free_noise_context_overlap, free_init_iterations,
                free_init_filter, free_init_spatial_stop, free_init_temporal_stop, free_init_butterworth_order):
        model = model.clone()
        remove_free_init(model)  # an earlier Sampling Options node's choices are replaced, not stacked
        remove_free_noise(model)
        if free_noise:
            add_free_noise(model, free_noise_context_length, free_noise_context_overlap)
        if free_init_iterations > 1:  # after FreeNoise: its wrapper runs inside, once FreeNoise set the noise
            add_free_init(model, free_init_iterations, free_init_filter, free_init_spatial_stop,
                          free_init_temporal_stop, free_init_butterworth_order)
        return (model,)


NODE_CLASS_MAPPINGS = {"ADM_SamplingOptions": SamplingOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_SamplingOptions": "Sampling Options (AnimateDiff)"}

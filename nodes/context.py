"""Context Windows: long clips from overlapping windows the motion module can handle."""
from ..model_patcher import context_windows
from .motion import CATEGORY


class ContextWindows:
    DESCRIPTION = ("Samples clips longer than the motion module's window (16-32 frames) as overlapping windows that "
                   "are denoised separately and blended, through ComfyUI's own context windows. Memory depends on "
                   "the window, not on the clip length.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, sampling in windows: feed it to KSampler with the whole clip's latents.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Usually the output of Apply Motion Module."}),
            "context_length": ("INT", {"default": 16, "min": 1, "max": 128, "tooltip":
                                       "Frames per window. 16 is what AnimateDiff was trained on; at most the "
                                       "module's limit (24 for v1/HotshotXL, 32 for v2/v3/SDXL, 64 for AnimateLCM)."}),
            "context_overlap": ("INT", {"default": 4, "min": 0, "max": 127, "tooltip":
                                        "Frames shared by neighbouring windows; more overlap = smoother seams, "
                                        "more windows to compute."}),
            "schedule": (context_windows.SCHEDULES, {"default": "standard_uniform", "tooltip":
                         "standard_uniform: windows shift a little every step, which hides seams. standard_static: "
                         "the same windows every step. looped_uniform: windows wrap from the end to the start. "
                         "batched: no overlap (fast, visible seams)."}),
            "fuse_method": (context_windows.FUSE_METHODS, {"default": "pyramid", "tooltip":
                            "How overlapping windows are blended: pyramid weights each window's middle frames most; "
                            "flat averages; overlap-linear cross-fades only inside the overlap."}),
            "closed_loop": ("BOOLEAN", {"default": False, "tooltip":
                            "Make the clip loop seamlessly: the last frames are blended with the first (uses the "
                            "looped_uniform schedule)."}),
        }, "optional": {
            "context_stride": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip":
                               "Uniform schedules only: also use windows of every 2nd, 4th... frame, for "
                               "consistency over the whole clip (more windows)."}),
            "windows_per_batch": ("INT", {"default": 1, "min": 1, "max": context_windows.MAX_WINDOWS_PER_BATCH,
                                  "tooltip": "Windows evaluated together in one model call (same result). More "
                                  "uses memory for that many windows at once and can be faster on a GPU with "
                                  "memory to spare; 1 = one window at a time."}),
        }}

    def apply(self, model, context_length, context_overlap, schedule, fuse_method, closed_loop, context_stride=1,
              windows_per_batch=1):
        if closed_loop:
            schedule = "looped_uniform"
        handler = context_windows.make_handler(context_length, context_overlap, schedule, fuse_method,
                                               context_stride, closed_loop, windows_per_batch)
        return (context_windows.apply_context_windows(model, handler),)


NODE_CLASS_MAPPINGS = {"ADM_ContextWindows": ContextWindows}
NODE_DISPLAY_NAME_MAPPINGS = {"ADM_ContextWindows": "Context Windows (AnimateDiff)"}

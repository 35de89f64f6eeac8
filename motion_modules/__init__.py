"""Pure-torch AnimateDiff motion modules: the temporal transformer, its file formats. No host imports."""
from .formats import LAYOUTS, MotionModuleError, build_module, detect, load_motion_module, published_state_dict, read_state_dict
from .motion_module import MotionModule, MotionModuleConfig
from .temporal_transformer import VanillaTemporalModule, sdpa_attention, sinusoidal_encoding

__all__ = ["LAYOUTS", "MotionModule", "MotionModuleConfig", "MotionModuleError", "VanillaTemporalModule",
           "build_module", "detect", "load_motion_module", "published_state_dict", "read_state_dict",
           "sdpa_attention", "sinusoidal_encoding"]

"""AnimateDiff Motion: AnimateDiff for ComfyUI (motion modules patched into the host's UNet at run time)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

"""AnimateDiff Motion: AnimateDiff for ComfyUI (motion modules patched into the host's UNet at run time)."""
from .model_patcher import host_features

# One line in the server log: host version, the host features used and the missing ones with what they cost.
# Before the nodes are imported, so that it is there even when an old host makes their import fail.
host_features.log_report()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

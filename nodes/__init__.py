"""The node classes, registered with the host under the ``ADM_`` prefix."""
from ..model_patcher import folders
from . import motion, save_video

folders.register()

NODE_CLASS_MAPPINGS = {**motion.NODE_CLASS_MAPPINGS, **save_video.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**motion.NODE_DISPLAY_NAME_MAPPINGS, **save_video.NODE_DISPLAY_NAME_MAPPINGS}

"""The node classes, registered with the host under the ``ADM_`` prefix."""
from ..model_patcher import folders
from . import (camera_ctrl, context, image_to_video, keyframes, load_video, motion, prompt_travel, sampling_options,
               save_video, sparse_ctrl, training)

folders.register()

_MODULES = (motion, keyframes, context, prompt_travel, sampling_options, sparse_ctrl, image_to_video, camera_ctrl,
            load_video, save_video, training)
NODE_CLASS_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_DISPLAY_NAME_MAPPINGS.items()}

"""The node classes, registered with the host under the ``ADM_`` prefix."""
from ..model_patcher import folders
from . import context, load_video, motion, prompt_travel, sampling_options, save_video, training

folders.register()

_MODULES = (motion, context, prompt_travel, sampling_options, load_video, save_video, training)
from . import image_to_video  # noqa: E402  (image to video: PIA, AnimateLCM-I2V)
_MODULES += (image_to_video,)
from . import sparse_ctrl  # noqa: E402  (SparseCtrl: keyframe images)
_MODULES += (sparse_ctrl,)
from . import keyframes  # noqa: E402  (motion keyframes over the sampling steps)
_MODULES += (keyframes,)
NODE_CLASS_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_DISPLAY_NAME_MAPPINGS.items()}

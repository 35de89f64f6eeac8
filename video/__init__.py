"""Video files in-process (PyAV + Pillow, no external ffmpeg): write GIF / WebP / MP4 (with sound) and read them back;
stream selected frames and the sound track of input videos, GIFs, animated WebPs and image folders."""
from .decode import (FOLDER_FPS, IMAGE_EXTENSIONS, VideoFrames, image_folder_files, iter_frames, probe, read_audio,
                     read_metadata, read_video, sniff_format)
from .encode import DEFAULT_MP4_CRF, FORMATS, EXTENSIONS, write_video

__all__ = ["write_video", "read_video", "read_metadata", "probe", "sniff_format", "iter_frames", "VideoFrames",
           "read_audio", "image_folder_files", "IMAGE_EXTENSIONS", "FOLDER_FPS", "FORMATS", "EXTENSIONS",
           "DEFAULT_MP4_CRF"]

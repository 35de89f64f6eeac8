"""Video files in-process (PyAV + Pillow, no external ffmpeg): write GIF / WebP / MP4 and read them back."""
from .decode import probe, read_metadata, read_video, sniff_format
from .encode import DEFAULT_MP4_CRF, FORMATS, EXTENSIONS, write_video

__all__ = ["write_video", "read_video", "read_metadata", "probe", "sniff_format", "FORMATS", "EXTENSIONS",
           "DEFAULT_MP4_CRF"]

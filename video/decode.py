"""Read back what encode.write_video writes (and ordinary GIF / WebP / MP4-like files): frames, frame rate,
loop count and embedded metadata. The format is taken from the file's first bytes, not from its name.

For input videos: iter_frames() streams a selected range (start / count / every_nth / target_fps) of any
container FFmpeg reads, GIF, animated WebP or a folder of numbered images; probe() describes one cheaply;
read_audio() returns its sound track (or a range of it)."""
from __future__ import annotations

import json
import math
import os
import re
import stat
from fractions import Fraction
from functools import partial

import numpy as np

from .encode import WEBP_FIRST_TAG, WEBP_LAST_TAG, WEBP_PROMPT_TAG


def sniff_format(path: str | os.PathLike) -> str:
    """"gif", "webp", or "video" (anything else, left to PyAV/FFmpeg)."""
    if is_folder(path):
        raise _unreadable(path, "it is a folder, not a file")
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return "video"


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video/animation/image folder to (uint8 frames [N, H, W, 3] RGB, frames per second as ``probe``
    reports it). ``max_frames`` stops early."""
    frames = list(iter_frames(path, count=max_frames))
    if not frames:
        raise _unreadable(path, "it contains no decodable video frames")
    return np.stack(frames), probe(path)["fps"]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Embedded key -> text metadata: MP4/video container tags, WebP EXIF "key:value" entries (host layout), or the
    GIF comment (a JSON object as written by write_video; any other comment comes back as {"comment": text})."""
    kind = sniff_format(path)
    if kind == "video":
        import av
        with av.open(os.fspath(path)) as container:
            return dict(container.metadata)
    from PIL import Image
    with Image.open(path) as image:
        if kind == "gif":
            return _parse_gif_comment(image.info.get("comment"))
        exif = image.getexif()
        out = {}
        for tag in [WEBP_PROMPT_TAG, *range(WEBP_FIRST_TAG, WEBP_LAST_TAG - 1, -1)]:
            value = exif.get(tag)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str) and ":" in value:
                key, text = value.split(":", 1)
                out[key] = text
        return out


def _parse_gif_comment(comment) -> dict[str, str]:
    if not comment:
        return {}
    text = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
    try:
        data = json.loads(text)
    except ValueError:
        return {"comment": text}
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return data
    return {"comment": text}


def _rgb24(frame) -> np.ndarray:
    """A decoded PyAV video frame as uint8 RGB [H, W, 3], turned upright when the stream carries a rotation
    (phone videos: a display matrix instead of rotated pixels)."""
    from av.video.reformatter import Interpolation

    # Bicubic chroma upsampling with full horizontal chroma interpolation: ~2-3 dB closer to the source than
    # swscale's default bilinear for yuv420p.
    interpolation = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
    kwargs = {}
    if frame.color_range:  # tagged; untagged YUV defaults to limited range in swscale
        kwargs["src_color_range"] = frame.color_range
    rgb = frame.to_ndarray(format="rgb24", interpolation=interpolation, **kwargs)
    turns = round((frame.rotation or 0) / 90) % 4  # degrees counterclockwise, as FFmpeg's display matrix
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


# --- streaming reader ---------------------------------------------------------------------------------------------
#
# iter_frames() decodes a file front to back and keeps at most the frame being decided on (plus, for containers
# that do not store frame durations, the one after it): frames that are not selected are dropped as soon as they
# are decoded, without being converted to RGB. Selection, in this order:
#   1. start:      skip the first `start` frames of the file (source frame numbers, 0 = the first frame).
#   2. target_fps: resample from there by timestamp: output frame j shows the frame on screen at time
#                  t_start + j / target_fps, i.e. the nearest *earlier* (or simultaneous) source frame. Frames are
#                  repeated when target_fps is above the source rate and skipped when it is below.
#                  Containers round timestamps (Matroska/WebM to 1 ms, GIF delays to 10 ms: 30 fps is stored as
#                  0/30/70/100 ms), which would make such picks come out one frame off. So a timestamp within one
#                  such tick of the file's nominal frame grid (first frame + k / average rate) is snapped onto it;
#                  genuinely irregular (variable-rate) timestamps are further off the grid and used as they are.
#   3. every_nth:  keep frames 0, n, 2n, ... of that sequence.
#   4. count:      stop after `count` frames (decoding stops there too).

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FOLDER_FPS = 8.0
"""Image folders store no timing: their frames count as 8 fps (AnimateDiff's usual rate)."""
DEFAULT_FRAME_MS = 100
"""GIF/WebP frames that store no delay (0) last 100 ms here, as browsers show them."""
_GIF_TICK = Fraction(1, 100)  # GIF delays are whole centiseconds
_WEBP_TICK = Fraction(1, 1000)  # WebP delays are whole milliseconds


def _unreadable(path, reason) -> ValueError:
    return ValueError(f"Cannot read video {os.fspath(path)!r}: {reason}")


def is_folder(path: str | os.PathLike) -> bool:
    """True for a folder, False for a regular file; ValueError naming the path for anything else. Decided by
    os.stat alone, before anything is opened: open() on a FIFO (or /dev/stdin on a terminal) blocks until a writer
    comes, and a device such as /dev/zero never ends, either of which would stall the server."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise _unreadable(path, "no such file or folder") from None
    except OSError as ex:
        raise _unreadable(path, ex.strerror or ex) from None
    if stat.S_ISDIR(mode):
        return True
    if stat.S_ISREG(mode):
        return False
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise _unreadable(path, f"it is {kind}; only video files and folders of images are read")


def _natural_key(name: str) -> tuple:
    """Sort key with digit runs compared as numbers: frame2 < frame10 (name itself breaks ties: 02 vs 2)."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


def image_folder_files(folder: str | os.PathLike) -> list[str]:
    """The image files (IMAGE_EXTENSIONS, not hidden) directly in ``folder``, naturally sorted, as full paths."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError as ex:
        raise _unreadable(folder, ex.strerror or ex) from None
    names = [n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


class _Frame:
    """One decoded source frame: its number, start time, end time (None = until the next frame's start) and a
    loader for its RGB pixels, called at most once and only when the frame is selected."""
    __slots__ = ("index", "time", "end", "last_end", "_load", "_rgb", "__weakref__")

    def __init__(self, index: int, time: Fraction, end: Fraction | None, load, last_end: Fraction | None = None):
        self.index, self.time, self.end, self.last_end = index, time, end, last_end
        self._load, self._rgb = load, None

    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            self._rgb, self._load = self._load(), None
        return self._rgb


class _Grid:
    """Snaps timestamps that are within `tick` of the nominal grid origin + k * period onto it (see above)."""

    def __init__(self, period: Fraction | None, tick: Fraction):
        self.period = period
        self.tick = min(tick, period / 4) if period else Fraction(0)
        self.origin = None

    def __call__(self, time: Fraction) -> Fraction:
        if self.origin is None:
            self.origin = time
        if not self.tick:
            return time
        on_grid = self.origin + round((time - self.origin) / self.period) * self.period
        return on_grid if abs(time - on_grid) <= self.tick else time


class _PyAVSource:
    kind = "video"

    def __init__(self, path: str):
        import av

        self.path = path
        try:
            self.container = av.open(path)
        except (OSError, av.FFmpegError) as ex:
            raise _unreadable(path, f"not a video file PyAV/FFmpeg can open ({ex})") from None
        if not self.container.streams.video:
            self.container.close()
            raise _unreadable(path, "it has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        self.fps = Fraction(rate) if rate else None
        self.period = 1 / self.fps if self.fps else Fraction(1, 25)
        names = self.container.format.name.split(",")  # e.g. "mov,mp4,m4a,3gp,3g2,mj2"
        self.format = "mp4" if "mp4" in names else names[0]
        self.declared = int(self.stream.frames or 0) or None  # from the container's index; Matroska stores none

    def frames(self):
        import av

        index, previous = -1, None
        time_base = self.stream.time_base
        grid = _Grid(1 / self.fps if self.fps else None, Fraction(time_base) if time_base else Fraction(0))
        try:
            for index, frame in enumerate(self.container.decode(self.stream)):
                base = frame.time_base or time_base
                if frame.pts is not None and base:
                    time = grid(Fraction(frame.pts) * Fraction(base))
                else:
                    time = Fraction(0) if previous is None else previous + self.period
                duration = Fraction(frame.duration) * Fraction(base) if frame.duration and base else self.period
                yield _Frame(index, time, None, partial(_rgb24, frame), last_end=time + duration)
                previous = time
        except av.FFmpegError as ex:
            of = f" of the {self.declared} its container declares" if self.declared else ""
            raise _unreadable(self.path, f"decoding failed after frame {index + 1}{of} ({ex}); the file is damaged "
                                         "or cut short: replace it with a complete copy") from None

    def close(self):
        self.container.close()


class _PillowSource:
    """Animated GIF / WebP (FFmpeg cannot decode animated WebP)."""
    declared = None  # Pillow counts the frames it can seek to: there is no separate header count to fall short of

    def __init__(self, path: str, kind: str):
        from PIL import Image

        self.path, self.kind, self.format = path, kind, kind
        self.image = None
        try:
            self.image = Image.open(path)
            if kind == "webp":  # Pillow only knows a WebP frame's delay after decoding it: read the chunks
                count = getattr(self.image, "n_frames", 1)
                self.stored_ms = (_webp_delays_ms(path) + [0] * count)[:count]
            else:  # the delays as stored (0 = none); seeking a GIF reads its headers
                self.stored_ms = []
                for i in range(getattr(self.image, "n_frames", 1)):
                    self.image.seek(i)
                    self.stored_ms.append(int(self.image.info.get("duration", 0) or 0))
                self.image.seek(0)
        except (OSError, ValueError, SyntaxError, EOFError) as ex:
            if self.image is not None:
                self.image.close()
            raise _unreadable(path, f"broken {kind.upper()} file ({ex})") from None
        self.durations = [Fraction(ms if ms > 0 else DEFAULT_FRAME_MS, 1000) for ms in self.stored_ms]
        self.fps = len(self.durations) / sum(self.durations)
        grid = _Grid(1 / self.fps, _GIF_TICK if kind == "gif" else _WEBP_TICK)
        starts = np.cumsum([Fraction(0)] + self.durations).tolist()  # exact Fractions; the last is the end
        self.times = [grid(t) for t in starts]

    def frames(self):
        image, times = self.image, self.times
        for index in range(len(self.durations)):
            try:
                image.seek(index)
            except (OSError, ValueError, EOFError) as ex:
                raise _unreadable(self.path, f"decoding failed at frame {index + 1} ({ex})") from None
            # The image object changes on the next seek: the selector loads the frame before asking for another.
            yield _Frame(index, times[index], times[index + 1], lambda: np.asarray(image.convert("RGB")))

    def close(self):
        self.image.close()


def _webp_delays_ms(path: str) -> list[int]:
    """Each frame's delay from a WebP file's ANMF chunks ([0] for a still image), without decoding anything."""
    delays = []
    with open(path, "rb") as f:
        head = f.read(12)
        end = 8 + int.from_bytes(head[4:8], "little")
        while f.tell() + 8 <= end:
            chunk = f.read(8)
            if len(chunk) < 8:
                break
            size = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"ANMF":
                payload = f.read(16)  # x, y, width - 1, height - 1, delay: 24-bit little-endian each
                if len(payload) < 16:
                    break
                delays.append(int.from_bytes(payload[12:15], "little"))
                f.seek(size + (size & 1) - 16, os.SEEK_CUR)
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)
    return delays or [0]


class _FolderSource:
    kind = format = "images"
    declared = None

    def __init__(self, path: str):
        self.path = path
        self.files = image_folder_files(path)
        if not self.files:
            raise _unreadable(path, f"the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.fps = Fraction(FOLDER_FPS)
        self.size = None

    def _load(self, file: str) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(file) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as ex:
            raise _unreadable(self.path, f"cannot read the image {os.path.basename(file)!r} ({ex})") from None
        size = rgb.shape[1], rgb.shape[0]
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise _unreadable(self.path, f"{os.path.basename(file)!r} is {size[0]}x{size[1]} but the frames before "
                                         f"it are {self.size[0]}x{self.size[1]}; all frames must have one size")
        return rgb

    def frames(self):
        period = 1 / self.fps
        for index, file in enumerate(self.files):
            yield _Frame(index, index * period, (index + 1) * period, partial(self._load, file))

    def close(self):
        pass


def _open_source(path):
    path = os.fspath(path)
    if is_folder(path):
        return _FolderSource(path)
    try:
        kind = sniff_format(path)
    except OSError as ex:
        raise _unreadable(path, ex.strerror or ex) from None
    if os.path.getsize(path) == 0:
        raise _unreadable(path, "the file is empty")
    return _PyAVSource(path) if kind == "video" else _PillowSource(path, kind)


def _select(frames, start: int, every_nth: int, rate: Fraction | None):
    """(frame, time) for each output frame, in order (see the comment at the top of this section)."""
    if rate is None:
        for frame in frames:
            if frame.index >= start and (frame.index - start) % every_nth == 0:
                frame.rgb()  # load before the source moves on
                yield frame, frame.time
        return

    step = 1 / rate
    t0, j, pending = None, 0, None

    def until(frame, end):  # output times covered by `frame`: [its start, end)
        nonlocal j
        while t0 + j * step < end:
            if j % every_nth == 0:
                frame.rgb()
                yield frame, t0 + j * step
            j += 1

    for frame in frames:
        if frame.index < start:
            continue
        if t0 is None:
            t0 = frame.time
        if pending is not None:
            yield from until(pending, frame.time)
            pending = None
        if frame.end is not None:
            yield from until(frame, frame.end)
        else:
            pending = frame  # its end is the next frame's start
    if pending is not None:
        yield from until(pending, pending.last_end)


class VideoFrames:
    """The iterator iter_frames() returns: uint8 RGB frames [H, W, 3], one at a time.

    fps:         the rate of the frames it yields (target_fps or the source rate, divided by every_nth).
    source_fps:  the file's own rate (average; 8 for image folders); 0.0 when the file stores none.
    start_time:  seconds on the file's timeline where the first yielded frame is shown (None before it).
    yielded:     how many frames it has yielded so far.
    end_time:    start_time + yielded / fps: the end of the selected range, for cutting the matching audio.
    frames_read: source frames decoded so far (selected or not; from the file's first frame).
    frames_declared: the frame count the container's index declares (mp4, mov), None when it stores none.
    truncated:   decoding reached the end of the data before frames_declared: a cut-off file (an interrupted
                 download or copy); it is only known once the selection has run to the file's end.
    The same array may be yielded more than once (target_fps above the source rate): do not modify frames in place.
    The file is closed when the iterator is exhausted, on close(), or at the end of a ``with`` block.
    """

    def __init__(self, path, start: int = 0, count: int | None = None, every_nth: int = 1,
                 target_fps: float | None = None):
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start must be a frame number >= 0, got {start!r}.")
        if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1):
            raise ValueError(f"count must be None (all frames) or >= 1, got {count!r}.")
        if isinstance(every_nth, bool) or not isinstance(every_nth, (int, np.integer)) or every_nth < 1:
            raise ValueError(f"every_nth must be an integer >= 1, got {every_nth!r}.")
        rate = None
        if target_fps:
            from .encode import fps_fraction
            try:
                value = float(target_fps)
            except (TypeError, ValueError):
                value = float("nan")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"target_fps must be None/0 (the source rate) or a positive number, "
                                 f"got {target_fps!r}.")
            rate = fps_fraction(value)
        self.path = os.fspath(path)
        self._source = _open_source(self.path)
        self.format = self._source.format
        self.source_fps = float(self._source.fps) if self._source.fps else 0.0
        self.fps = float(rate or self._source.fps or 0) / every_nth
        self._count = None if count is None else int(count)
        self.start_time: float | None = None
        self.yielded = 0
        self.frames_read, self._ended = 0, False
        self._selected = _select(self._counted(self._source.frames()), int(start), int(every_nth), rate)
        self._closed = False

    def _counted(self, frames):
        for frame in frames:
            self.frames_read = frame.index + 1
            yield frame
        self._ended = True  # the data ran out (not stopped by count, nor by an error)

    @property
    def frames_declared(self) -> int | None:
        return self._source.declared

    @property
    def truncated(self) -> bool:
        declared = self._source.declared
        return bool(declared and self._ended and self.frames_read < declared)

    @property
    def end_time(self) -> float | None:
        if self.start_time is None:
            return None
        return self.start_time + (self.yielded / self.fps if self.fps else 0.0)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._closed or (self._count is not None and self.yielded >= self._count):
            self.close()
            raise StopIteration
        try:
            frame, time = next(self._selected)
        except BaseException:
            self.close()
            raise
        if self.start_time is None:
            self.start_time = float(time)
        self.yielded += 1
        return frame.rgb()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._selected.close()
            self._source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def iter_frames(path: str | os.PathLike, start: int = 0, count: int | None = None, every_nth: int = 1,
                target_fps: float | None = None) -> VideoFrames:
    """Stream the selected frames of a video file (mp4, mov, mkv, webm, ... via PyAV; GIF and animated WebP via
    Pillow) or of a folder of numbered images (naturally sorted: frame2 before frame10; FOLDER_FPS apart), as uint8
    RGB arrays [H, W, 3], without ever holding more than one or two decoded frames.

    start:      first source frame (0-based). count: at most this many frames (None = to the end).
    every_nth:  keep every n-th frame (after resampling). target_fps: None/0 = the source rate, else resample by
                timestamp, each output frame showing the nearest earlier source frame.
    Rotated phone videos come out upright. A missing or unreadable file raises ValueError naming the path and the
    reason, at the call for problems with opening it and during iteration for damaged data."""
    return VideoFrames(path, start=start, count=count, every_nth=every_nth, target_fps=target_fps)


def probe(path: str | os.PathLike) -> dict:
    """What a file or image folder holds, without decoding it all:
    {"format", "width", "height", "frames", "fps", "duration", "has_audio", "loop"}.

    format: "mp4", "gif", "webp", "images" (a folder) or FFmpeg's container name ("matroska" for mkv/webm, "mov",
    ...). width/height: as displayed (rotation applied). frames: from the container's index, else by counting the
    packets (no decoding). fps: the average rate (GIF/WebP: frames / total stored delay, 0.0 when none is stored;
    folders: FOLDER_FPS). duration: seconds of video. loop: plays, 0 = forever (GIF/WebP), else None."""
    source = _open_source(path)
    try:
        if isinstance(source, _FolderSource):
            from PIL import Image

            try:
                with Image.open(source.files[0]) as image:
                    width, height = image.size
            except (OSError, ValueError, SyntaxError) as ex:
                raise _unreadable(path, f"cannot read the image {os.path.basename(source.files[0])!r} ({ex})") from None
            frames = len(source.files)
            return {"format": "images", "width": width, "height": height, "frames": frames, "fps": FOLDER_FPS,
                    "duration": frames / FOLDER_FPS, "has_audio": False, "loop": None}
        if isinstance(source, _PillowSource):
            image = source.image
            total = sum(source.stored_ms)
            frames = len(source.stored_ms)
            raw_loop = image.info.get("loop")
            if source.kind == "gif":  # NETSCAPE count = repeats: absent -> plays once, 0 -> forever, n -> n + 1 plays
                loop = 1 if raw_loop is None else (0 if raw_loop == 0 else raw_loop + 1)
            else:
                loop = raw_loop if frames > 1 else None
            return {"format": source.kind, "width": image.size[0], "height": image.size[1], "frames": frames,
                    "fps": 1000.0 * frames / total if total > 0 else 0.0, "duration": total / 1000.0,
                    "has_audio": False, "loop": loop}
        return _probe_pyav(source)
    finally:
        source.close()


def _probe_pyav(source: _PyAVSource) -> dict:
    import av

    container, stream = source.container, source.stream
    try:
        first = next(container.decode(stream), None)
    except av.FFmpegError as ex:
        raise _unreadable(source.path, f"decoding failed ({ex})") from None
    if first is None:
        raise _unreadable(source.path, "it contains no decodable video frames")
    width, height = first.width, first.height
    if round((first.rotation or 0) / 90) % 2:
        width, height = height, width
    frames = stream.frames
    if not frames:  # Matroska/WebM store no frame count: count the packets, without decoding them
        container.seek(0)
        frames = sum(1 for packet in container.demux(stream) if packet.size)
    fps = float(source.fps) if source.fps else 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif fps:
        duration = frames / fps
    else:
        duration = container.duration / 1e6 if container.duration else 0.0
    return {"format": source.format, "width": width, "height": height, "frames": int(frames), "fps": fps,
            "duration": duration, "has_audio": bool(container.streams.audio), "loop": None}


# --- audio --------------------------------------------------------------------------------------------------------

def read_audio(path: str | os.PathLike, start: float = 0.0, end: float | None = None) -> tuple[np.ndarray, int] | None:
    """The first audio track as (float32 waveform [channels, samples] in -1..1, sample rate), or None when the file
    has none (GIF, WebP and image folders never do).

    start/end: seconds on the file's timeline (the times VideoFrames.start_time/end_time report), so the audio
    matches the selected frames; end=None = to the end of the track. With an end the result is exactly
    round((end - start) * rate) samples long: silence fills whatever the track does not cover. Only the range is
    kept in memory."""
    path = os.fspath(path)
    if is_folder(path) or sniff_format(path) != "video":
        return None
    import av

    try:
        container = av.open(path)
    except (OSError, av.FFmpegError) as ex:
        raise _unreadable(path, f"not a file PyAV/FFmpeg can open ({ex})") from None
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        if rate <= 0:
            raise _unreadable(path, "its audio track has no sample rate")
        first = round(start * rate)
        last = None if end is None else max(first, round(end * rate))
        chunks, position, channels = [], None, None
        try:
            for frame in container.decode(stream):
                base = frame.time_base or stream.time_base
                if frame.pts is not None and base:
                    position = round(frame.pts * Fraction(base) * rate)
                elif position is None:
                    position = 0
                samples = _audio_samples(frame)
                if frame.duration and base:  # the last AAC frame is padded; its duration says how much is real
                    samples = samples[:, :max(0, round(frame.duration * Fraction(base) * rate))]
                channels = samples.shape[0]
                lo, hi = max(position, first), position + samples.shape[1]
                if last is not None:
                    hi = min(hi, last)
                if hi > lo:
                    chunks.append((lo - first, samples[:, lo - position:hi - position]))
                position += samples.shape[1]
                if last is not None and position >= last:
                    break
        except av.FFmpegError as ex:
            raise _unreadable(path, f"decoding the audio failed ({ex})") from None
    if channels is None:
        return None
    length = last - first if last is not None else max((at + c.shape[1] for at, c in chunks), default=0)
    out = np.zeros((channels, length), np.float32)
    for at, chunk in chunks:
        out[:, at:at + chunk.shape[1]] = chunk
    return out, rate


def _audio_samples(frame) -> np.ndarray:
    """A decoded audio frame as float32 [channels, samples]."""
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:  # packed: [1, samples * channels], interleaved
        data = data.reshape(-1, channels).T
    if data.dtype == np.uint8:
        data = (data.astype(np.float32) - 128) / 128
    elif np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    return np.ascontiguousarray(data, dtype=np.float32)

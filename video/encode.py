"""Write a batch of RGB frames as an animated GIF, animated WebP or H.264 MP4, in-process (PyAV + Pillow).

Everything here is plain Python + numpy + Pillow + PyAV: no host imports, so it can be used and tested on its own.
Files are written atomically: the encoder writes a hidden temporary file next to the target and it is renamed
over the target only once encoding succeeded, so a failure never leaves a half-written (or clobbered) file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from fractions import Fraction
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("mp4", "gif", "webp")
EXTENSIONS = {"mp4": ".mp4", "gif": ".gif", "webp": ".webp"}

DEFAULT_MP4_CRF = 18
"""x264 constant-rate factor used when ``quality`` is not given ("visually lossless"). Decoded RGB PSNR measured on
a smooth moving test clip with soft-edged saturated shapes: ~37 dB at 64x48 / 8 fps (35.7 dB at 29.97 fps; such
tiny frames are limited by yuv420p chroma subsampling, ~39 dB before any compression), ~46 dB at 256x192."""
MP4_CRF_RANGE = (0, 51)
WEBP_QUALITY_RANGE = (0, 100)
MIN_FPS = 0.001
MAX_LOOP = 65535  # both GIF (NETSCAPE2.0) and WebP (ANIM chunk) store the loop count in 16 bits
MAX_SIDE = {"gif": 65535, "webp": 16383, "mp4": 16384}
GIF_MIN_DELAY_CS = 2  # browsers replace GIF delays of 0 or 1 centisecond with 10 (100 ms)
GIF_COLOURS = 255  # leave one palette slot free so Pillow can use it for transparent (unchanged) pixels

# WebP: the same EXIF layout as the host's SaveAnimatedWEBP, which the ComfyUI frontend reads back on drag-and-drop:
# "prompt" goes to tag 0x0110 (Model), every other key to 0x010F (Make), 0x010E, ... each as "key:value".
WEBP_PROMPT_TAG = 0x0110
WEBP_FIRST_TAG = 0x010F
WEBP_LAST_TAG = 0x0104  # do not go further down, into the image-structure tags (width, compression, ...)

# MP4 sound: AAC at one of the sample rates the format defines (anything else is resampled to the nearest).
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
MIN_AUDIO_RATE, MAX_AUDIO_RATE = 1000, 384000
AUDIO_LAYOUTS = ("mono", "stereo", "2.1", "quad", "5.0", "5.1", "6.1", "7.1")  # FFmpeg's default per channel count

# MP4: colour tags written into the stream (BT.709 matrix/primaries/transfer, limited "TV" range), matching the
# matrix used for the RGB -> YUV conversion, so players and read_video() convert back with the same matrix.
_BT709 = 1
_RANGE_MPEG = 1


def write_video(frames: np.ndarray, path: str | os.PathLike, fmt: str | None, fps: float, loop: int = 0,
                pingpong: bool = False, quality: int | None = None,
                metadata: Mapping[str, Any] | None = None,
                audio: tuple[np.ndarray, int] | None = None) -> str:
    """Encode ``frames`` (uint8 ``[N, H, W, 3]`` RGB) to ``path`` and return the path written.

    fmt:      "mp4" (H.264/yuv420p via libx264), "gif" or "webp" (animated); None = from the file extension.
    fps:      frames per second, any positive float (29.97 is stored exactly as 2997/100 in MP4; GIF delays are
              whole centiseconds, so the per-frame delays alternate to keep the average rate, and GIF cannot go
              faster than 50 fps in browsers).
    loop:     how many times the animation plays, 0 = forever (GIF/WebP; MP4 has no loop flag and ignores it).
    pingpong: append frames N-2 .. 1 so the clip plays forward then backward (2N-2 frames for N >= 2).
    quality:  MP4: x264 CRF 0..51, lower is better and bigger (default 18; 0 is mathematically lossless but
              few browsers play it). WebP: None = lossless (default), 0..100 = lossy quality. GIF: ignored.
    metadata: key -> text (non-strings are JSON-encoded), e.g. {"prompt": ..., "workflow": ...}; stored as MP4
              container tags, as WebP EXIF the way ComfyUI does (drag-and-drop loads the workflow), and as one GIF
              comment holding a JSON object.
    audio:    (waveform float [channels, samples] in -1..1, sample rate) or None. MP4 only: encoded as AAC
              (FFmpeg's native encoder) and cut or padded with silence to the video's length (after pingpong);
              a rate AAC cannot store is resampled to the nearest one it can. GIF and WebP have no sound: ignored.

    GIF and WebP encoders merge consecutive identical frames into one longer frame (timing is kept), so such
    files decode to fewer frames. MP4 needs even sizes for yuv420p: odd widths/heights are padded by repeating the
    last column/row, so the file is one pixel wider/taller. Raises ValueError for bad arguments.
    """
    fmt = _check_format(fmt, path)
    frames = _check_frames(frames, fmt)
    fps = _check_fps(fps)
    loop = _check_loop(loop)
    quality = _check_quality(quality, fmt)
    metadata = _check_metadata(metadata)
    audio = _check_audio(audio) if fmt == "mp4" else None
    if pingpong and len(frames) > 2:
        frames = np.concatenate([frames, frames[-2:0:-1]], axis=0)

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _create_temp(folder, os.path.basename(path))
    try:
        _ENCODERS[fmt](frames, tmp, fps, loop, quality, metadata, audio)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# --- validation -------------------------------------------------------------------------------------------------

def _check_format(fmt, path) -> str:
    if fmt is None:
        fmt = os.path.splitext(os.fspath(path))[1]
        if not fmt:
            raise ValueError(f"fmt=None and the path {os.fspath(path)!r} has no extension to take the format from: "
                             f"pass fmt as one of {', '.join(FORMATS)}.")
    if not isinstance(fmt, str):
        raise ValueError(f"fmt must be a string, one of {', '.join(FORMATS)}; got {fmt!r}.")
    key = fmt.strip().lower().lstrip(".")
    if key not in FORMATS:
        raise ValueError(f"Unknown video format {fmt!r}: use one of {', '.join(FORMATS)}.")
    return key


def _check_frames(frames, fmt: str) -> np.ndarray:
    if frames is None:
        raise ValueError("frames is None: pass a uint8 numpy array of shape [N, H, W, 3].")
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must have shape [N, H, W, 3] (RGB), got shape {tuple(arr.shape)}; "
                         "add a batch axis for a single image (frames[None]) and drop alpha (frames[..., :3]).")
    if arr.shape[0] == 0:
        raise ValueError(f"frames is an empty batch (shape {tuple(arr.shape)}): there is nothing to save; "
                         "pass at least one frame.")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"frames have zero width or height (shape {tuple(arr.shape)}).")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0..255), got dtype {arr.dtype}; convert floats in 0..1 with "
                         "(x * 255).round().clip(0, 255).astype(np.uint8).")
    limit = MAX_SIDE[fmt]
    if arr.shape[1] > limit or arr.shape[2] > limit:
        raise ValueError(f"{fmt} cannot store {arr.shape[2]}x{arr.shape[1]} frames (largest side {limit}): "
                         "downscale the frames or pick another format.")
    return np.ascontiguousarray(arr)


def _check_fps(fps) -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a number of frames per second, got {fps!r}; e.g. fps=8.") from None
    if isinstance(fps, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"fps must be a positive, finite number of frames per second, got {fps!r}; e.g. fps=8.")
    if value < MIN_FPS:
        raise ValueError(f"fps={fps!r} is too slow to store (minimum {MIN_FPS}, one frame per 1000 s).")
    return value


def _check_loop(loop) -> int:
    if isinstance(loop, bool) or not isinstance(loop, (int, np.integer)) or not 0 <= loop <= MAX_LOOP:
        raise ValueError(f"loop must be an integer from 0 (forever) to {MAX_LOOP}, got {loop!r}.")
    return int(loop)


def _check_quality(quality, fmt: str) -> int | None:
    if quality is None or fmt == "gif":
        return None
    lo, hi = MP4_CRF_RANGE if fmt == "mp4" else WEBP_QUALITY_RANGE
    meaning = "the x264 CRF (lower = better)" if fmt == "mp4" else "the lossy WebP quality (None = lossless)"
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not lo <= quality <= hi:
        raise ValueError(f"quality={quality!r} is out of range for {fmt}: it is {meaning}, an integer {lo}..{hi}.")
    return int(quality)


def _check_audio(audio) -> tuple[np.ndarray, int] | None:
    if audio is None:
        return None
    try:
        waveform, rate = audio
    except (TypeError, ValueError):
        raise ValueError("audio must be None or (waveform [channels, samples], sample_rate).") from None
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim == 1:
        wave = wave[None]
    if wave.ndim != 2 or not 1 <= wave.shape[0] <= len(AUDIO_LAYOUTS):
        raise ValueError(f"audio waveform must have shape [channels, samples] with 1 to {len(AUDIO_LAYOUTS)} "
                         f"channels, got shape {tuple(wave.shape)}.")
    whole = isinstance(rate, (int, np.integer, float, np.floating)) and not isinstance(rate, bool) and \
        math.isfinite(rate) and rate == int(rate)
    if not whole or not MIN_AUDIO_RATE <= rate <= MAX_AUDIO_RATE:
        raise ValueError(f"audio sample rate must be a whole number of Hz from {MIN_AUDIO_RATE} to "
                         f"{MAX_AUDIO_RATE}, got {rate!r}.")
    if wave.shape[1] == 0:
        return None
    if not np.isfinite(wave).all():
        raise ValueError("audio waveform contains NaN or infinite samples.")
    return np.clip(wave, -1.0, 1.0), int(rate)


def _check_metadata(metadata) -> dict[str, str]:
    if not metadata:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict of key -> text, got {type(metadata).__name__}.")
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or ":" in key:
            raise ValueError(f"metadata key {key!r} is invalid: keys must be non-empty strings without ':'.")
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


# --- helpers ----------------------------------------------------------------------------------------------------

def _create_temp(folder: str, name: str) -> str:
    """Create an empty, hidden temporary file next to the target (permissions as for a normal new file)."""
    while True:
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def fps_fraction(fps: float) -> Fraction:
    """The frame rate as a small exact fraction: 8 -> 8/1, 12.5 -> 25/2, 29.97 -> 2997/100, 30000/1001 stays."""
    frac = Fraction(fps).limit_denominator(1001)
    if abs(float(frac) - fps) > 1e-6 * fps:
        frac = Fraction(fps).limit_denominator(1_000_000)
    return frac


def frame_delays_ms(count: int, fps: float, unit_ms: int = 1, minimum_units: int = 1) -> list[int]:
    """Per-frame delays in whole ``unit_ms`` steps whose running sum tracks i * 1000 / fps (no drift)."""
    step = 1000.0 / fps / unit_ms
    ends = [round((i + 1) * step) for i in range(count)]
    delays = [max(minimum_units, end - start) for start, end in zip([0] + ends[:-1], ends)]
    return [d * unit_ms for d in delays]


def _pil_frames(frames: np.ndarray):
    from PIL import Image
    return [Image.fromarray(frame, "RGB") for frame in frames]


# --- GIF --------------------------------------------------------------------------------------------------------

def _gif_palettised(frames: np.ndarray):
    """Palette images for GIF. Exact when all frames together (or each frame on its own) use <= 256 colours;
    otherwise one shared 255-colour palette for the whole clip (no colour flicker) with Floyd-Steinberg dither."""
    from PIL import Image

    packed = (frames[..., 0].astype(np.uint32) << 16) | (frames[..., 1].astype(np.uint32) << 8) | frames[..., 2]

    def exact(values: np.ndarray, colours: np.ndarray) -> Image.Image:
        index = np.searchsorted(colours, values).astype(np.uint8)
        image = Image.fromarray(index, "P")
        rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1).astype(np.uint8)
        image.putpalette(rgb.tobytes(), "RGB")
        return image

    if len(np.unique(packed[0])) <= 256:
        colours = np.unique(packed)
        if len(colours) <= 256:
            return [exact(values, colours) for values in packed]
        per_frame = [np.unique(values) for values in packed]
        if all(len(c) <= 256 for c in per_frame):
            return [exact(values, colours) for values, colours in zip(packed, per_frame)]

    step = max(1, len(frames) // 16)
    sample = np.concatenate([frame[::2, ::2] for frame in frames[::step]], axis=0)
    palette = Image.fromarray(np.ascontiguousarray(sample), "RGB").quantize(GIF_COLOURS,
                                                                          method=Image.Quantize.FASTOCTREE)
    return [image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG) for image in _pil_frames(frames)]


def _write_gif(frames, path, fps, loop, quality, metadata, audio=None):  # no sound in GIF
    delays = frame_delays_ms(len(frames), fps, unit_ms=10, minimum_units=GIF_MIN_DELAY_CS)
    if 100.0 / fps < GIF_MIN_DELAY_CS:
        log.warning("GIF cannot play faster than %d fps in browsers; %.3g fps is written as %d ms per frame.",
                    100 // GIF_MIN_DELAY_CS, fps, GIF_MIN_DELAY_CS * 10)
    images = _gif_palettised(frames)
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:], "duration": delays,
                               "disposal": 1, "optimize": True}
    # GIF's NETSCAPE loop count is the number of *repeats*: absent = play once, 0 = forever, n = n + 1 plays.
    if loop != 1:
        options["loop"] = 0 if loop == 0 else loop - 1
    if metadata:
        options["comment"] = json.dumps(metadata).encode("ascii")
    images[0].save(path, format="GIF", **options)


# --- WebP -------------------------------------------------------------------------------------------------------

def webp_exif(metadata: Mapping[str, str]):
    """EXIF block laid out like the host's SaveAnimatedWEBP (see WEBP_PROMPT_TAG)."""
    from PIL import Image

    exif = Image.Exif()
    tag = WEBP_FIRST_TAG
    for key, value in metadata.items():
        if not value.isascii():  # EXIF ASCII fields: Pillow would turn other characters into '?'
            try:
                value = json.dumps(json.loads(value))  # same JSON, non-ASCII written as \\u escapes
            except ValueError:
                log.warning("WebP metadata %r is not ASCII: non-ASCII characters are stored as '?'.", key)
        if key == "prompt":
            exif[WEBP_PROMPT_TAG] = f"{key}:{value}"
        elif tag < WEBP_LAST_TAG:
            log.warning("WebP EXIF has no room for metadata key %r: skipped.", key)
        else:
            exif[tag] = f"{key}:{value}"
            tag -= 1
    return exif


def _write_webp(frames, path, fps, loop, quality, metadata, audio=None):  # no sound in WebP
    images = _pil_frames(frames)
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:], "loop": loop,
                               "duration": frame_delays_ms(len(frames), fps), "method": 4}
    if quality is None:
        options.update(lossless=True, quality=80)  # in lossless mode "quality" is compression effort
    else:
        options.update(lossless=False, quality=quality)
    if metadata:
        options["exif"] = webp_exif(metadata)
    images[0].save(path, format="WEBP", **options)


# --- MP4 --------------------------------------------------------------------------------------------------------

def _write_mp4(frames, path, fps, loop, quality, metadata, audio=None):
    import av
    from av.video.reformatter import Interpolation

    n, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        log.info("H.264 yuv420p needs even sizes: padding %dx%d frames to %dx%d.", width, height,
                 width + pad_w, height + pad_h)
    crf = DEFAULT_MP4_CRF if quality is None else quality
    rate = fps_fraction(fps)
    # use_metadata_tags: store arbitrary keys (prompt, workflow) as the host does; faststart: playable while loading.
    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart+use_metadata_tags"}) as container:
        for key, value in metadata.items():
            container.metadata[key] = value
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width + pad_w, height + pad_h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        ctx = stream.codec_context
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT709
        ctx.color_range = _RANGE_MPEG
        sound = _AacTrack(container, audio, n / rate) if audio is not None else None
        for i in range(n):
            rgb = frames[i]
            if pad_h or pad_w:
                rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG",
                interpolation=Interpolation.BICUBIC | Interpolation.ACCURATE_RND)
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
            if sound is not None:  # interleave: the sound up to the end of this frame
                sound.write_until((i + 1) / rate)
        container.mux(stream.encode(None))
        if sound is not None:
            sound.finish()


class _AacTrack:
    """The MP4's AAC stream, fed in pieces between the video frames; exactly `duration` seconds long."""

    def __init__(self, container, audio, duration):
        waveform, rate = audio
        channels = waveform.shape[0]
        layout = AUDIO_LAYOUTS[channels - 1]
        aac_rate = min(AAC_RATES, key=lambda r: (abs(r - rate), -r))
        if aac_rate != rate:
            log.info("AAC cannot store %d Hz: resampling the sound to %d Hz.", rate, aac_rate)
            waveform = _resample(waveform, rate, aac_rate, layout)
            rate = aac_rate
        total = round(duration * rate)
        if waveform.shape[1] < total:  # pad with silence / cut to the video's length
            waveform = np.pad(waveform, ((0, 0), (0, total - waveform.shape[1])))
        self.waveform = np.ascontiguousarray(waveform[:, :total], dtype=np.float32)
        self.rate, self.layout, self.written = rate, layout, 0
        self.container = container
        self.stream = container.add_stream("aac", rate=rate, layout=layout)

    def write_until(self, seconds):
        import av

        end = min(self.waveform.shape[1], round(seconds * self.rate))
        if end <= self.written:
            return
        frame = av.AudioFrame.from_ndarray(self.waveform[:, self.written:end], format="fltp", layout=self.layout)
        frame.sample_rate = self.rate
        frame.pts = self.written
        frame.time_base = Fraction(1, self.rate)
        self.container.mux(self.stream.encode(frame))
        self.written = end

    def finish(self):
        self.write_until(self.waveform.shape[1] / self.rate)
        self.container.mux(self.stream.encode(None))


def _resample(waveform: np.ndarray, rate: int, new_rate: int, layout: str) -> np.ndarray:
    import av

    resampler = av.AudioResampler(format="fltp", layout=layout, rate=new_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform), format="fltp", layout=layout)
    frame.sample_rate = rate
    frame.pts = 0
    frame.time_base = Fraction(1, rate)
    parts = [f.to_ndarray() for f in [*resampler.resample(frame), *resampler.resample(None)]]
    return np.concatenate(parts, axis=1) if parts else np.zeros((waveform.shape[0], 0), np.float32)


_ENCODERS = {"gif": _write_gif, "webp": _write_webp, "mp4": _write_mp4}

"""Videos and captions -> training clips. Pure: torch, numpy, PyAV and Pillow, no host imports.

A dataset is a folder of videos (searched recursively) with captions in either or both of two forms:

    my_videos/
        captions.csv        WebVid-style: a video column (videoid, file, video, path, ...) and a caption
        1066692580.mp4      column (name, caption, text, prompt); ids match a file's stem or relative path
        walk/dog.mp4
        walk/dog.txt        a caption beside a video; wins over the CSV

A clip follows AnimateDiff's recipe (formats.md §8): ``frames`` frames spread over at most
``(frames - 1) * stride + 1`` source frames from a random start, each resized to cover the training size and
center-cropped, scaled to [-1, 1]. Files that cannot be read are skipped and listed in ``skipped`` (and in the
log), both when the folder is scanned and when a clip fails to decode later.

All randomness comes from the ``random.Random`` handed to :meth:`VideoDataset.load`; :class:`ShardedSampler`
derives one per clip from (seed, epoch, rank, position), so a run resumed from its sampler state sees exactly
the clips it would have seen.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..video.decode import iter_frames, probe

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif", ".webp")
ID_COLUMNS = ("videoid", "video_id", "video", "file", "filename", "path")
CAPTION_COLUMNS = ("name", "caption", "text", "prompt")
MAX_RETRIES = 10  # a clip that fails to decode is replaced by another random one, this many times at most


class DatasetError(ValueError):
    """A dataset that cannot be used: the message says which folder or file, why, and what to do."""


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from the videos. Defaults are the original AnimateDiff recipe, except the size
    (the original trained at 256) and the flip, which the original applied and which is off here because it
    reverses horizontal motion (fatal for a "pan right" motion LoRA)."""

    frames: int = 16              # frames per clip
    stride: int = 4               # source frames between two clip frames (shorter videos are squeezed)
    width: int = 256              # training size in pixels; frames are resized to cover it, then center-cropped
    height: int = 256
    random_start: bool = True     # False: every clip starts at the first frame (deterministic clips)
    hflip: bool = False           # random horizontal flip, probability 0.5
    caption_dropout: float = 0.1  # probability of training on the empty caption (classifier-free guidance)

    def __post_init__(self):
        if self.frames < 1 or self.stride < 1:
            raise DatasetError(f"frames ({self.frames}) and stride ({self.stride}) must be at least 1.")
        if self.width < 8 or self.height < 8 or self.width % 8 or self.height % 8:
            raise DatasetError(f"training size {self.width}x{self.height}: both sides must be multiples of 8 "
                               "(the VAE's downscale factor), at least 8.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise DatasetError(f"caption_dropout {self.caption_dropout} is not a probability.")

    @property
    def span(self) -> int:
        """Source frames one clip covers at most."""
        return (self.frames - 1) * self.stride + 1


@dataclass(frozen=True)
class VideoEntry:
    path: Path
    name: str        # path relative to the dataset folder, for messages
    caption: str
    frames: int      # decodable frames, counted when the folder was scanned
    mtime_ns: int    # with the size: the identity the latent cache keys on
    size_bytes: int


@dataclass
class Clip:
    pixels: Tensor            # f 3 h w, float32 in [-1, 1]
    caption: str              # "" when dropped
    video: VideoEntry
    indices: tuple[int, ...]  # source frame of each clip frame
    flipped: bool


# ------------------------------------------------------------------------------------------------ captions

def read_captions_csv(path: str | os.PathLike, id_column: str | None = None,
                      caption_column: str | None = None) -> dict[str, str]:
    """{video id or relative path: caption} from a CSV with a header row; columns are found by name."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    # UTF-8 (with or without the BOM spreadsheets write) or UTF-16 with its BOM ("Unicode text" in Excel).
    # Anything else is refused rather than guessed: latin-1 would "decode" any bytes, so captions saved as
    # cp1252 or Shift-JIS would train as garbage without a word.
    encoding = "utf-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    fix = "Save it as UTF-8 (in a spreadsheet: CSV UTF-8) and run again."
    if encoding == "utf-8-sig" and b"\x00" in head:
        raise DatasetError(f"captions file {path}: holds NUL bytes, like UTF-16 text without a byte-order mark. {fix}")
    try:
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.DictReader(f)
            fields = {name.strip().lower(): name for name in reader.fieldnames or []}
            id_key = _pick_column(fields, id_column, ID_COLUMNS, path, "video id/file")
            caption_key = _pick_column(fields, caption_column, CAPTION_COLUMNS, path, "caption")
            return {str(row[id_key]).strip(): str(row[caption_key] or "").strip()
                    for row in reader if row.get(id_key)}
    except UnicodeDecodeError as e:
        byte = e.object[e.start:e.start + 1].hex()
        raise DatasetError(f"captions file {path}: not {'UTF-16' if encoding == 'utf-16' else 'UTF-8'} text (it "
                           f"holds the byte 0x{byte}; latin-1 and other legacy encodings are not guessed). {fix}"
                           ) from None


def _pick_column(fields: dict[str, str], wanted: str | None, known: tuple[str, ...], path: Path, what: str) -> str:
    for name in ([wanted] if wanted else known):
        if name.strip().lower() in fields:
            return fields[name.strip().lower()]
    raise DatasetError(f"{path.name}: no {what} column (looked for {', '.join(([wanted] if wanted else known))}; "
                       f"the file has {', '.join(fields.values()) or 'no header'}). Name the column, e.g. "
                       f"--{'id' if 'id' in what else 'caption'}-column.")


# ------------------------------------------------------------------------------------------------ decoding

def count_frames(path: str | os.PathLike) -> int:
    """Frames in a video or animation (from the container's index, else by counting packets); raises
    ValueError on a file that cannot be opened as one."""
    frames = int(probe(path)["frames"] or 0)
    if frames < 1:
        raise ValueError("no video frames")
    return frames


def decode_frames(path: str | os.PathLike, indices: Iterable[int]) -> dict[int, np.ndarray]:
    """{index: uint8 RGB frame [H, W, 3]} for the wanted source frames, streamed (video.iter_frames: colour
    range and rotation handled; decoding stops after the last wanted frame). ValueError when the file ends before
    a wanted frame (a cut-off file whose header declares more frames than it holds)."""
    wanted = sorted(set(indices))
    keep = set(wanted)
    steps = {b - a for a, b in zip(wanted, wanted[1:])}
    step = steps.pop() if len(steps) == 1 else 1  # evenly spaced: only those frames are converted to RGB
    picked = range(wanted[0], wanted[-1] + 1, step)
    found: dict[int, np.ndarray] = {}
    with iter_frames(path, start=wanted[0], count=len(picked), every_nth=step) as frames:
        for index, frame in zip(picked, frames):
            if index in keep:
                found[index] = frame
        read, declared = frames.frames_read, frames.frames_declared
    if len(found) < len(wanted):
        # Fewer frames than the header declared (a cut-off file): repeating the last one would teach a still
        # ending, so the clip fails and the dataset skips it. The reason names the video, not the clip, so the
        # skipped list gets one line per file however many of its clips fail.
        if declared and read < declared:
            raise ValueError(f"truncated: only {read} of the {declared} frames its header declares decode "
                             "(a cut-off download or copy?); clips that reach past them are skipped. Replace the "
                             "file with a complete copy.")
        raise ValueError(f"only {read} frames decode, fewer than the frame count read when the folder was scanned; "
                         "clips that reach past them are skipped.")
    return found


def fit_frame(frame: np.ndarray, width: int, height: int) -> Tensor:
    """uint8 [H, W, 3] -> float32 [3, height, width] in [-1, 1]: resized (antialiased) so that it covers the
    target, then center-cropped; for a square target that is "short side to size", as in the original."""
    image = torch.from_numpy(np.array(frame)).permute(2, 0, 1).float().div_(255.0)  # 3 H W (a copy: frames may be read-only)
    h, w = image.shape[1:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp_(0.0, 1.0)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image[:, top:top + height, left:left + width].mul(2.0).sub(1.0)


def clip_indices(total: int, spec: ClipSpec, rng: random.Random) -> list[int]:
    """Source frames of one clip: ``spec.frames`` indices spread evenly (floored) over a window of at most
    ``spec.span`` frames at a random start; a shorter video is squeezed into the clip (frames may repeat)."""
    span = min(total, spec.span)
    start = rng.randint(0, total - span) if spec.random_start else 0
    if spec.frames == 1:
        return [start]
    return [start + int(i * (span - 1) / (spec.frames - 1)) for i in range(spec.frames)]


# ------------------------------------------------------------------------------------------------ dataset

class VideoDataset:
    """The videos of a folder with their captions; :meth:`load` cuts a clip.

    Args:
        folder: searched recursively for ``VIDEO_SUFFIXES`` files.
        spec: how clips are cut.
        captions: a CSV file; None uses the folder's only ``*.csv`` if there is exactly one.
        id_column, caption_column: CSV column names, when they are not among the usual ones.
        latent_cache: a folder where the trainer may keep VAE latents (see :class:`LatentCache`); None: no cache.
    """

    def __init__(self, folder: str | os.PathLike, spec: ClipSpec = ClipSpec(), captions: str | os.PathLike | None = None,
                 id_column: str | None = None, caption_column: str | None = None,
                 latent_cache: str | os.PathLike | None = None):
        self.folder = Path(folder)
        self.spec = spec
        self.latent_cache = Path(latent_cache) if latent_cache else None
        if not self.folder.is_dir():
            raise DatasetError(f"dataset folder {self.folder} does not exist or is not a folder.")
        self.skipped: list[tuple[str, str]] = []
        self.uncaptioned = 0
        table = self._caption_table(captions, id_column, caption_column)
        files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        listed = set()
        self.videos: list[VideoEntry] = []
        for path in files:
            name = path.relative_to(self.folder).as_posix()
            caption, key = self._caption(path, name, table)
            listed.add(key)
            try:
                frames = count_frames(path)
            except Exception as e:  # corrupt, truncated, not a video: report and go on
                self.skipped.append((name, _reason(e)))
                continue
            stat = path.stat()
            self.videos.append(VideoEntry(path, name, caption, frames, stat.st_mtime_ns, stat.st_size))
            self.uncaptioned += key is None and not caption
        missing = [k for k in table if k not in listed]
        if missing:
            self.skipped.extend((k, "listed in the captions CSV, no such video in the folder") for k in missing)
        self._log_report()
        if not self.videos:
            raise DatasetError(f"no readable videos in {self.folder} ({len(files)} video files found, "
                               f"{len(self.skipped)} skipped). Supported: {', '.join(VIDEO_SUFFIXES)}.")

    def _caption_table(self, captions, id_column, caption_column) -> dict[str, str]:
        if captions is None:
            found = sorted(self.folder.glob("*.csv"))
            if len(found) > 1:
                raise DatasetError(f"{self.folder} holds several CSV files ({', '.join(p.name for p in found)}); "
                                   "say which one has the captions.")
            captions = found[0] if found else None
        elif not Path(captions).is_absolute() and not Path(captions).exists():
            captions = self.folder / captions
        if captions is None:
            return {}
        if not Path(captions).is_file():
            raise DatasetError(f"captions file {captions} does not exist.")
        return read_captions_csv(captions, id_column, caption_column)

    def _caption(self, path: Path, name: str, table: dict[str, str]) -> tuple[str, str | None]:
        """(caption, the CSV key that matched or None): a .txt beside the video wins over the CSV."""
        key = next((k for k in (name, path.name, path.stem) if k in table), None)
        beside = path.with_suffix(".txt")
        if beside.is_file():
            return beside.read_text(encoding="utf-8", errors="replace").strip(), key
        if key is not None:
            return table[key], key
        return "", None

    def _log_report(self) -> None:
        log.info("%s", self.report())
        for name, reason in self.skipped:
            log.warning("skipped %s: %s", name, reason)

    def report(self) -> str:
        """A few lines for people: what was found, what was skipped and why."""
        lines = [f"{len(self.videos)} videos in {self.folder} ({self.spec.frames} frames, stride {self.spec.stride}, "
                 f"{self.spec.width}x{self.spec.height})"]
        if self.uncaptioned:
            lines.append(f"{self.uncaptioned} without a caption (trained on the empty caption)")
        if self.skipped:
            lines.append(f"{len(self.skipped)} skipped:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.videos)

    def load(self, index: int, rng: random.Random) -> Clip:
        """The clip of video ``index`` (start, flip and caption dropout drawn from ``rng``). A video that fails
        to decode is added to ``skipped`` and another one, drawn from ``rng``, is tried instead."""
        for _ in range(MAX_RETRIES):
            video = self.videos[index]
            indices = clip_indices(video.frames, self.spec, rng)
            flipped = self.spec.hflip and rng.random() < 0.5
            dropped = rng.random() < self.spec.caption_dropout
            try:
                frames = decode_frames(video.path, indices)
            except Exception as e:
                reason = _reason(e)
                if (video.name, reason) not in self.skipped:
                    self.skipped.append((video.name, reason))
                    log.warning("skipped %s while training: %s", video.name, reason)
                index = rng.randrange(len(self.videos))
                continue
            pixels = torch.stack([fit_frame(frames[i], self.spec.width, self.spec.height) for i in indices])
            if flipped:
                pixels = pixels.flip(-1)
            return Clip(pixels, "" if dropped else video.caption, video, tuple(indices), flipped)
        raise DatasetError(f"{MAX_RETRIES} clips in a row failed to decode in {self.folder}; see the skipped list:\n"
                           f"{self.report()}")


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ------------------------------------------------------------------------------------------------ sampling

class ShardedSampler:
    """Which clips each process trains on, step after step.

    Every epoch is a fresh permutation of the dataset (seeded by ``seed`` and the epoch), padded to a multiple
    of ``world_size`` and dealt out round-robin, so the processes of a torch.distributed run see disjoint
    shards of equal length. Each clip gets its own ``random.Random`` seeded from (seed, epoch, rank, position):
    the state is just (epoch, position), which makes resuming exact.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise DatasetError("the dataset is empty.")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._shard = self._deal(0)

    def _deal(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"order:{self.seed}:{epoch}").shuffle(order)
        per_rank = math.ceil(self.size / self.world_size)
        order = (order * self.world_size)[:per_rank * self.world_size]  # pad by repeating the start
        return order[self.rank::self.world_size]

    def next_batch(self) -> list[tuple[int, random.Random]]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._shard):
                self.epoch, self.position = self.epoch + 1, 0
                self._shard = self._deal(self.epoch)
            rng = random.Random(f"clip:{self.seed}:{self.epoch}:{self.rank}:{self.position}")
            batch.append((self._shard[self.position], rng))
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._shard = self._deal(self.epoch)


# ------------------------------------------------------------------------------------------------ latent cache

class LatentCache:
    """VAE latents of single frames on disk, so later epochs skip the VAE.

    A frame's file is keyed by its video (absolute path, modification time, size in bytes), the crop
    (width, height, flip), its source index and ``encoder`` (a fingerprint of the VAE): editing or replacing a
    video, or switching VAE, gives new keys, so a stale latent is never read. Keying by frame rather than by
    clip means a random start reuses every frame an earlier epoch encoded. Files are written atomically, so
    several processes may share one cache.
    """

    def __init__(self, root: str | os.PathLike, encoder: str):
        self.root = Path(root)
        self.encoder = encoder
        self.hits = self.misses = 0

    def _paths(self, clip: Clip, width: int, height: int) -> list[Path]:
        video = clip.video
        identity = f"{video.path.resolve()}|{video.mtime_ns}|{video.size_bytes}|{width}x{height}|{self.encoder}"
        folder = self.root / hashlib.sha1(identity.encode()).hexdigest()
        flip = "f" if clip.flipped else ""
        return [folder / f"{index:07d}{flip}.safetensors" for index in clip.indices]

    def get(self, clip: Clip) -> Tensor | None:
        """The clip's latents [f, c, h, w] if every frame is cached, else None."""
        from safetensors.torch import load_file
        paths = self._paths(clip, clip.pixels.shape[-1], clip.pixels.shape[-2])
        if not all(p.is_file() for p in paths):
            self.misses += 1
            return None
        try:
            latents = torch.stack([load_file(p)["latent"] for p in paths])
        except Exception as e:  # a damaged file: encode again and overwrite it
            log.warning("latent cache: unreadable entry for %s (%s); encoding again", clip.video.name, _reason(e))
            self.misses += 1
            return None
        self.hits += 1
        return latents

    def put(self, clip: Clip, latents: Tensor) -> None:
        from safetensors.torch import save_file
        paths = self._paths(clip, clip.pixels.shape[-1], clip.pixels.shape[-2])
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, latent in zip(paths, latents.detach().to("cpu", torch.float32)):
            if path.is_file():
                continue
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            save_file({"latent": latent.contiguous()}, tmp)
            os.replace(tmp, path)

"""Measuring clips of the small world against what their prompts asked (issue 15). Pure torch, no host imports.

Every measure reads pixels only, so it applies alike to rendered clips (where world/scenes.py knows the truth) and
to generated ones: a clip is a tensor [frames, 3, SIZE, SIZE] in [0, 1], a batch [clips, frames, 3, SIZE, SIZE].

Definitions (the README quotes them):

- **Object weight** of a pixel p for a named colour c: how far p lies from the frame's background toward c,
  ``clamp(1 - |p - c| / D, 0, 1)`` in RGB, with D the median of ``|p - c|`` over the frame's pixels that are not
  wake (the background's distance, as the object covers a few per cent of the picture); kept only on the object's
  core (pixels at least half-way to c) and the pixels next to it. Linear in a pixel's coverage, so anti-aliased and
  blurred edges count by how much of the object they hold, and a blurry or off-colour object still counts.
- **Position**: per axis, the circular (torus) mean of the weights' marginal, then refined by the weighted mean of
  the wrapped offsets within OBJECT_RADIUS + 3.5 pixels of it; an object split across an edge is measured whole.
  **Area**: the sum of the weights, in pixels (a rendered object is about 64). An object is *found* on a frame
  when its area is at least MIN_AREA.
- **Velocity**: the least-squares slope, in pixels per frame, of the track unwrapped by frame-to-frame steps each
  taken in (-SIZE/2, SIZE/2], over the frames where the object is found.
- **Motion accuracy** (motion_scores): a clip's motion is right when the nearest of the four compass directions to
  its velocity is the prompt's and its speed is at least MIN_SPEED; chance is 0.25.
- **Wake behind** (wake_behind): the share of frames whose wake (pixels lighter than WAKE_MIN in every channel)
  lies, by its centroid's offset from the object, nearest the compass direction opposite the prompt's: one frame
  showing the prompted motion, as a frame of the world's moving objects does.
- **Appearance change** of a step: ``|dA| / mean(A) + |dc| / |mean(c)|`` between consecutive frames, with A the
  object's area and c its weighted mean colour (RGB); 0 when the object looks the same.
- **Seam ratio** (seam_scores): the median displacement error (a step's distance from the clip's median step) at
  the given hand-over transitions, against the median elsewhere, each plus a floor so that a clean clip reads 1;
  likewise for appearance change.
- **Global displacement**: the whole-frame shift (objects and wakes masked out when asked) between consecutive
  frames that minimises the mean squared difference on the torus (integer search within MAX_SHIFT, then a parabola
  through the neighbours), averaged.
- **Domain share** (DomainClassifier): the share of frames that a logistic regression on 4x4 colour means, fit on
  rendered base-background vs ocean-background images, calls personalized.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scenes
from .scenes import COLOURS, DIRECTIONS, SIZE

CORE = 0.5                # object weight from which a pixel is the object's core; named colours are >= 0.68 apart
MIN_CONTRAST = 0.3        # floor on D, the background's RGB distance from the colour (when the colour fills the frame)
WINDOW = scenes.OBJECT_RADIUS + 3.5  # pixels around the rough centre that the refined position averages over
MIN_AREA = 16.0           # pixels of weight for "found": a quarter of a rendered object
MIN_SPEED = 0.15          # pixels per frame: slower counts as not moving (the slow prompt speed is 0.5)
WAKE_MIN = 0.62           # a pixel lighter in every channel is wake: no background, nor an object's edge on one, is
MIN_WAKE = 4              # pixels of wake for a frame to show one (a rendered wake has 16 or more)
MAX_SHIFT = 4             # pixels per frame searched by global_displacement (the striped pattern repeats at 8)
# added to both sides of a seam ratio: the step error and appearance change that rendered, steady clips already
# show (the tracker's sub-pixel bias, the edges' anti-aliasing), below which a difference is measurement
SEAM_FLOOR_PX, SEAM_FLOOR_APPEARANCE = 0.2, 0.05


def _clip(frames: Tensor, name: str = "clip", min_frames: int = 1) -> Tensor:
    """Checks a clip [frames, 3, SIZE, SIZE] in [0, 1] and returns it as float32."""
    if not isinstance(frames, Tensor) or frames.dim() != 4 or tuple(frames.shape[1:]) != (3, SIZE, SIZE):
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"{name}: expected a tensor [frames, 3, {SIZE}, {SIZE}] (the world's pixels), got {shape}; "
                         "decode latents to pixels and put the channels before height and width")
    if frames.numel() and frames.min() < -0.05:
        raise ValueError(f"{name}: values go down to {frames.min().item():.2f}, expected [0, 1]; "
                         "for frames in [-1, 1] pass (frames + 1) / 2")
    if len(frames) < min_frames:
        raise ValueError(f"{name}: {len(frames)} frame(s); measuring change needs at least {min_frames}")
    return frames.float()


def _colour(name: str) -> Tensor:
    if name not in COLOURS:
        raise ValueError(f"unknown colour {name!r}; one of {tuple(COLOURS)}")
    return torch.tensor(COLOURS[name])


def wrap(delta: Tensor) -> Tensor:
    """A difference on the torus, taken in (-SIZE/2, SIZE/2]."""
    return SIZE / 2 - torch.remainder(SIZE / 2 - delta, SIZE)


def wake_pixels(frames: Tensor) -> Tensor:
    """[frames, SIZE, SIZE] bool: the pixels lighter than WAKE_MIN in every channel, which only a wake is."""
    return frames.amin(1) > WAKE_MIN


def object_weights(frames: Tensor, colour: str) -> Tensor:
    """[frames, SIZE, SIZE] weight in [0, 1]: how much of each pixel is the object of ``colour`` (module
    docstring). Another named colour weighs 0: it is never half-way from a background to ``colour`` (the named
    colours are at least 0.68 apart in RGB, every background within 1.15 of each), so it has no core."""
    frames = _clip(frames)
    distance = (frames - _colour(colour)[None, :, None, None]).norm(dim=1)            # [frames, H, W]
    wake = wake_pixels(frames)                            # not background: left out of the median that stands for it
    background = distance.masked_fill(wake, float("nan")).flatten(1).nanmedian(1).values
    background = background.nan_to_num(MIN_CONTRAST).clamp_min(MIN_CONTRAST)
    weight = (1 - distance / background[:, None, None]).clamp(0.0, 1.0)
    core = (weight >= CORE).float()[:, None]
    near_core = F.max_pool2d(F.pad(core, (1, 1, 1, 1), mode="circular"), 3, stride=1)[:, 0]
    return weight * near_core


def _torus_mean(marginal: Tensor) -> Tensor:
    """[frames, SIZE] weights along one axis -> [frames] centre: the circular mean, then the weighted mean of the
    wrapped offsets near it (the circular mean alone is pulled a little toward the middle of a wide object)."""
    grid = torch.arange(SIZE, dtype=marginal.dtype) + 0.5                       # pixel centres
    angle = 2 * math.pi * grid / SIZE
    rough = torch.atan2((marginal * angle.sin()).sum(-1), (marginal * angle.cos()).sum(-1)) * SIZE / (2 * math.pi)
    offset = wrap(grid[None, :] - rough[:, None])                               # [frames, SIZE]
    near = marginal * (offset.abs() <= WINDOW)
    refined = rough + (near * offset).sum(-1) / near.sum(-1).clamp_min(1e-6)
    return torch.remainder(refined, SIZE)


class Track(NamedTuple):
    positions: Tensor   # [frames, 2] object centre (x, y) in pixels, in [0, SIZE); finite even when not found
    area: Tensor        # [frames] summed object weight, pixels
    found: Tensor       # [frames] bool: area >= MIN_AREA


def track(frames: Tensor, colour: str) -> Track:
    """Where the object of ``colour`` is on each frame of a clip (module docstring: Position, Area)."""
    weight = object_weights(frames, colour)                                     # [frames, H, W]
    positions = torch.stack([_torus_mean(weight.sum(1)), _torus_mean(weight.sum(2))], dim=-1)
    area = weight.sum((1, 2))
    return Track(positions, area, area >= MIN_AREA)


def velocity(positions: Tensor, found: Tensor | None = None) -> tuple[float, float]:
    """(vx, vy) in pixels per frame: the least-squares slope of the unwrapped track over the ``found`` frames
    (all by default); (0, 0) with fewer than two."""
    frame = torch.arange(len(positions), dtype=torch.float64)
    if found is not None:
        positions, frame = positions[found], frame[found]
    if len(positions) < 2:
        return (0.0, 0.0)
    positions = positions.double()
    unwrapped = torch.cat([positions[:1], positions[:1] + wrap(positions.diff(dim=0)).cumsum(0)])
    t = (frame - frame.mean())[:, None]
    slope = (t * (unwrapped - unwrapped.mean(0))).sum(0) / (t * t).sum()
    return (slope[0].item(), slope[1].item())


def nearest_direction(vx: float, vy: float) -> str:
    """The compass direction (scenes.DIRECTIONS) closest to a velocity."""
    return max(DIRECTIONS, key=lambda name: DIRECTIONS[name][0] * vx + DIRECTIONS[name][1] * vy)


def wake_behind(clip: Tensor, result: Track, direction: str) -> float:
    """Share of a clip's frames that show the prompted motion in the one frame: the object is found and its wake
    (at least MIN_WAKE pixels lighter in every channel than WAKE_MIN) lies, by its centroid's offset from the
    object, nearest the compass direction opposite ``direction``."""
    white, grid = wake_pixels(clip), torch.arange(SIZE, dtype=torch.float32) + 0.5
    right = 0
    for frame, (x, y) in enumerate(result.positions.tolist()):
        ys, xs = torch.nonzero(white[frame], as_tuple=True)
        if result.found[frame] and len(xs) >= MIN_WAKE:
            behind = nearest_direction(-wrap(grid[xs] - x).mean().item(), -wrap(grid[ys] - y).mean().item())
            right += behind == direction
    return right / len(clip)


def motion_scores(clips: Tensor | Sequence[Tensor], scene_list: Sequence[scenes.Scene],
                  min_speed: float = MIN_SPEED) -> dict[str, float]:
    """How well a batch of clips moves as their prompts (``scene_list``, one per clip) ask; the object is tracked
    by the scene's colour and compared with the scene's own velocity (a pan is global_displacement's to measure).

    Returns ``direction_accuracy`` (share right, see the module docstring; chance 0.25), ``cosine`` (mean cosine
    between measured and prompted velocity; 0 for a clip that does not move), ``speed_ratio`` (mean of measured
    speed / prompted speed), ``speed_error`` (mean |measured - prompted speed|, pixels per frame), ``found`` (mean
    share of frames where the object is found), ``wake_behind`` (mean share of frames whose wake shows the prompted
    motion, see wake_behind) and ``clips``."""
    if len(clips) != len(scene_list):
        raise ValueError(f"{len(clips)} clips but {len(scene_list)} scenes; pass the scene of every clip")
    right, cosine, ratio, error, found, wake = [], [], [], [], [], []
    for index, (clip, scene) in enumerate(zip(clips, scene_list)):
        if scene.direction is None:
            raise ValueError(f"scene {index} ({scene.caption()!r}) asks for no motion; motion_scores measures "
                             "clips whose prompt names a direction and speed")
        clip = _clip(clip, f"clip {index}")
        result = track(clip, scene.colour)
        vx, vy = velocity(result.positions, result.found)
        px, py = scene.velocity()
        speed, asked = math.hypot(vx, vy), math.hypot(px, py)
        right.append(speed >= min_speed and nearest_direction(vx, vy) == scene.direction)
        cosine.append((vx * px + vy * py) / (speed * asked) if speed > 0 else 0.0)
        ratio.append(speed / asked)
        error.append(abs(speed - asked))
        found.append(result.found.float().mean().item())
        wake.append(wake_behind(clip, result, scene.direction))
    mean = lambda values: sum(map(float, values)) / len(values)  # noqa: E731
    return {"direction_accuracy": mean(right), "cosine": mean(cosine), "speed_ratio": mean(ratio),
            "speed_error": mean(error), "found": mean(found), "wake_behind": mean(wake),
            "clips": float(len(right))}


def object_appearance(clip: Tensor, colour: str) -> tuple[Tensor, Tensor]:
    """The object's area [frames] (pixels) and weighted mean colour [frames, 3] on each frame."""
    clip = _clip(clip)
    weight = object_weights(clip, colour)
    area = weight.sum((1, 2))
    mean_colour = (clip * weight[:, None]).sum((2, 3)) / area.clamp_min(1e-6)[:, None]
    return area, mean_colour


def frame_jumps(clip: Tensor, colour: str) -> tuple[Tensor, Tensor]:
    """Per step between consecutive frames: the object's displacement [frames - 1, 2] (x, y, wrapped, pixels) and
    its appearance change [frames - 1] (module docstring)."""
    clip = _clip(clip, min_frames=2)
    result = track(clip, colour)
    area, mean_colour = object_appearance(clip, colour)
    step_area = (area[1:] + area[:-1]).clamp_min(2 * MIN_AREA) / 2     # no division by ~0 when it is missing
    step_colour = ((mean_colour[1:] + mean_colour[:-1]) / 2).norm(dim=-1).clamp_min(1e-6)
    change = area.diff().abs() / step_area + mean_colour.diff(dim=0).norm(dim=-1) / step_colour
    return wrap(result.positions.diff(dim=0)), change


def appearance_change(clip: Tensor, colour: str) -> float:
    """Temporal consistency: the mean appearance change over the clip's steps; 0 = perfectly consistent."""
    return frame_jumps(clip, colour)[1].mean().item()


def seam_scores(clip: Tensor, colour: str, boundaries: Sequence[int]) -> dict[str, float]:
    """Jumps at window hand-overs against elsewhere. A boundary b is the transition from frame b - 1 to frame b.

    A step's displacement error is its distance from the clip's median step (per axis), so steady motion costs
    nothing and a jump does. Medians, not means, so that one tracking glitch decides nothing. Returns
    ``displacement_at_seams``/``displacement_elsewhere`` (pixels), ``appearance_at_seams``/``..._elsewhere``
    and the two ``*_ratio`` values (at seams + floor) / (elsewhere + floor); 1 means no seam shows."""
    displacement, change = frame_jumps(clip, colour)
    steps = len(change)
    at = torch.zeros(steps, dtype=torch.bool)
    for b in boundaries:
        if not 1 <= b <= steps:
            raise ValueError(f"boundary {b} is outside the clip's transitions 1..{steps} (frame b - 1 to frame b)")
        at[b - 1] = True
    if at.all():
        raise ValueError("every transition is a boundary; nothing is left to compare the seams with")
    error = (displacement - displacement.median(dim=0).values).norm(dim=-1)
    scores = {}
    for name, values, floor in (("displacement", error, SEAM_FLOOR_PX), ("appearance", change, SEAM_FLOOR_APPEARANCE)):
        seams, elsewhere = values[at].median().item(), values[~at].median().item()
        scores.update({f"{name}_at_seams": seams, f"{name}_elsewhere": elsewhere,
                       f"{name}_ratio": (seams + floor) / (elsewhere + floor)})
    return scores


def frame_shifts(clip: Tensor, ignore_colour: str | None = None) -> Tensor:
    """[frames - 1, 2] whole-frame shift (dx, dy) from each frame to the next (module docstring). With
    ``ignore_colour`` the pixels of that object and of its white wake (and one pixel around) are left out, so a
    moving object on a textured background does not read as a camera move. On a plain background the object is
    all there is to see, and a pan cannot be told from the object's own motion. Where the picture has no detail
    along an axis (vertical stripes seen for a vertical shift, or nothing left at all) the smaller shift wins."""
    clip = _clip(clip, min_frames=2).double()
    valid = torch.ones(clip.shape[0], 1, SIZE, SIZE, dtype=torch.float64)
    if ignore_colour is not None:
        moving = object_weights(clip, ignore_colour) + wake_pixels(clip).double()
        near = F.max_pool2d(F.pad(moving[:, None], (1, 1, 1, 1), mode="circular"), 3, 1)
        valid = (near == 0).double()
    a, va, b, vb = clip[:-1], valid[:-1], clip[1:], valid[1:]

    def correlate(f: Tensor, g: Tensor) -> Tensor:   # [steps, SIZE, SIZE]: at s, sum_x f(x - s) g(x) on the torus
        spectrum = torch.fft.rfft2(f).conj() * torch.fft.rfft2(g)
        return torch.fft.irfft2(spectrum, s=(SIZE, SIZE)).sum(1)

    # sum over pixels seen in both frames of (a shifted by s - b)^2, expanded into three correlations
    squared = correlate(va * a * a, vb) - 2 * correlate(va * a, vb * b) + correlate(va, vb * b * b)
    shift = torch.arange(-MAX_SHIFT, MAX_SHIFT + 1)
    index = torch.remainder(shift, SIZE)
    cost = (squared / correlate(va, vb).clamp_min(1))[:, index][:, :, index].clamp_min(0)   # [steps, dy, dx]
    spread = cost.flatten(1).max(1).values - cost.flatten(1).min(1).values
    tie_break = 1e-3 * spread[:, None, None] * (shift[:, None] ** 2 + shift[None, :] ** 2) / (2 * MAX_SHIFT ** 2)
    best = (cost + tie_break).flatten(1).argmin(1)
    iy, ix = (best // len(shift)).tolist(), (best % len(shift)).tolist()
    shifts = [(shift[x].item() + _parabola(cost[k, y, :], x), shift[y].item() + _parabola(cost[k, :, x], y))
              for k, (y, x) in enumerate(zip(iy, ix))]
    return torch.tensor(shifts, dtype=torch.float32).reshape(-1, 2)


def _parabola(cost: Tensor, i: int) -> float:
    """Sub-pixel offset of a minimum at ``i`` from the parabola through it and its neighbours (0 at the ends)."""
    if i == 0 or i == len(cost) - 1:
        return 0.0
    left, centre, right = cost[i - 1].item(), cost[i].item(), cost[i + 1].item()
    curvature = left - 2 * centre + right   # a flat cost (no detail along the axis) leaves FFT rounding, ~1e-17
    return 0.0 if curvature <= 1e-9 else max(-0.5, min(0.5, 0.5 * (left - right) / curvature))


def global_displacement(clip: Tensor, ignore_colour: str | None = None) -> tuple[float, float]:
    """(dx, dy): the whole picture's mean shift per frame, pixels (x right, y down); see frame_shifts."""
    dx, dy = frame_shifts(clip, ignore_colour).mean(0).tolist()
    return (dx, dy)


def colour_per_frame(clip: Tensor) -> list[str | None]:
    """The named colour the object shows on each frame: the colour of largest object area, None where no colour
    reaches MIN_AREA (prompt travel: the object should change colour at the keyframe)."""
    clip = _clip(clip)
    names = tuple(COLOURS)
    areas = torch.stack([object_weights(clip, name).sum((1, 2)) for name in names], dim=1)  # [frames, colours]
    best = areas.argmax(1)
    return [names[i] if areas[f, i] >= MIN_AREA else None for f, i in enumerate(best.tolist())]


class DomainClassifier:
    """Personalized (ocean background) or base? A logistic regression on the colour means of a 4x4 grid
    (48 features, standardised with the training set's mean and spread), fit by full-batch gradient descent in
    float64: deterministic for the same images."""

    GRID = 4

    def __init__(self, weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor):
        self.weight, self.bias, self.mean, self.std = weight, bias, mean, std

    @classmethod
    def features(cls, images: Tensor) -> Tensor:
        """[n, 3, SIZE, SIZE] (or a batch of clips) -> [n, 3 * GRID * GRID]."""
        if images.dim() == 5:
            images = images.flatten(0, 1)
        return F.adaptive_avg_pool2d(_clip(images, "images"), cls.GRID).flatten(1).double()

    @classmethod
    def fit(cls, base: Tensor, personal: Tensor, steps: int = 300, rate: float = 0.5,
            decay: float = 1e-3) -> "DomainClassifier":
        """Fit on images of the base world (label 0) and of the personalized domain (label 1)."""
        x = torch.cat([cls.features(base), cls.features(personal)])
        y = torch.cat([torch.zeros(len(base)), torch.ones(len(personal))]).double()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
        x = (x - mean) / std
        weight, bias = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for _ in range(steps):   # gradient of the mean cross-entropy, plus decay to keep separable data bounded
            residual = torch.sigmoid(x @ weight + bias) - y
            weight = weight - rate * (x.T @ residual / len(y) + decay * weight)
            bias = bias - rate * residual.mean()
        return cls(weight, bias, mean, std)

    @classmethod
    def trained(cls, seed: int = 0, count: int = 256) -> "DomainClassifier":
        """Fit on ``count`` rendered images of each domain: base backgrounds against the ocean."""
        base, _ = scenes.image_batch(seed, count, scenes.BASE_BACKGROUNDS)
        personal, _ = scenes.image_batch(seed + 1, count, (scenes.PERSONAL_BACKGROUND,))
        return cls.fit(base, personal)

    def probability(self, images: Tensor) -> Tensor:
        """[n] probability that each image is of the personalized domain."""
        return torch.sigmoid((self.features(images) - self.mean) / self.std @ self.weight + self.bias).float()

    def share(self, images: Tensor) -> float:
        """Fraction of images (frames of a clip or a batch of clips) classified personalized."""
        return (self.probability(images) > 0.5).float().mean().item()

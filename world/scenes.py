"""The small world: captioned images and clips of one coloured shape over a background, rendered in code.

Everything is deterministic by seed and every clip carries the ground truth of its rendering (where the object
is on every frame, how the camera moved), so what a model generates can be measured against what its prompt
asked for (world/measure.py).

The world is a torus of SIZE x SIZE pixels: an object leaving one side comes back on the other, and a camera
pan is a roll of the whole frame. So any clip length and any speed stay inside the picture, and a pan moves the
background as visibly as the object.

Two things make the motion words learnable by an image model, as they are in real photos (the study measured the
motion module's direction accuracy at chance without them, because the module can read a direction only from
the frozen image model's features):
- a moving object leaves a white wake behind it, as a boat does on water, over its last WAKE_FRAMES positions:
  one frame shows which way and how fast it goes, as blur and pose do in real footage;
- pictures are framed on their subject: every still, and the first frame of every clip, has the object near the
  centre (within FRAMING pixels). A convolutional UNet on a torus has no notion of place but its subject; with
  the subject anywhere, the words must be bound to where the wake lies relative to it, which this small base
  did not learn in 1250 steps; framed, it learns where the wake goes (BENCHMARKS.md, the small world).
Captions are plain templates, e.g. "a red square moving left slowly on a striped background" (clips, and a share
of the stills: snapshots of a moving object, wake and all) or "a red square on a striped background" (a still
object, no wake). The base world's backgrounds are grey patterns and muted colour gradients, light on each of the
four sides: the motion module must learn motion apart from where a background is light (trained on grey patterns
only, it read "down" as "up" over the ocean, toward its light top). "ocean" (a cyan-to-navy gradient) is the
personalized domain: no base image ever shows it, nor anything near its colours.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

SIZE = 32                      # pixels per side
OBJECT_RADIUS = 4.0            # half the side of a square, in pixels
COLOURS = {"red": (0.90, 0.16, 0.16), "green": (0.16, 0.78, 0.24), "yellow": (0.92, 0.84, 0.16),
           "magenta": (0.86, 0.20, 0.86)}
SHAPES = ("square", "circle", "diamond")
# graded backgrounds: (light colour, dark colour, the side that is light), with soft waves across the gradient
GRADIENTS = {"sand": ((0.52, 0.45, 0.34), (0.24, 0.20, 0.13), "top"),
             "dusk": ((0.50, 0.42, 0.55), (0.20, 0.14, 0.20), "bottom"),
             "fog": ((0.55, 0.55, 0.55), (0.20, 0.20, 0.20), "left"),
             "clay": ((0.50, 0.34, 0.32), (0.22, 0.12, 0.12), "right"),
             "ocean": ((0.30, 0.80, 0.85), (0.08, 0.12, 0.45), "top")}
BASE_BACKGROUNDS = ("plain", "striped", "checked", "sand", "dusk", "fog", "clay")
PERSONAL_BACKGROUND = "ocean"
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slowly": 0.5, "quickly": 1.0}   # pixels per frame
PANS = {"left": (1.0, 0.0), "right": (-1.0, 0.0)}  # a camera panning left sees the world move right
PAN_SPEED = 1.0
FRAMING = 2.0                        # the subject's start lies within this many pixels of the centre, each axis
WAKE_FRAMES, WAKE_OPACITY = 12, 0.8  # the wake covers the object's last twelve positions (6 px slow, 12 px quick)
WAKE_COLOUR = (0.95, 0.95, 0.95)     # far from every named colour and background, so trackers can tell it apart
RENDERING = 3  # bumped whenever images change, so that models trained on the older ones are not reused


@dataclass(frozen=True)
class Scene:
    """What one image or clip shows; ``direction``/``speed`` are None for a still, ``pan`` None without a pan."""

    colour: str
    shape: str
    background: str
    start: tuple[float, float]          # object centre (x, y) on frame 0, pixels
    direction: str | None = None
    speed: str | None = None
    pan: str | None = None
    stripe_phase: float = 0.0           # where the background pattern starts, pixels

    def velocity(self) -> tuple[float, float]:
        """The object's own motion, pixels per frame (x right, y down)."""
        if self.direction is None:
            return (0.0, 0.0)
        (dx, dy), v = DIRECTIONS[self.direction], SPEEDS[self.speed]
        return (dx * v, dy * v)

    def camera_velocity(self) -> tuple[float, float]:
        """How the whole picture moves on screen because of the pan, pixels per frame."""
        if self.pan is None:
            return (0.0, 0.0)
        dx, dy = PANS[self.pan]
        return (dx * PAN_SPEED, dy * PAN_SPEED)

    def positions(self, frames: int) -> torch.Tensor:
        """[frames, 2] on-screen object centres (x, y), wrapped into [0, SIZE)."""
        (vx, vy), (cx, cy) = self.velocity(), self.camera_velocity()
        t = torch.arange(frames, dtype=torch.float64)[:, None]
        start = torch.tensor(self.start, dtype=torch.float64)
        return ((start + t * torch.tensor([vx + cx, vy + cy], dtype=torch.float64)) % SIZE).float()

    def caption(self) -> str:
        """The prompt for this scene: motion words for a moving object only."""
        thing = f"a {self.colour} {self.shape}"
        if self.direction is not None:
            thing += f" moving {self.direction} {self.speed}"
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"{thing} on {article} {self.background} background"  # a pan is the LoRA's to make, not the prompt's


def _wrapped(grid: torch.Tensor, centre: float) -> torch.Tensor:
    """Signed distance along one axis on the torus, in (-SIZE/2, SIZE/2]."""
    return torch.remainder(grid - centre + SIZE / 2, SIZE) - SIZE / 2


def object_mask(shape: str, x: float, y: float) -> torch.Tensor:
    """[SIZE, SIZE] coverage in [0, 1] of ``shape`` centred at (x, y), anti-aliased so sub-pixel motion shows."""
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
    dx, dy = _wrapped(grid[None, :], x), _wrapped(grid[:, None], y)
    distance = {"square": torch.maximum(dx.abs(), dy.abs()),
                "circle": torch.sqrt(dx * dx + dy * dy) * 0.9,       # a little larger: same area as the square
                "diamond": (dx.abs() + dy.abs()) * 0.7}[shape]
    return (OBJECT_RADIUS + 0.5 - distance).clamp(0.0, 1.0)


def background(kind: str, offset: tuple[float, float] = (0.0, 0.0), phase: float = 0.0) -> torch.Tensor:
    """[3, SIZE, SIZE] in [0, 1]; ``offset`` shifts the pattern (a camera pan), wrapping around."""
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
    x = (grid[None, :] - offset[0] - phase) % SIZE
    y = (grid[:, None] - offset[1] - phase) % SIZE
    if kind == "plain":
        grey = torch.full((SIZE, SIZE), 0.35)
    elif kind == "striped":   # vertical stripes, 8 pixels a period: a horizontal pan shows in them
        grey = 0.25 + 0.2 * (torch.sin(2 * math.pi * x / 8.0) > 0).float().expand(SIZE, SIZE)
    elif kind == "checked":
        grey = 0.25 + 0.2 * (((x // 8) + (y // 8)) % 2).float()
    elif kind in GRADIENTS:
        light, dark, side = GRADIENTS[kind]
        along, across = (y, x) if side in ("top", "bottom") else (x, y)
        t = ((along + 2.0 * torch.sin(2 * math.pi * across / 16.0)) / SIZE).clamp(0, 1).expand(SIZE, SIZE)
        t = 1 - t if side in ("bottom", "right") else t         # t: 0 on the light side, 1 on the dark one
        return torch.tensor(light)[:, None, None] * (1 - t) + torch.tensor(dark)[:, None, None] * t
    else:
        raise ValueError(f"unknown background {kind!r}; one of {BASE_BACKGROUNDS + (PERSONAL_BACKGROUND,)}")
    return grey.expand(3, SIZE, SIZE).clone()


def wake_mask(scene: Scene, x: float, y: float) -> torch.Tensor:
    """[SIZE, SIZE] opacity of the wake behind the object at (x, y): everywhere it was in the last WAKE_FRAMES
    frames, at one opacity (so it is told from the background wherever it shows); zeros for a still object."""
    vx, vy = scene.velocity()
    wake = torch.zeros(SIZE, SIZE)
    for age in range(1, WAKE_FRAMES + 1) if (vx, vy) != (0.0, 0.0) else ():
        wake = torch.maximum(wake, object_mask(scene.shape, x - age * vx, y - age * vy))
    return WAKE_OPACITY * wake


def render(scene: Scene, frames: int = 1) -> torch.Tensor:
    """[frames, 3, SIZE, SIZE] in [0, 1]."""
    colour = torch.tensor(COLOURS[scene.colour])[:, None, None]
    white = torch.tensor(WAKE_COLOUR)[:, None, None]
    cx, cy = scene.camera_velocity()
    out = []
    for t, (x, y) in enumerate(scene.positions(frames).tolist()):
        back = background(scene.background, (cx * t, cy * t), scene.stripe_phase)
        mask = object_mask(scene.shape, x, y)
        wake = wake_mask(scene, x, y) * (mask == 0)   # not under the object's anti-aliased rim: the tracker reads it
        back = back * (1 - wake) + white * wake
        out.append(back * (1 - mask) + colour * mask)
    return torch.stack(out)


def random_scene(rng: random.Random, backgrounds=BASE_BACKGROUNDS, moving: bool = True, pan: str | None = None,
                 colours=tuple(COLOURS), shapes=SHAPES) -> Scene:
    """One scene drawn from ``rng``: uniform over the named choices, framed (the start within FRAMING pixels of
    the centre)."""
    centre = SIZE / 2
    return Scene(colour=rng.choice(colours), shape=rng.choice(shapes), background=rng.choice(backgrounds),
                 start=(centre + rng.uniform(-FRAMING, FRAMING), centre + rng.uniform(-FRAMING, FRAMING)),
                 direction=rng.choice(tuple(DIRECTIONS)) if moving else None,
                 speed=rng.choice(tuple(SPEEDS)) if moving else None, pan=pan,
                 stripe_phase=float(rng.randrange(8)))


def image_batch(seed: int, count: int, backgrounds=BASE_BACKGROUNDS, motion_words: float = 0.5):
    """``count`` stills and their captions; a ``motion_words`` share are snapshots of a moving object (its wake
    shows, its caption names the motion), the rest still objects."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(count):
        scene = random_scene(rng, backgrounds, moving=rng.random() < motion_words)
        images.append(render(scene)[0])
        captions.append(scene.caption())
    return torch.stack(images), captions


def clip_batch(seed: int, count: int, frames: int, backgrounds=BASE_BACKGROUNDS, pan: str | None = None):
    """``count`` clips [count, frames, 3, SIZE, SIZE], their captions and scenes. With a ``pan`` the objects
    stand still and the camera moves, so the whole picture slides (the clips a camera-move LoRA learns from)."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, backgrounds, moving=pan is None, pan=pan) for _ in range(count)]
    return torch.stack([render(s, frames) for s in scenes]), [s.caption() for s in scenes], scenes

"""Motion in the world: a motion module and a camera-move motion LoRA trained with this project's own training
code (training/loop.py), the image model frozen, on clips rendered on demand; and the motion module applied for
sampling with the extension's own Apply (model_patcher/motion_patcher.py), as a graph would apply it."""
from __future__ import annotations

import random
from pathlib import Path

from ..model_patcher.motion_patcher import MotionOptions, add_motion_lora, apply_motion_module, load_motion_patcher
from ..model_patcher.schedules import USE_EXISTING
from ..training.loop import Example, TrainingOptions, make_trainee, save_trained, train
from . import models, scenes

FRAMES = 16  # frames per training clip, AnimateDiff's


class WorldClips:
    """Training examples for training/loop.py: clip ``index`` is rendered from its own seed, so the dataset is as
    large as asked and costs no disk; the caption goes through the frozen text encoder."""

    def __init__(self, model, text: models.TextEncoder, count: int, seed: int, frames: int = FRAMES,
                 pan: str | None = None, backgrounds=scenes.BASE_BACKGROUNDS):
        self.model, self.text, self.count, self.seed, self.frames, self.pan, self.backgrounds = \
            model.model, text, count, seed, frames, pan, backgrounds

    def __len__(self) -> int:
        return self.count

    def example(self, index: int, rng: random.Random) -> Example:
        scene = scenes.random_scene(random.Random(self.seed * 1_000_003 + index), self.backgrounds,
                                    moving=self.pan is None, pan=self.pan)
        latents = self.model.process_latent_in(models.to_latent(scenes.render(scene, self.frames)))
        return Example(latents, self.text.encode([scene.caption()]))


def train_module(patcher, text, path: Path, steps: int, batch_size: int = 2, learning_rate: float = 3e-4,
                 seed: int = 0, progress=None) -> list[float]:
    """A new v2-layout motion module trained on the base (frozen), written to ``path`` in the published layout."""
    trainee = make_trainee(patcher.model.diffusion_model, style="v2", frames=FRAMES, seed=seed)
    options = TrainingOptions(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=50,
                              lr_schedule="cosine", noise_schedule="model", seed=seed)
    result = train(patcher, WorldClips(patcher, text, steps * batch_size, seed), trainee, options,
                   progress=_adapt(progress))
    save_trained(trainee, path, {"description": "world motion module (issue 15): trained on the world's base"})
    return result.losses


def train_pan_lora(patcher, text, module_path: Path, path: Path, pan: str, steps: int, rank: int = 8,
                   batch_size: int = 2, learning_rate: float = 1e-3, seed: int = 1, progress=None) -> list[float]:
    """A motion LoRA on the trained module that learns one camera move from clips of that pan only."""
    trainee = make_trainee(patcher.model.diffusion_model, init=module_path, frames=FRAMES, lora_rank=rank, seed=seed)
    options = TrainingOptions(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=20,
                              noise_schedule="model", seed=seed)
    result = train(patcher, WorldClips(patcher, text, steps * batch_size, seed, pan=pan), trainee, options,
                   progress=_adapt(progress))
    save_trained(trainee, path, {"description": f"world motion LoRA (issue 15): camera pans {pan}"})
    return result.losses


def _adapt(progress):
    """training/loop.py's progress (step, total, loss, losses) -> ours (step, total, loss)."""
    return None if progress is None else (lambda step, total, loss, losses: progress(step, total, loss))


def animated(patcher, module_path: Path, lora: tuple[Path, float] | None = None, **options):
    """``patcher`` with the module file applied (MotionOptions from ``options``); sampling keeps the image
    model's own noise schedule, the one the world's models were trained with."""
    motion = load_motion_patcher(module_path)
    if lora is not None:
        motion = add_motion_lora(motion, lora[0], lora[1])
    return apply_motion_module(patcher, motion, MotionOptions(schedule=USE_EXISTING, **options))

"""The study of issue 15: train the world's models, then measure AnimateDiff's claim and its quality features.

Stages (each model is cached in ``<out>/models`` beside a ``<name>.json`` of the settings it was made with,
its own and those of the models it is trained from, so a rerun, or a run that was stopped, trains only what
changed):
1. base: the text-to-image model on captioned stills of the base world (grey patterns, muted gradients);
2. personalized: the base fine-tuned on ocean stills only (a background the base never saw);
3. motion module: trained on the base (frozen) with clips, training/loop.py;
4. motion LoRA: the module adapted to one camera move (pan left) with clips of that pan;
5. SparseCtrl (rgb): trained on the base and the module (both frozen) with keyframes given on random frames
   (world/keyframes.py).
Then every row samples clips through the host's KSampler with the extension's own patching, measures them
(world/measure.py) and writes ``study.json``, ``study.md`` (the tables) and GIFs into ``<out>``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..model_patcher.context_windows import apply_context_windows, make_handler
from ..model_patcher.free_init import add_free_init
from ..model_patcher.sparse_ctrl import load_sparse_ctrl
from ..video.encode import write_video
from . import keyframes, measure, models, motion, scenes


@dataclass(frozen=True)
class Settings:
    base_steps: int = 2000        # image batches for the base
    personal_steps: int = 250     # image batches for the personalized fine-tune
    image_batch: int = 32
    motion_steps: int = 3000      # clip batches for the motion module
    motion_lr: float = 1e-3
    lora_steps: int = 450         # clip batches for the camera LoRA
    lora_lr: float = 2e-3
    sparse_ctrl_steps: int = 400  # clip batches for the SparseCtrl
    sparse_ctrl_lr: float = 2e-3
    clip_batch: int = 2
    table_clips: int = 32         # clips per table row (a multiple of 8: every direction x speed equally)
    feature_clips: int = 8        # clips per feature row
    long_frames: int = 64         # the context-window clip
    sample_steps: int = 20
    cfg: float = 4.0
    seed: int = 0

    def model_keys(self) -> dict[str, dict]:
        """What each cached model depends on: its own settings and those of the models it is trained from."""
        base = {"rendering": scenes.RENDERING, "seed": self.seed, "base_steps": self.base_steps,
                "image_batch": self.image_batch}
        module = base | {"motion_steps": self.motion_steps, "motion_lr": self.motion_lr, "clip_batch": self.clip_batch}
        return {BASE: base, PERSONAL: base | {"personal_steps": self.personal_steps}, MODULE: module,
                LORA: module | {"lora_steps": self.lora_steps, "lora_lr": self.lora_lr},
                SPARSE_CTRL: module | {"sparse_ctrl_steps": self.sparse_ctrl_steps, "sparse_ctrl_lr": self.sparse_ctrl_lr}}


BASE, PERSONAL, MODULE, LORA = "base.pt", "personal.pt", "world_mm_v2.safetensors", "world_pan_left_lora.safetensors"
SPARSE_CTRL = "world_sparsectrl_rgb.safetensors"
FULL = Settings()
MINI = Settings(base_steps=3, personal_steps=2, image_batch=4, motion_steps=2, lora_steps=2, sparse_ctrl_steps=2,
                table_clips=2, feature_clips=2, long_frames=24, sample_steps=2)

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ models

@dataclass
class World:
    base: object          # ModelPatcher
    personal: object      # ModelPatcher
    text: models.TextEncoder
    module: Path
    lora: Path
    sparse_ctrl: Path
    seconds: dict


def build_world(out: Path, settings: Settings, log: Log, bar) -> World:
    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    keys, seconds, s = settings.model_keys(), {}, settings

    def cached(name: str) -> bool:
        """Whether ``name`` holds a model made with today's key; one made otherwise is deleted, to train again."""
        path, key_file = folder / name, folder / f"{name}.json"
        if path.exists() and key_file.exists() and json.loads(key_file.read_text()) == keys[name]:
            return True
        if path.exists():
            log(f"{path} was made with other settings; training it again")
        path.unlink(missing_ok=True)
        key_file.unlink(missing_ok=True)
        return False

    def stamp(name: str) -> None:
        (folder / f"{name}.json").write_text(json.dumps(keys[name], sort_keys=True))

    base, text = models.new_unet_patcher(s.seed), models.TextEncoder()
    started = time.perf_counter()
    if cached(BASE):
        _load(folder / BASE, base, text)
    else:
        models.train_images(base, text, lambda step: scenes.image_batch(s.seed * 100_000 + step, s.image_batch),
                            s.base_steps, seed=s.seed, progress=bar("base model"))
        _save(folder / BASE, base, text)
        stamp(BASE)
    seconds["base"] = time.perf_counter() - started

    started = time.perf_counter()
    personal = models.fine_tuned(base)
    if cached(PERSONAL):
        _load(folder / PERSONAL, personal)
    else:
        ocean = (scenes.PERSONAL_BACKGROUND,)
        models.train_images(personal, text, lambda step: scenes.image_batch(s.seed * 100_000 + 50_000 + step,
                                                                            s.image_batch, ocean),
                            s.personal_steps, learning_rate=3e-4, train_text=False, seed=s.seed + 1,
                            progress=bar("personalized model"))
        _save(folder / PERSONAL, personal)
        stamp(PERSONAL)
    seconds["personal"] = time.perf_counter() - started

    started = time.perf_counter()
    if not cached(MODULE):
        motion.train_module(base, text, folder / MODULE, s.motion_steps, s.clip_batch, s.motion_lr, seed=s.seed,
                            progress=bar("motion module"))
        stamp(MODULE)
    seconds["motion module"] = time.perf_counter() - started

    started = time.perf_counter()
    if not cached(LORA):
        motion.train_pan_lora(base, text, folder / MODULE, folder / LORA, "left", s.lora_steps,
                              batch_size=s.clip_batch, learning_rate=s.lora_lr, seed=s.seed + 2,
                              progress=bar("motion LoRA (pan left)"))
        stamp(LORA)
    seconds["motion LoRA"] = time.perf_counter() - started

    started = time.perf_counter()
    if not cached(SPARSE_CTRL):
        keyframes.train_sparse_ctrl(base, text, folder / MODULE, folder / SPARSE_CTRL, s.sparse_ctrl_steps,
                                    batch_size=s.clip_batch, learning_rate=s.sparse_ctrl_lr, seed=s.seed + 3,
                                    progress=bar("SparseCtrl (rgb)"))
        stamp(SPARSE_CTRL)
    seconds["SparseCtrl"] = time.perf_counter() - started
    return World(base, personal, text, folder / MODULE, folder / LORA, folder / SPARSE_CTRL, seconds)


def _save(path: Path, patcher, text=None) -> None:
    state = {"unet": patcher.model.diffusion_model.state_dict()}
    if text is not None:
        state["text"] = text.state_dict()
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def _load(path: Path, patcher, text=None) -> None:
    state = torch.load(path, weights_only=True)
    patcher.model.diffusion_model.load_state_dict(state["unet"])
    if text is not None:
        text.load_state_dict(state["text"])


# ------------------------------------------------------------------------------------------------ sampling

def eval_scenes(count: int, seed: int, backgrounds) -> list[scenes.Scene]:
    """``count`` moving scenes, every direction x speed equally often, the rest drawn from ``seed``."""
    rng = random.Random(seed)
    combos = [(d, v) for d in scenes.DIRECTIONS for v in scenes.SPEEDS]
    return [dataclasses.replace(scenes.random_scene(rng, backgrounds), direction=combos[i % len(combos)][0],
                                speed=combos[i % len(combos)][1]) for i in range(count)]


class Sampler:
    """Samples clips for a list of scenes with a patched model, same seeds for every variant."""

    def __init__(self, world: World, settings: Settings, tick):
        self.world, self.settings, self.tick = world, settings, tick

    def clips(self, patcher, scene_list, frames: int = motion.FRAMES, captions=None) -> torch.Tensor:
        out = []
        for i, scene in enumerate(scene_list):
            prompt = captions(scene, frames) if captions else [scene.caption()]
            out.append(models.sample(patcher, self.world.text, prompt, frames, seed=self.settings.seed * 7919 + i,
                                     steps=self.settings.sample_steps, cfg=self.settings.cfg))
            self.tick()
        return torch.stack(out)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def describe(clips: torch.Tensor, scene_list, classifier: measure.DomainClassifier) -> dict:
    scores = measure.motion_scores(clips, scene_list)
    scores["appearance_change"] = _mean(measure.appearance_change(c, s.colour) for c, s in zip(clips, scene_list))
    scores["ocean_share"] = classifier.share(clips.flatten(0, 1))
    return scores


# ------------------------------------------------------------------------------------------------ the study

def run(out: Path, settings: Settings = FULL, log: Log = print, bar=None) -> dict:
    """Everything; returns the results (also written to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    bar = bar or (lambda name: None)
    began = time.perf_counter()
    world = build_world(out, settings, log, bar)
    s = settings
    n_table, n_feat = s.table_clips, s.feature_clips
    clips_to_sample = 4 * n_table + 11 * n_feat + 3 * n_long(n_feat)  # see _features
    progress = bar("sampling") or (lambda *a: None)
    done = [0]

    def tick():
        done[0] += 1
        progress(done[0], clips_to_sample, 0.0)

    sampler = Sampler(world, s, tick)
    classifier = measure.DomainClassifier.trained(seed=s.seed)
    base_scenes = eval_scenes(n_table, s.seed + 11, scenes.BASE_BACKGROUNDS)
    ocean_scenes = [dataclasses.replace(sc, background=scenes.PERSONAL_BACKGROUND) for sc in base_scenes]
    base_mm = motion.animated(world.base, world.module)
    personal_mm = motion.animated(world.personal, world.module)
    gifs = {}

    table = {}
    for name, patcher, scene_list in (("base + module", base_mm, base_scenes),
                                      ("personalized + module", personal_mm, ocean_scenes),
                                      ("personalized alone", world.personal, ocean_scenes),
                                      ("base alone", world.base, base_scenes)):
        clips = sampler.clips(patcher, scene_list)
        table[name] = describe(clips, scene_list, classifier)
        gifs[name] = clips[:4]
        log(f"{name}: {json.dumps(_rounded(table[name]))}")

    features = _features(world, sampler, base_mm, base_scenes[:n_feat], classifier, gifs, tick, log)
    results = {"settings": dataclasses.asdict(s), "table": table, "features": features,
               "seconds": {**world.seconds, "all": time.perf_counter() - began}}
    (out / "study.json").write_text(json.dumps(results, indent=1))
    (out / "study.md").write_text(markdown(results))
    for name, clips in gifs.items():
        write_gif(clips, out / "gifs" / (name.replace(" + ", "_plus_").replace(" ", "_") + ".gif"))
    return results


def _features(world, sampler, base_mm, scene_list, classifier, gifs, tick, log) -> dict:
    s, rows = sampler.settings, {}
    plain = sampler.clips(base_mm, scene_list)

    # Context windows: a long clip in windows of 16 overlapping by 4; jumps at hand-overs vs inside windows.
    long = make_handler(16, 4, "standard_static", "pyramid")
    long_scenes = scene_list[: n_long(len(scene_list))]
    long_clips = []
    for i, scene in enumerate(long_scenes):
        long_clips.append(models.sample(apply_context_windows(base_mm, long), world.text, [scene.caption()],
                                        s.long_frames, seed=s.seed * 7919 + i, steps=s.sample_steps, cfg=s.cfg))
        tick()
    boundaries = window_boundaries(s.long_frames, 16, 4)
    seams = [measure.seam_scores(c, sc.colour, boundaries) for c, sc in zip(long_clips, long_scenes)]
    rows["context windows (64 frames, 16/4)"] = {
        "displacement_ratio": _mean(x["displacement_ratio"] for x in seams),
        "appearance_ratio": _mean(x["appearance_ratio"] for x in seams),
        "direction_accuracy": measure.motion_scores(torch.stack(long_clips), long_scenes)["direction_accuracy"],
        "boundaries": boundaries}
    gifs["context windows 64 frames"] = torch.stack(long_clips[:1])

    # FreeInit: 2 iterations against none.
    with_free_init = base_mm.clone()
    add_free_init(with_free_init, iterations=2)
    rows["FreeInit (2 iterations)"] = _against(describe(sampler.clips(with_free_init, scene_list), scene_list, classifier),
                                                 describe(plain, scene_list, classifier))

    # Motion LoRA (pan left): the whole picture's shift, with prompts that ask for no motion.
    still = [dataclasses.replace(sc, direction=None, speed=None, background="striped") for sc in scene_list]
    shifts = {}
    for strength in (0.0, 1.0):
        patcher = motion.animated(world.base, world.module, lora=(world.lora, strength))
        clips = sampler.clips(patcher, still)
        shifts[strength] = [measure.global_displacement(c, ignore_colour=sc.colour) for c, sc in zip(clips, still)]
        if strength:
            gifs["motion LoRA pan left"] = clips[:4]
    rows["motion LoRA pan left"] = {"pan_px_per_frame": {str(k): _mean(dx for dx, _ in v) for k, v in shifts.items()},
                                    "asked": scenes.PANS["left"][0] * scenes.PAN_SPEED}

    # Motion scale.
    scale_rows = {}
    for scale in (0.0, 0.5, 1.5):
        scores = describe(sampler.clips(motion.animated(world.base, world.module, scale=scale), scene_list),
                          scene_list, classifier)
        scale_rows[str(scale)] = _pick(scores)
    scale_rows["1.0"] = _pick(describe(plain, scene_list, classifier))
    rows["motion scale"] = dict(sorted(scale_rows.items(), key=lambda kv: float(kv[0])))

    # v1-style GroupNorm across frames.
    rows["GroupNorm across frames"] = _against(
        describe(sampler.clips(motion.animated(world.base, world.module, frame_groupnorm="on"), scene_list),
                 scene_list, classifier), describe(plain, scene_list, classifier))

    # Prompt travel: red for frames 0-7, green from 8 (per-frame embeddings, as the Prompt Travel node makes).
    half = motion.FRAMES // 2
    travel = [dataclasses.replace(sc, colour="red") for sc in scene_list]

    def schedule(scene, frames):
        return [dataclasses.replace(scene, colour="red" if f < half else "green").caption() for f in range(frames)]

    expected = ["red"] * half + ["green"] * (motion.FRAMES - half)
    travelled = sampler.clips(base_mm, travel, captions=schedule)
    single = sampler.clips(base_mm, travel)
    rows["prompt travel (red -> green at frame 8)"] = {
        "with": _colour_match(travelled, expected), "without": _colour_match(single, expected)}
    gifs["prompt travel"] = travelled[:4]

    # SparseCtrl: one keyframe image per clip, at frame 0, 5, 10 or 15 in turn, against the same seed without;
    # and a 48-frame clip in context windows of 16 with its keyframe at frame 40 (the last window).
    control = load_sparse_ctrl(world.sparse_ctrl)
    given, shown = [], []
    for i, scene in enumerate(scene_list):
        k = KEYFRAMES_AT[i % len(KEYFRAMES_AT)]
        image, position = keyframes.keyframe(scene, k, motion.FRAMES)
        clip = models.sample(base_mm, world.text, [scene.caption()], motion.FRAMES, seed=s.seed * 7919 + i,
                             steps=s.sample_steps, cfg=s.cfg,
                             control=keyframes.keyframes_given(base_mm, control, {k: image}, motion.FRAMES))
        tick()
        given.append(keyframes.scores(clip, plain[i], image, position, k, scene.colour))
        shown.append(clip)
    windowed, k, windows = [], LONG_KEYFRAME_AT, apply_context_windows(base_mm, long)
    for i, scene in enumerate(long_scenes):
        image, position = keyframes.keyframe(scene, k, LONG_KEYFRAME_CLIP)
        with_and_without = []
        for hook in (keyframes.keyframes_given(base_mm, control, {k: image}, LONG_KEYFRAME_CLIP), None):
            with_and_without.append(models.sample(windows, world.text, [scene.caption()], LONG_KEYFRAME_CLIP,
                                                  seed=s.seed * 7919 + i, steps=s.sample_steps, cfg=s.cfg,
                                                  control=hook))
            tick()
        windowed.append(keyframes.scores(*with_and_without, image, position, k, scene.colour))
    gifs["SparseCtrl keyframe"] = torch.stack(shown[:4])
    rows["SparseCtrl keyframe (frame 0/5/10/15)"] = _averaged(given)
    rows[f"SparseCtrl keyframe at {k} of {LONG_KEYFRAME_CLIP} frames, windows 16/4"] = _averaged(windowed)
    log("features: " + json.dumps(_rounded(rows)))
    return rows


KEYFRAMES_AT = (0, 5, 10, 15)
LONG_KEYFRAME_CLIP, LONG_KEYFRAME_AT = 48, 40


def _averaged(rows: list[dict]) -> dict:
    """The mean of each number over rows of the same nested keys."""
    return {k: _averaged([r[k] for r in rows]) if isinstance(v, dict) else _mean(r[k] for r in rows)
            for k, v in rows[0].items()}


def n_long(feature_clips: int) -> int:
    """Long clips sampled in context windows (each costs about four short ones)."""
    return max(1, feature_clips // 4)


def _pick(scores: dict) -> dict:
    return {k: scores[k] for k in ("direction_accuracy", "speed_ratio", "appearance_change")}


def _against(with_: dict, without: dict) -> dict:
    return {"with": _pick(with_), "without": _pick(without)}


def _colour_match(clips, expected: list[str]) -> float:
    """Share of frames whose object shows the colour the schedule asks for."""
    return _mean(_mean(float(got == want) for got, want in zip(measure.colour_per_frame(c), expected)) for c in clips)


def window_boundaries(frames: int, length: int, overlap: int) -> list[int]:
    """Transitions where a window starts or ends (the static schedule: starts every length - overlap)."""
    starts = list(range(0, frames - length + 1, length - overlap))
    if starts[-1] + length < frames:
        starts.append(frames - length)
    edges = {b for start in starts for b in (start, start + length)}
    return sorted(b for b in edges if 0 < b < frames)


def write_gif(clips: torch.Tensor, path: Path, zoom: int = 4) -> None:
    """Clips side by side, each pixel ``zoom`` x ``zoom``."""
    frames = torch.cat(list(clips), dim=-1)                              # f 3 h (n w)
    frames = frames.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video((frames.permute(0, 2, 3, 1) * 255).round().byte().numpy(), path, "gif", fps=8)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def markdown(results: dict) -> str:
    t = results["table"]
    lines = ["| model | motion accuracy (direction, chance 0.25) | velocity cosine | speed ratio (measured / "
             "prompted) | speed error px/frame | appearance change (lower = steadier) | ocean share (personalized "
             "look) | wake behind (one frame shows the direction) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in t.items():
        lines.append(f"| {name} | {r['direction_accuracy']:.2f} | {r['cosine']:.2f} | {r['speed_ratio']:.2f} | "
                     f"{r['speed_error']:.2f} | {r['appearance_change']:.3f} | {r['ocean_share']:.2f} | "
                     f"{r['wake_behind']:.2f} |")
    f = results["features"]
    lines += ["", "| feature | metric | with | without |", "|---|---|---|---|"]
    w = f["context windows (64 frames, 16/4)"]
    lines.append(f"| context windows, {results['settings']['long_frames']} frames in 16s overlapping by 4 | "
                 f"step jump at hand-overs / inside windows (1 = no seam): displacement, appearance | "
                 f"{w['displacement_ratio']:.2f}, {w['appearance_ratio']:.2f} | 1 |")
    for name in ("FreeInit (2 iterations)", "GroupNorm across frames"):
        r = f[name]
        lines.append(f"| {name} | direction accuracy; appearance change | {r['with']['direction_accuracy']:.2f}; "
                     f"{r['with']['appearance_change']:.3f} | {r['without']['direction_accuracy']:.2f}; "
                     f"{r['without']['appearance_change']:.3f} |")
    pan = f["motion LoRA pan left"]
    lines.append(f"| motion LoRA (pan left, strength 1) | picture shift px/frame (trained pan: "
                 f"{pan['asked']:+.1f}) | {pan['pan_px_per_frame']['1.0']:+.2f} | {pan['pan_px_per_frame']['0.0']:+.2f} |")
    for scale, r in f["motion scale"].items():
        if scale != "1.0":
            base = f["motion scale"]["1.0"]
            lines.append(f"| motion scale {scale} | speed ratio; direction accuracy | {r['speed_ratio']:.2f}; "
                         f"{r['direction_accuracy']:.2f} | {base['speed_ratio']:.2f}; {base['direction_accuracy']:.2f} (1.0) |")
    travel = f["prompt travel (red -> green at frame 8)"]
    lines.append(f"| prompt travel red -> green at frame 8 | frames showing the scheduled colour | "
                 f"{travel['with']:.2f} | {travel['without']:.2f} (red throughout) |")
    for name, r in f.items():
        if name.startswith("SparseCtrl"):
            lines.append(f"| {name} | frame k: distance to the keyframe (ratio with / without), object's distance "
                         f"from the keyframe's px; pull toward the keyframe at k / at frames {keyframes.FAR}+ away | "
                         f"{r['distance_ratio']:.2f}, {r['object_error_px']['with']:.1f} px; {r['pull_at_keyframe']:.3f} / "
                         f"{r['pull_far']:.3f} | 1, {r['object_error_px']['without']:.1f} px |")
    return "\n".join(lines) + "\n"

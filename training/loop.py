"""Training a motion module, or a motion LoRA, inside the host's frozen image UNet.

The recipe is AnimateDiff's (Guo et al., 2023, arXiv:2307.04725; formats.md §8): the image UNet, VAE and text
encoder frozen; temporal modules with zero-initialised output projections inserted after the UNet's spatial
blocks; clips of N frames encoded by the VAE; noise added at a uniformly drawn timestep of a DDPM schedule;
the MSE between the UNet's noise prediction and the noise; AdamW on the temporal parameters only.

How it sits in the host:
- The MODEL is the checkpoint loader's ModelPatcher. The host loads it (LoRAs and weight patches applied) with
  ``load_models_gpu`` before every step, since VAE or CLIP work may have made it offload the UNet.
- The temporal modules are inserted with ``placement.inject`` only around a step's forward and backward and
  ejected in ``finally``: the host moves and unpatches the UNet as a whole, and must never carry our
  trainable modules along (or find them still inside after an error).
- The UNet's forward is called directly, with ``transformer_options`` holding a temporal patch and
  ``cond_or_uncond = [0] * clips`` so each temporal module splits the batch into clips of F frames.
- The UNet's own parameters get ``requires_grad_(False)`` (restored afterwards); only the motion module's (or
  the LoRA's) parameters reach the optimizer. Their values never change: the tests check this by hash.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import comfy.model_management
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
from comfy.ldm.modules.diffusionmodules.util import make_beta_schedule

from ..model_patcher import placement
from ..model_patcher.motion_patcher import KEY as APPLIED_MOTION_KEY
from ..motion_modules import (LAYOUTS, MotionModule, MotionModuleConfig, VanillaTemporalModule, build_module, detect,
                              published_state_dict, read_state_dict, sdpa_attention)
from .dataset import LatentCache, ShardedSampler, VideoDataset
from .lora import MotionLoRA

log = logging.getLogger(__name__)

NOISE_SCHEDULES = ("sqrt_linear", "linear", "model")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINTING = ("off", "motion", "full")
STYLES = ("v3", "v2")  # new module: v3-style (no mid-block module) or v2-style (with one)
TRAINING_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # AnimateDiff's training betas (formats.md §7)
STATE_FILE = re.compile(r"^step-(\d+)\.pt$")


class TrainingError(ValueError):
    """A training request that cannot run; the message says why and what to change."""


# ================================================================================================ options

@dataclass
class TrainingOptions:
    """How to train. Defaults are the original AnimateDiff recipe where it has one (formats.md §8)."""

    steps: int = 1000                    # optimizer steps in all (a resumed run continues up to this)
    batch_size: int = 1                  # clips per step and process (original: 4 per GPU)
    learning_rate: float = 1e-4          # AdamW, betas (0.9, 0.999), eps 1e-8
    weight_decay: float = 1e-2
    grad_clip: float = 1.0               # max global gradient norm; 0 = off
    lr_schedule: str = "constant"        # "constant" or "cosine" (to 0 at the last step), after the warmup
    warmup_steps: int = 0                # linear warmup from lr / warmup_steps
    noise_schedule: str = "sqrt_linear"  # "sqrt_linear": AnimateDiff's (diffusers "linear" 0.00085 -> 0.012);
                                         # "linear": SD's scaled-linear; "model": the MODEL's own sampling
    precision: str = "auto"              # autocast: "auto" = bf16 (else fp16) on CUDA, fp32 on CPU
    gradient_checkpointing: str = "off"  # "motion": recompute each temporal module in the backward pass;
                                         # "full": also every frozen ResBlock and SpatialTransformer
    seed: int = 42                       # data order, clip starts, noise, timesteps, new-module init
    save_every: int = 0                  # write a resumable training state every K steps (0 = only at the end)
    state_dir: str | None = None         # where training states go; None = no states at all

    def __post_init__(self):
        choices = {"lr_schedule": LR_SCHEDULES, "noise_schedule": NOISE_SCHEDULES, "precision": PRECISIONS,
                   "gradient_checkpointing": CHECKPOINTING}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainingError(f"{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}.")
        if self.steps < 1 or self.batch_size < 1:
            raise TrainingError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be at least 1.")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.save_every < 0:
            raise TrainingError("learning_rate must be positive; warmup_steps and save_every not negative.")


def learning_rate(options: TrainingOptions, step: int) -> float:
    """Learning rate of (0-based) ``step``: linear warmup, then constant or cosine decay."""
    if step < options.warmup_steps:
        return options.learning_rate * (step + 1) / options.warmup_steps
    if options.lr_schedule == "cosine":
        done = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
        return options.learning_rate * 0.5 * (1.0 + math.cos(math.pi * done))
    return options.learning_rate


# ================================================================================================ what is trained

@dataclass
class Trainee:
    """The motion module inserted into the UNet, and what of it is trained."""

    module: MotionModule             # fp32; trained itself unless ``lora`` is set (then frozen)
    lora: MotionLoRA | None = None   # adapters on the module's temporal attention projections
    init: str = "new"                # where the module came from, for the file's metadata

    @property
    def trainable(self) -> nn.Module:
        return self.lora if self.lora is not None else self.module

    @property
    def kind(self) -> str:
        return "motion LoRA" if self.lora is not None else "motion module"


def unet_layout(unet, style: str = "v3", max_frames: int = 32) -> MotionModuleConfig:
    """The shape of a new motion module for this UNet: one temporal module per slot of the placement rule,
    widths read from the UNet (so it also fits narrow test UNets), family and defaults from the published
    layout of the UNet's base."""
    if style not in STYLES:
        raise TrainingError(f"layout style {style!r}: choose v3 (no mid-block module) or v2 (mid-block module).")
    down = [s.channels for s in placement.slots(unet.input_blocks, "input")]
    up = [s.channels for s in placement.slots(unet.output_blocks, "output")]
    middle = [s.channels for s in placement.slots([unet.middle_block], "middle")][:1]
    per_level = list(unet.num_res_blocks)
    base = {4: "SD1.5", 3: "SDXL"}.get(len(per_level))
    if base is None or len(down) != sum(per_level) or len(up) != sum(n + 1 for n in per_level):
        raise TrainingError(f"this UNet ({len(per_level)} levels, {len(down)} down and {len(up)} up slots) is neither "
                            "SD1.5- nor SDXL-shaped; motion modules exist for those two bases.")
    if base == "SDXL" and style == "v2":
        raise TrainingError("SDXL motion modules have no mid-block module; use the v3 layout style.")
    family = {"SD1.5": "AnimateDiff v3" if style == "v3" else "AnimateDiff v2", "SDXL": "AnimateDiff SDXL beta"}[base]
    layout = LAYOUTS[family]

    def group(widths: list[int], counts: list[int]) -> tuple[tuple[int, ...], ...]:
        out, i = [], 0
        for n in counts:
            out.append(tuple(widths[i:i + n]))
            i += n
        return tuple(out)

    return MotionModuleConfig(
        family, base, down=group(down, per_level), mid=tuple(middle) if style == "v2" else (),
        up=group(up, [n + 1 for n in reversed(per_level)]), max_frames=max(layout.max_frames, max_frames),
        heads=layout.heads, norm_across_frames=layout.norm_across_frames, extra={"name": "new motion module"})


def new_motion_module(config: MotionModuleConfig, seed: int = 0) -> MotionModule:
    """A fresh fp32 module: default Linear/Norm init from ``seed``, output projections zero (so it starts as
    the identity: inserting it does not change the image model's output)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MotionModule(config)
    for temporal in module.in_unet_order():
        nn.init.zeros_(temporal.temporal_transformer.proj_out.weight)
        nn.init.zeros_(temporal.temporal_transformer.proj_out.bias)
    return module


def motion_module_for_training(path: str | os.PathLike) -> MotionModule:
    """An existing motion-module file as a trainable fp32 module with its own memory (files load read-only
    and memory-mapped, possibly in fp16)."""
    sd = read_state_dict(path)
    config = detect(sd, Path(path).name)
    module = MotionModule(config)
    module.load_state_dict(build_module(sd, config).state_dict())
    return module


def make_trainee(unet, init: str | os.PathLike | None = None, style: str = "v3", frames: int = 16,
                 lora_rank: int = 0, lora_scale: float = 1.0, lora_init: str | os.PathLike | None = None,
                 seed: int = 0) -> Trainee:
    """A new module (``init`` None) or an existing one; with ``lora_rank`` > 0, a LoRA on it instead."""
    if init is None:
        if lora_rank:
            raise TrainingError("a motion LoRA adapts an existing motion module (a new one outputs zero, so its "
                                "LoRA would get no gradient): choose the module to adapt as init.")
        module, name = new_motion_module(unet_layout(unet, style, frames), seed), "new"
    else:
        module, name = motion_module_for_training(init), Path(init).name
        if frames > module.config.max_frames:
            raise TrainingError(f"{name} handles at most {module.config.max_frames} frames at once; "
                                f"train with at most that many frames per clip.")
    placement.plan(unet, module.config, name)  # refuse a module for another base before anything runs
    if not lora_rank:
        return Trainee(module.train().requires_grad_(True), None, name)
    module.eval().requires_grad_(False)
    lora = MotionLoRA(module, lora_rank, lora_scale)
    if lora_init is not None:
        lora.load_published(read_state_dict(lora_init), Path(lora_init).name)
    return Trainee(module, lora.train(), name)


# ================================================================================================ noise schedule

def training_alphas(model, name: str = "sqrt_linear") -> Tensor:
    """alpha-bar_t (float64, one per training timestep) of the chosen schedule (formats.md §7 for the names)."""
    if name in ("sqrt_linear", "linear"):
        betas = make_beta_schedule(name, TRAINING_TIMESTEPS, linear_start=BETA_START, linear_end=BETA_END)
        return torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
    sampling = model.get_model_object("model_sampling")
    settings = getattr(model.model.model_config, "sampling_settings", {})
    if sampling is model.model.model_sampling and not settings.get("zsnr", False) and hasattr(sampling, "sigmas"):
        # The model's own discrete schedule, recomputed in float64 from its settings: exact for SD1.5 / SDXL.
        betas = make_beta_schedule(settings.get("beta_schedule", "linear"), settings.get("timesteps", 1000),
                                   linear_start=settings.get("linear_start", BETA_START),
                                   linear_end=settings.get("linear_end", BETA_END))
        return torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
    if not hasattr(sampling, "sigmas") or len(sampling.sigmas) < 2:
        raise TrainingError(f"the MODEL's sampling ({type(sampling).__name__}) is not a discrete DDPM schedule; "
                            "train with noise_schedule sqrt_linear or linear.")
    sigmas = sampling.sigmas.double().cpu()  # patched sampling (e.g. a schedule node): from its sigma table
    return 1.0 / (1.0 + sigmas ** 2)


def prediction_target(model) -> str:
    kind = getattr(model.model, "model_type", None)
    name = getattr(kind, "name", str(kind))
    if name == "EPS":
        return "eps"
    if name == "V_PREDICTION":
        return "v"
    raise TrainingError(f"the MODEL predicts {name}; motion modules train on epsilon- or v-prediction models.")


# ================================================================================================ inside the UNet

class TrainingTemporalPatch:
    """How the UNet calls the inserted modules while training (``forward_timestep_embed_patch``): frames =
    batch // len(cond_or_uncond), as at inference, but with torch SDPA (differentiable everywhere, whatever
    kernel the host picked for sampling) and optionally recomputed in the backward pass."""

    def __init__(self, config: MotionModuleConfig, recompute: bool = False):
        self.config = config
        self.recompute = recompute

    def __call__(self, layer: VanillaTemporalModule, x, emb, context, transformer_options, *unused):
        frames = x.shape[0] // len(transformer_options.get("cond_or_uncond") or [0])
        dtype = layer.temporal_transformer.proj_in.weight.dtype
        args = (x.to(dtype), frames, sdpa_attention, self.config.norm_across_frames)
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(layer, *args, use_reentrant=False)
        else:
            out = layer(*args)
        return out.to(x.dtype)


def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # Recomputation runs later: give it the transformer_options as they are now, not as the UNet leaves them.
    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def recomputed_image_layers(unet):
    """Within the block, the UNet's ResBlocks and SpatialTransformers keep no activations for the backward
    pass and are recomputed there instead (instance-level forwards, removed on exit)."""
    layers = [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer)) and "forward" not in vars(m)]
    for layer in layers:
        layer.forward = functools.partial(_recomputed, type(layer).forward.__get__(layer))
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


@contextlib.contextmanager
def inserted(unet, trainee: Trainee, recompute_images: bool = False):
    """The trainee's modules inside the UNet (and its LoRA hooks attached) for the duration of the block."""
    module = trainee.module
    with contextlib.ExitStack() as stack:
        placement.inject(unet, module.config, module.in_unet_order(), trainee.init)
        stack.callback(placement.eject, unet)
        if trainee.lora is not None:
            stack.enter_context(trainee.lora.attached())
        if recompute_images:
            stack.enter_context(recomputed_image_layers(unet))
        yield


def _materialize_inference_tensors(unet) -> int:
    """Replace parameters and buffers created under ``torch.inference_mode`` (the host loads checkpoints in it)
    by ordinary copies, which autograd may save for the backward pass. Values are unchanged."""
    replaced = 0
    for module in unet.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_inference():
                module._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                replaced += 1
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_inference():
                module._buffers[name] = b.clone()
                replaced += 1
    return replaced


# ================================================================================================ data

@dataclass
class Example:
    latents: Tensor               # f c h w, in the model's latent space (after process_latent_in)
    context: Tensor               # 1 n d, cross-attention conditioning
    y: Tensor | None = None       # 1 d, the SDXL vector conditioning


class ExampleSource(Protocol):
    """Training examples by dataset index; ``rng`` (from the sampler) holds all the per-example randomness."""

    def __len__(self) -> int: ...

    def example(self, index: int, rng: random.Random) -> Example: ...


class VideoExamples:
    """Clips of a :class:`VideoDataset` as training examples: VAE latents (read from the dataset's latent cache
    when it has one) and the caption's conditioning from the frozen CLIP (kept in memory by caption)."""

    TEXT_CACHE = 1024

    def __init__(self, dataset: VideoDataset, model, clip, vae):
        self.dataset, self.model, self.clip, self.vae = dataset, model, clip, vae
        self.cache = LatentCache(dataset.latent_cache, vae_fingerprint(vae)) if dataset.latent_cache else None
        self._text: collections.OrderedDict[str, tuple[Tensor, Tensor | None]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, index: int, rng: random.Random) -> Example:
        clip = self.dataset.load(index, rng)
        latents = self.cache.get(clip) if self.cache else None
        if latents is None:
            pixels = clip.pixels.movedim(1, -1).add(1.0).div(2.0)  # f 3 h w in [-1, 1] -> f h w 3 in [0, 1]
            latents = self.vae.encode(pixels).float().cpu()
            if self.cache:
                self.cache.put(clip, latents)
        context, y = self._conditioning(clip.caption)
        return Example(self.model.model.process_latent_in(latents), context, y)

    def _conditioning(self, caption: str) -> tuple[Tensor, Tensor | None]:
        if caption in self._text:
            self._text.move_to_end(caption)
            return self._text[caption]
        cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
        spec = self.dataset.spec
        conds = self.model.model.extra_conds(cross_attn=cond, pooled_output=pooled, width=spec.width,
                                             height=spec.height, target_width=spec.width, target_height=spec.height,
                                             crop_w=0, crop_h=0, device=torch.device("cpu"))
        if "c_concat" in conds:
            raise TrainingError("this MODEL needs extra image channels (an inpainting or instruct model); train "
                                "motion modules on the base text-to-image checkpoint.")
        y = conds["y"].cond.float().cpu() if "y" in conds else None
        entry = (conds["c_crossattn"].cond.float().cpu(), y)
        self._text[caption] = entry
        if len(self._text) > self.TEXT_CACHE:
            self._text.popitem(last=False)
        return entry


def vae_fingerprint(vae) -> str:
    """A short id of the VAE's weights (a strided sample of every tensor), for latent-cache keys."""
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        return type(vae).__name__
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + sample.tobytes())
    return digest.hexdigest()[:16]


def _stack_contexts(contexts: list[Tensor], frames: int) -> Tensor:
    """[1, n_i, d] per clip -> [(clips f), n, d]; lengths that differ (long prompts) are repeated to their least
    common multiple, as the host does when it batches conditionings."""
    length = math.lcm(*(c.shape[1] for c in contexts))
    padded = [c.repeat(1, length // c.shape[1], 1) for c in contexts]
    return torch.cat(padded).repeat_interleave(frames, dim=0)


# ================================================================================================ the loop

@dataclass
class TrainingResult:
    losses: list[float]             # loss of every step done so far (averaged over processes), resumed ones too
    steps: int                      # steps done in all
    stopped: bool                   # stopped early on request; the state was saved if state_dir is set
    seconds: float                  # wall time of this run
    seconds_per_step: float         # of this run's steps
    peak_memory: int                # bytes: CUDA peak allocated, else the process's peak resident size
    state_path: Path | None = None  # the last training state written


ProgressFn = Callable[[int, int, float, list], "bool | None"]  # (step, total, loss, losses) -> stop?


class _DenoisingLoss(nn.Module):
    """The loss of one batch, as a module that owns only the trainable parameters: DistributedDataParallel wraps
    this, so gradients are averaged over processes while the frozen UNet (not registered) is never broadcast."""

    def __init__(self, trainable: nn.Module, loss_fn: Callable[..., Tensor]):
        super().__init__()
        self.trainable = trainable
        self.loss_fn = loss_fn

    def forward(self, *args):
        return self.loss_fn(*args)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _transformer_options(model, trainee: Trainee, recompute: bool) -> dict:
    options = dict(model.model_options.get("transformer_options", {}))
    patches = {k: list(v) for k, v in options.get("patches", {}).items()}
    embed = [p for p in patches.get("forward_timestep_embed_patch", []) if p[0] is not VanillaTemporalModule]
    patches["forward_timestep_embed_patch"] = embed + [
        (VanillaTemporalModule, TrainingTemporalPatch(trainee.module.config, recompute))]
    options["patches"] = patches
    return options


def train(model, source: ExampleSource, trainee: Trainee, options: TrainingOptions,
          progress: ProgressFn | None = None, resume: str | os.PathLike | None = None) -> TrainingResult:
    """Train ``trainee`` inside ``model``'s frozen UNet on ``source``; returns the losses and timings.

    Under torch.distributed (initialised by the caller) every process runs this with its own shard of the
    data; gradients are averaged by DistributedDataParallel, so all processes end with the same weights.
    ``progress`` is called after every step and may return True to stop early (the state is then saved, as
    when the host's cancel interrupts a step). ``resume`` is a training state written by an earlier run of the
    same trainee and options; the run then continues exactly as if it had never stopped.
    """
    if model.injections.get(APPLIED_MOTION_KEY):
        raise TrainingError("this MODEL already has a motion module applied (Apply Motion Module). Connect the "
                            "checkpoint's MODEL directly; to continue training a motion module, choose it as init.")
    if options.save_every and not options.state_dir:
        raise TrainingError("save_every needs a state_dir to write the training states into.")
    run = _Run(model, source, trainee, options)
    with _seeded_global_rngs(options.seed + run.rank):
        if resume is not None:
            run.resume(Path(resume))
        return run.loop(progress)


class _Run:
    """One training run: the optimizer, sampler and noise generator, and what they hold between steps."""

    def __init__(self, model, source: ExampleSource, trainee: Trainee, options: TrainingOptions):
        self.model, self.source, self.trainee, self.options = model, source, trainee, options
        self.rank, self.world = _rank_world()
        self.unet = model.model.diffusion_model
        self.device = device = comfy.model_management.get_torch_device()
        trainee.module.to(device)
        trainee.trainable.to(device)
        self.params = [p for p in trainee.trainable.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=options.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=options.weight_decay)
        self.alphas = training_alphas(model, options.noise_schedule)
        self.sampler = ShardedSampler(len(source), options.batch_size, options.seed, self.rank, self.world)
        self.generator = torch.Generator().manual_seed(options.seed * 1000 + self.rank)  # noise, timesteps (CPU)
        self.autocast = _autocast_dtype(device, options.precision)
        unet_dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda"
                                           and torch.float16 in (self.autocast, unet_dtype))
        self.memory = sum(p.numel() for p in trainee.trainable.parameters()) * 16  # weights, grads, AdamW moments
        self.losses: list[float] = []
        self.start = 0
        self.state_path: Path | None = None
        recompute = options.gradient_checkpointing in ("motion", "full")
        loss_fn = functools.partial(_denoising_loss, self.unet, _transformer_options(model, trainee, recompute),
                                    self.alphas.to(device), prediction_target(model), unet_dtype)
        self.step_module: nn.Module = _DenoisingLoss(trainee.trainable, loss_fn)
        if self.world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)

    def resume(self, path: Path) -> None:
        self.start, self.losses = _load_state(path, self.trainee, self.optimizer, self.scaler, self.sampler,
                                              self.generator, self.rank, self.world, self.options)
        self.state_path = path

    def loop(self, progress: ProgressFn | None) -> TrainingResult:
        options, device = self.options, self.device
        flags = {name: p.requires_grad for name, p in self.unet.named_parameters()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log.info("training a %s (%s, %d trainable parameters) for steps %d..%d on %s, %d process(es)",
                 self.trainee.kind, self.trainee.module.config.family, sum(p.numel() for p in self.params),
                 self.start + 1, options.steps, device, self.world)
        began, stopped = time.perf_counter(), False
        try:
            for step in range(self.start, options.steps):
                before = (self.sampler.state_dict(), _rng_state(self.generator))  # what a mid-step state holds
                try:
                    loss = self.step(step)
                except comfy.model_management.InterruptProcessingException:
                    # The host's cancel, raised inside the forward pass (before the optimizer ran): keep the last
                    # completed step so that the run resumes exactly, and report the stop.
                    self.optimizer.zero_grad(set_to_none=True)
                    if options.state_dir and self.world == 1 and step > self.start:
                        self.save(step, *before)
                    stopped = True
                    break
                self.losses.append(loss)
                stop = bool(progress(step + 1, options.steps, loss, self.losses)) if progress else False
                stop = self._agree(stop)
                due = step + 1 == options.steps or (options.save_every and (step + 1) % options.save_every == 0)
                if options.state_dir and (stop or due):
                    self.save(step + 1, self.sampler.state_dict(), _rng_state(self.generator))
                if stop:
                    stopped = True
                    break
        finally:
            for name, p in self.unet.named_parameters():
                p.requires_grad_(flags.get(name, p.requires_grad))
        seconds = time.perf_counter() - began
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
        return TrainingResult(self.losses, len(self.losses), stopped, seconds,
                              seconds / max(1, len(self.losses) - self.start), peak, self.state_path)

    def step(self, step: int) -> float:
        """One optimizer step; returns its loss (averaged over processes)."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.options, step)
        batch = [self.source.example(index, rng) for index, rng in self.sampler.next_batch()]
        frames = batch[0].latents.shape[0]
        latents = torch.stack([e.latents for e in batch]).float()                   # b f c h w
        timesteps = torch.randint(0, len(self.alphas), (len(batch),), generator=self.generator)
        noise = torch.randn(latents.shape, generator=self.generator)
        context = _stack_contexts([e.context for e in batch], frames)                # (b f) n d
        y = torch.cat([e.y for e in batch]).repeat_interleave(frames, 0) if batch[0].y is not None else None
        inputs = [t.to(self.device) if t is not None else None for t in (latents, noise, timesteps, context, y)]

        comfy.model_management.load_models_gpu([self.model], memory_required=self.memory)
        _materialize_inference_tensors(self.unet)
        self.unet.requires_grad_(False)
        with inserted(self.unet, self.trainee, recompute_images=self.options.gradient_checkpointing == "full"):
            with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext():
                loss = self.step_module(*inputs)
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.options.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().float()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return loss.item()

    def _agree(self, stop: bool) -> bool:
        """Every process stops when one is asked to."""
        if self.world == 1:
            return stop
        flag = torch.tensor([float(stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save(self, step: int, sampler_state: dict, rng: dict) -> None:
        self.state_path = _save_state(Path(self.options.state_dir), step, self.trainee, self.optimizer, self.scaler,
                                      sampler_state, rng, self.losses, self.options, self.rank, self.world)


def _denoising_loss(unet, transformer_options: dict, alphas: Tensor, target: str, unet_dtype: torch.dtype,
                    latents: Tensor, noise: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None) -> Tensor:
    """MSE between the UNet's prediction and the noise (or v) for clips ``latents`` [b f c h w] noised at
    ``timesteps`` [b] (one per clip, as in the original): x_t = sqrt(a) x_0 + sqrt(1 - a) eps."""
    b, f = latents.shape[:2]
    a = alphas[timesteps].view(b, 1, 1, 1, 1)
    signal, sigma = a.sqrt().float(), (1.0 - a).sqrt().float()
    noisy = (signal * latents + sigma * noise).flatten(0, 1)                    # (b f) c h w
    wanted = noise if target == "eps" else signal * noise - sigma * latents
    options = {**transformer_options, "cond_or_uncond": [0] * b,               # b clips of f frames each
               "sigmas": (sigma / signal).flatten().repeat_interleave(f)}
    out = unet(noisy.to(unet_dtype), timesteps.repeat_interleave(f).float(), context=context.to(unet_dtype),
               y=None if y is None else y.to(unet_dtype), transformer_options=options)
    return F.mse_loss(out.float(), wanted.flatten(0, 1).float())


def _peak_rss() -> int:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except Exception:
        return 0


# ================================================================================================ RNG and states

def _rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "generator": generator.get_state()}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    generator.set_state(state["generator"])


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """Seed python, numpy and torch global RNGs for the run, and give the caller's states back afterwards."""
    saved_python, saved_numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(saved_python)
            np.random.set_state(saved_numpy)


def _save_state(folder: Path, step: int, trainee: Trainee, optimizer, scaler, sampler_state: dict, rng: dict,
                losses: list[float], options: TrainingOptions, rank: int, world: int) -> Path:
    """Everything an exact resume needs; every process's RNG states, written by process 0."""
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    path = folder / f"step-{step:07d}.pt"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        state = {"format": "animatediff-motion training state", "version": 1, "step": step, "world_size": world,
                 "options": {k: v for k, v in asdict(options).items() if k not in ("state_dir",)},
                 "trains": _describe(trainee),
                 "trainable": {k: v.detach().cpu() for k, v in trainee.trainable.state_dict().items()},
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                 "samplers": [sampler_state], "rng": rngs, "losses": list(losses)}
        tmp = path.with_name(f".{path.name}.partial")
        torch.save(state, tmp)
        os.replace(tmp, path)
        log.info("training state saved: %s", path)
    if world > 1:
        dist.barrier()
    return path


def _describe(trainee: Trainee) -> str:
    config = trainee.module.config
    lora = f", LoRA rank {trainee.lora.rank}" if trainee.lora is not None else ""
    return f"{trainee.kind} ({config.family}, {len(trainee.module.in_unet_order())} temporal modules{lora})"


def _load_state(path, trainee, optimizer, scaler, sampler, generator, rank, world, options) -> tuple[int, list[float]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != "animatediff-motion training state":
        raise TrainingError(f"{path}: not a training state written by this trainer.")
    if state["trains"] != _describe(trainee):
        raise TrainingError(f"{path} continues a {state['trains']}, but this run trains a {_describe(trainee)}: "
                            "resume with the same init, layout and LoRA rank.")
    trainable = trainee.trainable
    saved = state["options"]
    for key in ("batch_size", "seed", "lr_schedule", "warmup_steps", "noise_schedule"):
        if saved.get(key) != getattr(options, key):
            log.warning("resuming with %s=%r, the state was written with %r: the run will not be exactly the one "
                        "it continues", key, getattr(options, key), saved.get(key))
    try:
        trainable.load_state_dict(state["trainable"])
    except RuntimeError as e:
        raise TrainingError(f"{path}: the state holds another kind or shape of module ({e}).") from None
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["samplers"][0])  # (epoch, position) is the same on every process
    if state["world_size"] == world:
        _set_rng_state(state["rng"][rank], generator)
    else:
        log.warning("state written by %d process(es), resumed by %d: noise and timesteps are drawn afresh",
                    state["world_size"], world)
    log.info("resuming from %s at step %d", path, state["step"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def latest_state(folder: str | os.PathLike) -> Path | None:
    """The training state of the highest step in ``folder``, or None."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := STATE_FILE.match(p.name))] \
        if folder.is_dir() else []
    return max(found)[1] if found else None


# ================================================================================================ saving

def training_metadata(trainee: Trainee, options: TrainingOptions, result: TrainingResult, dataset_size: int,
                      frames: int, extra: dict | None = None) -> dict[str, str]:
    config = trainee.module.config
    meta = {"format": f"AnimateDiff {trainee.kind}", "family": config.family, "base": config.base,
            "frames": frames, "steps": result.steps, "dataset_size": dataset_size,
            "learning_rate": options.learning_rate, "batch_size": options.batch_size,
            "processes": _rank_world()[1], "seed": options.seed, "noise_schedule": options.noise_schedule,
            "lr_schedule": options.lr_schedule, "init": trainee.init,
            "final_loss": f"{np.mean(result.losses[-20:]):.6f}" if result.losses else "",
            "trained_with": "AnimateDiff Motion for ComfyUI"}
    if trainee.lora is not None:  # MotionDirector writes these two; the scale is already folded into up
        meta.update(model_type="motion_lora", rank=trainee.lora.rank, lora_scale=trainee.lora.scale)
    meta.update(extra or {})
    return {k: str(v) for k, v in meta.items()}


def save_trained(trainee: Trainee, path: str | os.PathLike, metadata: dict[str, str], dtype: str = "fp32") -> Path:
    """Write the module (published AnimateDiff layout) or the LoRA (published motion-LoRA layout) as
    .safetensors, atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    if trainee.lora is not None:
        sd = trainee.lora.published_state_dict()
    else:
        sd = {k: v.detach().float().cpu() for k, v in published_state_dict(trainee.module).items()}
    cast = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    sd = {k: v.to(cast).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(sd, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def loss_curve(losses: list[float], width: int = 512, height: int = 256):
    """A PIL image of the loss per step (grey) and its moving average (blue)."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 48, 12, width - 8, height - 24
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill="black")
        return image
    values = np.asarray(losses, dtype=np.float64)
    window = max(1, len(values) // 20)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    low, high = float(values.min()), float(values.max())
    span = high - low or 1.0

    def point(i: float, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(1, len(values) - 1))
        return x, bottom - (bottom - top) * (v - low) / span

    if len(values) > 1:
        draw.line([point(i, v) for i, v in enumerate(values)], fill=(190, 190, 190))
        draw.line([point(i + window - 1, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
    draw.text((4, top), f"{high:.4g}", fill="black")
    draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
    draw.text((left, bottom + 6), f"loss over {len(values)} steps, last {smooth[-1]:.4g}", fill="black")
    return image


def image_tensor(image) -> Tensor:
    """PIL image -> the host's IMAGE ([1, H, W, 3] float in [0, 1])."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


# ================================================================================================ from videos

def train_motion(model, clip, vae, dataset: VideoDataset, options: TrainingOptions, out_path: str | os.PathLike,
                 init: str | os.PathLike | None = None, style: str = "v3", lora_rank: int = 0,
                 lora_scale: float = 1.0, progress: ProgressFn | None = None, resume: str | os.PathLike | None = None,
                 save_dtype: str = "fp32", lora_init: str | os.PathLike | None = None) -> tuple[TrainingResult, Path | None]:
    """Videos -> a saved motion module or motion LoRA: the whole job of the node and the command line.
    Process 0 writes ``out_path`` (returned; None on the others); nothing is written when stopped early."""
    rank, world = _rank_world()
    trainee = make_trainee(model.model.diffusion_model, init, style, dataset.spec.frames, lora_rank, lora_scale,
                           lora_init, options.seed)
    source = VideoExamples(dataset, model, clip, vae)
    try:
        result = train(model, source, trainee, options, progress, resume)
    finally:
        trainee.module.to("cpu")  # give the device memory back to the host
        trainee.trainable.to("cpu")
        comfy.model_management.soft_empty_cache()
    if source.cache is not None:
        log.info("latent cache: %d clips read from %s, %d encoded", source.cache.hits, dataset.latent_cache,
                 source.cache.misses)
    if result.stopped:
        return result, None
    spec = dataset.spec
    meta = training_metadata(trainee, options, result, len(dataset), spec.frames,
                             {"stride": spec.stride, "size": f"{spec.width}x{spec.height}"})
    path = save_trained(trainee, out_path, meta, save_dtype) if rank == 0 else None
    if world > 1:
        dist.barrier()
    return result, path

"""The world's models: a small text-to-image base, a personalized fine-tune of it, and what samples them.

The base is SD1.5's architecture scaled down (the host's own UNetModel and BaseModel classes, SD1.5's block
structure at widths 32/64/64/64, the SD1.5 noise schedule), so every part of this extension that patches an
SD1.5 UNet patches it unchanged. Its latent space is the world's pixel space folded 2x2 into channels: 12 channels
at 16x16, exactly invertible (a trained VAE would only blur the measurements). Its text encoder is a small transformer over the world's vocabulary,
giving cross-attention context the way CLIP does (one vector per token, each seeing the whole caption).

Images are trained with the DDPM objective in SD2's v-prediction form (an epsilon-predicting model this small,
trained this briefly, cannot yet tell the noise from the picture at high noise, and its samples diverge; v keeps
the picture in the target), timesteps uniform over the model's own 1000-step schedule, 10% of captions dropped for classifier-free guidance), with an exponential moving average
of the weights used for sampling. The personalized model is the base fine-tuned on ocean images only (UNet
only, as DreamBooth fine-tunes usually are; the text encoder stays the base's).
"""
from __future__ import annotations

import copy
import math
import random
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.supported_models

from ..training.loop import training_alphas
from . import scenes

WORDS = ("a", "an", "on", "background", "moving") + tuple(scenes.COLOURS) + scenes.SHAPES + \
    scenes.BASE_BACKGROUNDS + (scenes.PERSONAL_BACKGROUND,) + tuple(scenes.DIRECTIONS) + tuple(scenes.SPEEDS)
TOKENS = 12        # the longest caption has 10 words; one start token
WIDTH = 32         # text embedding width = the UNet's context_dim
LATENT_SIZE = scenes.SIZE // 2
PAD, START = 0, 1


def tokenize(captions: list[str]) -> torch.Tensor:
    """[n, TOKENS] token ids: start, one id per word, padding; "" is the empty (unconditional) caption."""
    ids = torch.full((len(captions), TOKENS), PAD, dtype=torch.long)
    for row, caption in enumerate(captions):
        words = caption.replace(",", " ").split()
        if len(words) + 1 > TOKENS:
            raise ValueError(f"caption {caption!r} has {len(words)} words; the world's text encoder reads at most "
                             f"{TOKENS - 1}")
        unknown = [w for w in words if w not in WORDS]
        if unknown:
            raise ValueError(f"caption {caption!r}: {', '.join(map(repr, unknown))} not in the world's vocabulary "
                             f"({' '.join(WORDS)})")
        ids[row, : len(words) + 1] = torch.tensor([START] + [WORDS.index(w) + 2 for w in words])
    return ids


class TextEncoder(nn.Module):
    """Token ids -> [n, TOKENS, WIDTH] context: embeddings plus positions through two pre-norm transformer layers
    (every output vector sees the whole caption, as CLIP's do), then a final LayerNorm."""

    def __init__(self, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(len(WORDS) + 2, WIDTH)
        self.position = nn.Parameter(torch.randn(TOKENS, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, heads, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.embed(ids) + self.position))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.eval()(tokenize(captions))


class WorldLatent(comfy.latent_formats.LatentFormat):
    """The world's latents are its pixels in [-1, 1], each 2x2 block stacked into channels (an exact "VAE").
    The model sees them shifted and scaled to about zero mean and unit spread (the world is mostly mid-grey), as
    SD's latent format scales its VAE's latents."""
    latent_channels = 3 * 4
    scale_factor = 2.5
    shift = -0.4

    def process_in(self, latent):
        return (latent - self.shift) * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor + self.shift


class WorldSD15(comfy.supported_models.SD15):
    """SD1.5's model config (its schedule, its UNet family) with the world's latent space and one attention head
    per layer (at widths of 32-64, SD1.5's 8 heads would be 4-8 wide: slower on a CPU and no better)."""
    latent_format = WorldLatent
    unet_extra_config = {"num_heads": 1, "num_head_channels": -1}


UNET_CONFIG = dict(image_size=LATENT_SIZE, in_channels=12, out_channels=12, model_channels=32, legacy=False,
                   use_spatial_transformer=True, use_checkpoint=False, use_temporal_attention=False,
                   use_temporal_resblock=False, num_res_blocks=[2] * 4, channel_mult=[1, 2, 2, 2], num_heads=1,
                   adm_in_channels=None, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=False,
                   context_dim=WIDTH)


def new_unet_patcher(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a freshly initialised world UNet. The host's layers skip initialisation (they expect
    a checkpoint), so PyTorch's own initialisation of each layer type is called here."""
    torch.manual_seed(seed)
    model = comfy.model_base.BaseModel(WorldSD15(dict(UNET_CONFIG)), comfy.model_base.ModelType.V_PREDICTION,
                                       device="cpu")
    for module in model.diffusion_model.modules():
        for kind in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm):
            if isinstance(module, kind):
                kind.reset_parameters(module)
    return patcher_for(model)


def patcher_for(model) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def to_latent(pixels: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] in [0, 1] -> [n, 12, H/2, W/2] latents in [-1, 1]."""
    return F.pixel_unshuffle(pixels * 2.0 - 1.0, 2)


def to_pixels(latent: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`to_latent`, clamped to [0, 1]."""
    return ((F.pixel_shuffle(latent, 2) + 1.0) / 2.0).clamp(0.0, 1.0)


def conditioning(text: TextEncoder, captions: list[str]) -> list:
    """The host's CONDITIONING for a batch: one caption (repeated over frames by the host) or one per frame."""
    return [[text.encode(captions), {}]]


# ------------------------------------------------------------------------------------------------ training

class EMA:
    """Exponential moving average of a module's parameters, the weights that get sampled."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short runs: do not average in the random init
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - decay)
            else:
                self.shadow[k].copy_(v)


Batches = Callable[[int], tuple[torch.Tensor, list[str]]]  # step -> (pixels [n, 3, H, W] in [0, 1], captions)
Progress = Callable[[int, int, float], None]


def warmup_cosine(learning_rate: float, step: int, steps: int, warmup: int) -> float:
    """The learning rate at ``step``: a linear warmup over ``warmup`` steps, then cosine down to a tenth."""
    return learning_rate * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))


def train_images(patcher, text: TextEncoder, batches: Batches, steps: int, learning_rate: float = 1e-3,
                 train_text: bool = True, ema_decay: float = 0.999, drop_caption: float = 0.1, seed: int = 0,
                 progress: Progress | None = None) -> list[float]:
    """Train the UNet (and, with ``train_text``, the text encoder) on captioned images; the EMA weights are
    written back at the end. Returns the loss of every step."""
    unet = patcher.model.diffusion_model
    alphas = training_alphas(patcher, "model").float()  # the model's own schedule, the one it samples with
    parts = [unet] + ([text] if train_text else [])
    params = [p for part in parts for p in part.parameters()]
    for part in parts:
        part.train().requires_grad_(True)
    text.requires_grad_(train_text)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    averages = [EMA(part, ema_decay) for part in parts]
    generator, rng, losses = torch.Generator().manual_seed(seed), random.Random(seed), []
    for step in range(steps):
        pixels, captions = batches(step)
        captions = ["" if rng.random() < drop_caption else c for c in captions]
        x0 = patcher.model.process_latent_in(to_latent(pixels))
        t = torch.randint(0, len(alphas), (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text(tokenize(captions)) if train_text else text.encode(captions)
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        loss = F.mse_loss(unet(xt, t.float(), context), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(learning_rate, step, steps, warmup=100)
        optimizer.step()
        for part, average in zip(parts, averages):
            average.update(part, step)
        losses.append(loss.item())
        if progress:
            progress(step + 1, steps, losses[-1])
    for part, average in zip(parts, averages):
        part.load_state_dict(average.shadow)
        part.eval().requires_grad_(False)
    return losses


def fine_tuned(patcher) -> comfy.model_patcher.ModelPatcher:
    """A separate copy of the model to fine-tune (the base stays as it is)."""
    return patcher_for(copy.deepcopy(patcher.model))


# ------------------------------------------------------------------------------------------------ sampling

def sample(patcher, text: TextEncoder, captions: list[str], frames: int, seed: int, steps: int = 20,
           cfg: float = 4.0, sampler: str = "euler", scheduler: str = "normal", negative: str = "",
           control=None) -> torch.Tensor:
    """Sample one clip of ``frames`` frames through the host's KSampler path, whatever ``patcher`` carries
    (motion module, context windows, FreeInit...): ``captions`` is one prompt or one per frame; ``control``,
    if given, takes the positive and negative conditioning and returns them with a ControlNet attached.
    Returns [frames, 3, H, W] pixels in [0, 1]."""
    shape = (frames, WorldLatent.latent_channels, LATENT_SIZE, LATENT_SIZE)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    latent = torch.zeros(shape)
    positive, negative = conditioning(text, captions), conditioning(text, [negative])
    if control is not None:
        positive, negative = control(positive, negative)
    out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                              disable_pbar=True, seed=seed)
    return to_pixels(out.float())  # the host has already taken it out of the model's latent scaling

"""Keyframe images in the world (issue 13): a small SparseCtrl (rgb) trained on the world's clips, and what
samples and measures it.

SparseCtrl's recipe (Guo et al., 2023, arXiv:2311.16933): the text-to-video model, image model and motion
module, stays frozen; the sparse condition encoder, initialised from the image UNet's down half (as ControlNets
are) with zero output convolutions, learns to denoise clips given the clean latent on a random few frames and a
mask saying which. The model is the extension's own SparseCtrlModel at the world's widths, saved in the
published key layout, so it loads through Load SparseCtrl like ``v3_sd15_sparsectrl_rgb.ckpt``; sampling goes
through the host's ControlNet path (model_patcher/sparse_ctrl.py), context windows included.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import comfy.utils
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..model_patcher.sparse_ctrl import apply_sparse_ctrl, keyframe_hint
from ..motion_modules import VanillaTemporalModule
from ..motion_modules.sparse_ctrl import RGB, SparseCtrlConfig, SparseCtrlModel
from ..training.loop import TrainingTemporalPatch, inserted, make_trainee, training_alphas
from . import measure, models, motion, scenes

MAX_KEYFRAMES = motion.FRAMES // 2  # per training clip: 1..8 conditioned frames, at random indices


def new_sparse_ctrl(base, seed: int = 0) -> SparseCtrlModel:
    """An rgb SparseCtrl at the base's widths: conv_in, time embedding, down blocks and mid block copied from the
    base UNet (the host's key names mapped with its own diffusers table), temporal modules and zero convs
    outputting zero, so that it starts by changing nothing."""
    unet_config = base.model.model_config.unet_config
    widths = tuple(unet_config["model_channels"] * m for m in unet_config["channel_mult"])
    depth = unet_config["transformer_depth"]
    layers = unet_config["num_res_blocks"][0]
    config = SparseCtrlConfig(kind=RGB, channels=widths, layers=layers,
                              attention=tuple(bool(depth[i * layers]) for i in range(len(widths))),
                              in_channels=unet_config["in_channels"], condition_channels=unet_config["in_channels"],
                              context_dim=unet_config["context_dim"], name="world SparseCtrl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SparseCtrlModel(config)
    unet = base.model.diffusion_model.state_dict()
    names = comfy.utils.unet_to_diffusers(unet_config)
    state = model.state_dict()
    copied = {k: unet[names[k]] for k in state if k in names and names[k] in unet and unet[names[k]].shape == state[k].shape}
    model.load_state_dict(copied, strict=False)
    for module in model.modules():
        if isinstance(module, VanillaTemporalModule):
            nn.init.zeros_(module.temporal_transformer.proj_out.weight)
            nn.init.zeros_(module.temporal_transformer.proj_out.bias)
    for zero in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
        nn.init.zeros_(zero.weight)
        nn.init.zeros_(zero.bias)
    return model


def condition(patcher, pixels: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] pixels -> rgb SparseCtrl conditions: the world's latents as the model sees them (the world's
    counterpart of ``SD15().process_in(vae.encode(image))`` in Apply SparseCtrl)."""
    return patcher.model.process_latent_in(models.to_latent(pixels))


def random_hint(latents: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """[f, c, h, w] clean latents -> a training hint: 1..MAX_KEYFRAMES random frames given, the rest masked."""
    frames = latents.shape[0]
    indices = sorted(rng.sample(range(frames), rng.randint(1, min(MAX_KEYFRAMES, frames))))
    return keyframe_hint(latents[indices], indices, frames)


def train_sparse_ctrl(base, text: models.TextEncoder, module_path: Path, path: Path, steps: int, batch_size: int = 2,
                      learning_rate: float = 1e-3, seed: int = 0, progress=None) -> list[float]:
    """Train a new SparseCtrl on ``base`` with the motion module ``module_path`` inserted (both frozen); the
    model is written to ``path`` (safetensors, published key names). Returns the loss of every step."""
    unet = base.model.diffusion_model
    ctrl = new_sparse_ctrl(base, seed).train()
    frozen = make_trainee(unet, init=module_path, frames=motion.FRAMES)
    frozen.module.eval().requires_grad_(False)
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)
    clips = motion.WorldClips(base, text, steps * batch_size, seed + 17)
    alphas = training_alphas(base, "model").float()
    params = list(ctrl.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    patches = {"forward_timestep_embed_patch": [(VanillaTemporalModule, TrainingTemporalPatch(frozen.module.config))]}
    generator, rng, losses = torch.Generator().manual_seed(seed), random.Random(seed), []
    try:
        with inserted(unet, frozen):
            for step in range(steps):
                examples = [clips.example(step * batch_size + i, rng) for i in range(batch_size)]
                latents = torch.stack([e.latents for e in examples])                       # b f c h w
                b, f = latents.shape[:2]
                hint = torch.cat([random_hint(e.latents, rng) for e in examples])           # (b f) c+1 h w
                context = torch.cat([e.context.expand(f, -1, -1) for e in examples])        # (b f) n d
                t = torch.randint(0, len(alphas), (b,), generator=generator)
                noise = torch.randn(latents.shape, generator=generator)
                a = alphas[t].view(b, 1, 1, 1, 1)
                noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).flatten(0, 1)
                target = (a.sqrt() * noise - (1 - a).sqrt() * latents).flatten(0, 1)     # v, as the base predicts
                timesteps = t.repeat_interleave(f).float()
                down, mid = ctrl(hint, timesteps, context, f)
                # the host's UNet adds control["output"] to its skip connections (popped from the end, matching
                # its own stack of input-block outputs) and control["middle"] after the middle block
                out = unet(noisy, timesteps, context=context, control={"input": [], "middle": [mid], "output": down},
                           transformer_options={"patches": patches, "cond_or_uncond": [0] * b})
                loss = F.mse_loss(out, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                for group in optimizer.param_groups:
                    group["lr"] = models.warmup_cosine(learning_rate, step, steps, warmup=50)
                optimizer.step()
                losses.append(loss.item())
                if progress:
                    progress(step + 1, steps, losses[-1])
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().contiguous() for k, v in ctrl.state_dict().items()}, str(tmp),
              {"description": "world SparseCtrl rgb (issue 13): trained on the world's base and motion module"})
    tmp.replace(path)
    return losses


def keyframes_given(patcher, control, images: dict[int, torch.Tensor], frames: int, strength: float = 1.0):
    """For :func:`models.sample`'s ``control``: ``images`` ({frame index: [3, H, W] pixels}) given to ``control``
    (a SparseCtrlControl, from Load SparseCtrl) on a ``frames``-frame clip, as Apply SparseCtrl gives them."""
    indices = sorted(images)
    hint = keyframe_hint(condition(patcher, torch.stack([images[i] for i in indices])), indices, frames)
    return lambda positive, negative: apply_sparse_ctrl(positive, negative, control, hint, strength, 0.0, 1.0)


KEYFRAME_SHIFT = (8.0, 8.0)  # px: the keyframe's object lies this far from where the clip's own would be
FAR = 6                      # frames: "far from the keyframe" is at least this many frames away


def keyframe(scene: scenes.Scene, k: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keyframe image for frame ``k`` of ``scene``'s clip: the same scene with its object moved by
    KEYFRAME_SHIFT (so it differs from what the prompt alone gives), rendered at frame ``k``; and the object's
    position there."""
    moved = dataclasses.replace(scene, start=(scene.start[0] + KEYFRAME_SHIFT[0], scene.start[1] + KEYFRAME_SHIFT[1]))
    return scenes.render(moved, k + 1)[k], moved.positions(k + 1)[k]


def distances(clip: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[f] mean absolute RGB difference of each frame of ``clip`` [f, 3, H, W] from ``image`` [3, H, W]."""
    return (clip - image).abs().mean(dim=(1, 2, 3))


def scores(given: torch.Tensor, plain: torch.Tensor, image: torch.Tensor, position: torch.Tensor, k: int,
           colour: str) -> dict:
    """How a clip sampled with ``image`` at frame ``k`` (``given``) moved toward it from the same seed sampled
    without (``plain``): the pull (distance to the image without minus with) at ``k`` and, averaged, on frames
    at least FAR away; frame ``k``'s distance with / without; and where frame ``k`` shows the object, in pixels
    from where the image has it."""
    d_given, d_plain = distances(given, image), distances(plain, image)
    pull = d_plain - d_given
    far = [j for j in range(len(given)) if abs(j - k) >= FAR]

    def error(clip):
        return float(measure.wrap(measure.track(clip[k:k + 1], colour).positions[0] - position).norm())

    return {"pull_at_keyframe": float(pull[k]), "pull_far": float(pull[far].mean()),
            "distance_ratio": float(d_given[k] / d_plain[k]),
            "object_error_px": {"with": error(given), "without": error(plain)}}

"""Training learns motion: a tiny SD1.5-shaped host model, frozen, and a motion module trained on synthetic clips
of textures moving right. Checks that the image model's weights never change (hash), that the loss falls, and
that the trained module, applied through the ordinary Apply Motion Module path, prefers rightward motion.

Figures (loss before/after, the direction criterion) are printed; run with ``-s`` to see them.
"""
import hashlib
import math

import pytest
import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from adm.model_patcher.motion_patcher import apply_motion_module, load_motion_patcher
from adm.motion_modules import load_motion_module
from adm.training import loop
from unets import unet_config

pytestmark = pytest.mark.training

FRAMES, SIZE, SPEED = 8, 8, 1     # clips of 8 latent frames of 8x8, moving right 1 latent pixel per frame
STEPS = 100


CONTEXT = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(7))  # one "caption" for every clip


def textures(seed: int, count: int, speed: int = SPEED) -> torch.Tensor:
    """[count, FRAMES, 4, SIZE, SIZE]: smooth random textures (Gaussian-filtered noise on a torus, unit variance
    per channel), each frame the previous one rolled ``speed`` pixels to the right."""
    g = torch.Generator().manual_seed(seed)
    white = torch.randn(count, 4, SIZE, SIZE, generator=g)
    f = torch.fft.fftfreq(SIZE)
    kernel = torch.exp(-2 * math.pi ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))  # sigma = 1 pixel
    still = torch.fft.ifft2(torch.fft.fft2(white) * kernel).real
    still = still / still.std(dim=(-1, -2), keepdim=True)
    return torch.stack([still.roll(speed * i, dims=-1) for i in range(FRAMES)], dim=1)


class MovingTextures:
    """An ExampleSource of latents directly (no VAE, no CLIP): example i is texture i moving right."""

    def __init__(self, count: int = 512, seed: int = 0):
        self.clips = textures(seed, count)

    def __len__(self):
        return len(self.clips)

    def example(self, index, rng):
        return loop.Example(self.clips[index].roll(rng.randrange(SIZE), dims=-1), CONTEXT)


def flat_sd15_patcher(seed: int = 0):
    """The tests' tiny SD1.5-shaped host model with all four levels 32 wide (a quarter of the work of 32/64/128)."""
    config = comfy.supported_models.SD15(dict(unet_config(model_channels=32, context_dim=32), channel_mult=[1, 1, 1, 1]))
    torch.manual_seed(seed)
    model = comfy.model_base.BaseModel(config, device="cpu")
    for p in model.diffusion_model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.01)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def pretrain_image_model(model, steps: int = 40) -> None:
    """AnimateDiff builds on a good image model; a random UNet denoises nothing, leaving the temporal layers
    nothing to refine. So the tiny model first learns to denoise single frames of the same textures (all its
    weights, plain torch, 40 steps), then stays frozen for the rest of the test."""
    unet = model.model.diffusion_model
    alphas = loop.training_alphas(model, "sqrt_linear").float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.enable_grad():
        for step in range(steps):
            x0 = textures(10_000 + step, 32)[:, 0]
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (len(x0),), generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            out = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), CONTEXT.expand(len(x0), -1, -1))
            loss = torch.nn.functional.mse_loss(out, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    unet.requires_grad_(True)


def fingerprint(unet) -> str:
    digest = hashlib.sha256()
    for key, value in unet.state_dict().items():
        digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def reversal_gap(patched, clips: torch.Tensor, seed: int = 3) -> tuple[float, float]:
    """(loss on the clips as they are, loss on the same clips played backwards), same noise (reversed along with
    the frames) and timesteps, through the host's own apply_model of the animated MODEL clone."""
    comfy.model_management.load_models_gpu([patched, *patched.get_nested_additional_models()])
    sampling = patched.model.model_sampling
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(clips.shape, generator=g)
    sigma = sampling.sigmas.cpu()[torch.randint(100, 1000, (len(clips),), generator=g)]
    options = patched.model_options["transformer_options"]

    device = patched.load_device

    def loss(x0, eps):
        b = len(x0)
        s = sigma.repeat_interleave(FRAMES).to(device)
        x = (x0 + sigma.view(b, 1, 1, 1, 1) * eps).flatten(0, 1).to(device)
        with torch.no_grad():
            denoised = patched.model.apply_model(x, s, c_crossattn=CONTEXT.expand(b * FRAMES, -1, -1).to(device),
                                                 transformer_options={**options, "cond_or_uncond": [0] * b})
        predicted = (x - denoised) / s.view(-1, 1, 1, 1)
        return torch.nn.functional.mse_loss(predicted.float().cpu(), eps.flatten(0, 1)).item()

    return loss(clips, noise), loss(clips.flip(1), noise.flip(1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = flat_sd15_patcher()
    pretrain_image_model(model)
    unet = model.model.diffusion_model
    before = fingerprint(unet)
    trainee = loop.make_trainee(unet, style="v3", frames=FRAMES, seed=0)
    zero = loop.new_motion_module(trainee.module.config, seed=0)  # the same module, untrained
    # lr 1e-2 instead of the recipe's 1e-4: a hundred steps have to show what a real run learns in thousands.
    options = loop.TrainingOptions(steps=STEPS, batch_size=4, learning_rate=1e-2, seed=0)
    result = loop.train(model, MovingTextures(), trainee, options)
    folder = tmp_path_factory.mktemp("trained")
    meta = loop.training_metadata(trainee, options, result, dataset_size=512, frames=FRAMES)
    path = loop.save_trained(trainee, folder / "moving_right.safetensors", meta)
    zero_path = loop.save_trained(loop.Trainee(zero), folder / "zero.safetensors", meta)
    # Held-out clips, denoised through Apply Motion Module's own path with the module read back from its file.
    held_out = textures(seed=999, count=16)
    trained_losses = reversal_gap(apply_motion_module(model, load_motion_patcher(path)), held_out)
    zero_losses = reversal_gap(apply_motion_module(model, load_motion_patcher(zero_path)), held_out)
    return dict(model=model, before=before, result=result, path=path, trainee=trainee, trained=trained_losses,
                zero=zero_losses)


def test_the_image_model_is_bit_identical_after_training(trained):
    assert fingerprint(trained["model"].model.diffusion_model) == trained["before"]
    unet = trained["model"].model.diffusion_model
    assert not [m for m in unet.modules() if type(m).__name__ == "VanillaTemporalModule"]  # ejected


def test_the_loss_falls(trained):
    """Held-out clips (fixed noise and timesteps): the loss with the trained module against the loss at the start
    (the zero-initialised module, i.e. the frozen image model alone). The training curve is printed too."""
    before, after = trained["zero"][0], trained["trained"][0]
    losses = trained["result"].losses
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"\nheld-out loss: {before:.4f} before, {after:.4f} after {STEPS} steps ({100 * (1 - after / before):.0f}% "
          f"lower); training loss, mean of the first / last 20 steps: {first:.4f} / {last:.4f}; "
          f"{trained['result'].seconds_per_step:.3f} s/step")
    assert after < 0.93 * before


def test_the_trained_module_prefers_the_direction_it_was_trained_on(trained):
    """Criterion: the time-reversal gap. Held-out clips of textures moving right are noised at random timesteps
    (t >= 100) and denoised by the animated model; then the same clips are played backwards (frames reversed, and
    the noise with them), which makes them move left, and denoised again. Every frame is the same picture either
    way, so a model whose frames do not interact (the plain image model, or a zero-initialised motion module) has
    exactly the same loss on both. A module that learnt "things move right" predicts the forward clips' noise
    better: gap = loss(backwards) - loss(forwards) > 0. The module is read back from its saved file and applied
    with Apply Motion Module's own code path, as a user would."""
    (forward, backward), (zero_f, zero_b) = trained["trained"], trained["zero"]
    print(f"\ntrained module: loss forwards {forward:.4f}, backwards {backward:.4f}, gap {backward - forward:+.4f} "
          f"({100 * (backward - forward) / forward:+.1f}%); zero-initialised: {zero_f:.4f} / {zero_b:.4f}, "
          f"gap {zero_b - zero_f:+.6f}")
    assert abs(zero_b - zero_f) < 1e-5
    assert backward - forward > 0.03 * forward


def test_the_saved_module_loads_back_with_its_metadata(trained):
    from safetensors import safe_open
    module = load_motion_module(trained["path"])
    assert module.config.family == "AnimateDiff v3" and len(module.in_unet_order()) == 20
    saved = trained["trainee"].module.state_dict()
    assert all(torch.equal(v, saved[k].cpu()) for k, v in module.state_dict().items())
    with safe_open(trained["path"], "pt") as f:
        meta = f.metadata()
    assert meta["family"] == "AnimateDiff v3" and meta["base"] == "SD1.5" and meta["frames"] == str(FRAMES)
    assert meta["steps"] == str(STEPS) and meta["dataset_size"] == "512" and float(meta["learning_rate"]) == 1e-2

"""The training loop's contracts on the tiny SD1.5-shaped host model with latents fed directly: exact resume,
identity at the start, gradient checkpointing, options, refusals, motion-LoRA training and its file layout."""
import random
import re

import numpy as np
import pytest
import torch

import comfy.model_management
from adm.model_patcher.motion_patcher import add_motion_lora, apply_motion_module, load_motion_patcher
from adm.motion_modules import MotionModuleError, detect, load_motion_module, read_state_dict
from adm.training import loop
from adm.training.lora import merge_motion_lora
from unets import tiny_sd15_patcher

pytestmark = pytest.mark.training

FRAMES = 4


class RandomClips:
    """Latents and conditioning drawn from the per-clip rng, and, like user augmentation code might, also from the
    global python, numpy and torch generators: an exact resume has to restore all of them."""

    def __init__(self, count: int = 5):
        self.count = count

    def __len__(self):
        return self.count

    def example(self, index, rng):
        g = torch.Generator().manual_seed(index * 1000 + rng.randrange(1000))
        latents = torch.randn(FRAMES, 4, 8, 8, generator=g)
        latents = latents * (1 + 0.1 * random.random()) + 0.1 * float(np.random.rand()) + 0.1 * torch.rand(1)
        return loop.Example(latents, torch.randn(1, 5, 32, generator=g))


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


def weights(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def options(**kw):
    base = dict(steps=6, batch_size=2, learning_rate=1e-3, lr_schedule="cosine", warmup_steps=2, seed=11)
    return loop.TrainingOptions(**{**base, **kw})


def test_six_steps_straight_equal_three_then_resume_then_three_bit_for_bit(model, tmp_path):
    unet = model.model.diffusion_model
    straight = loop.make_trainee(unet, style="v2", frames=FRAMES, seed=3)
    run = loop.train(model, RandomClips(), straight, options())

    stop_at_three = lambda step, total, loss, losses: step == 3  # noqa: E731  (as a cancelled prompt would)
    first = loop.make_trainee(unet, style="v2", frames=FRAMES, seed=3)
    part = loop.train(model, RandomClips(), first, options(state_dir=str(tmp_path)), progress=stop_at_three)
    assert part.stopped and part.steps == 3 and part.state_path == tmp_path / "step-0000003.pt"
    assert loop.latest_state(tmp_path) == part.state_path

    second = loop.make_trainee(unet, style="v2", frames=FRAMES, seed=99)  # other init: the state must win
    rest = loop.train(model, RandomClips(), second, options(state_dir=str(tmp_path)), resume=part.state_path)
    assert not rest.stopped and rest.steps == 6 and loop.latest_state(tmp_path).name == "step-0000006.pt"
    assert rest.losses == run.losses
    a, b = weights(straight.module), weights(second.module)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], weights(loop.new_motion_module(straight.module.config, seed=3))[k]) for k in a)


def test_a_new_module_starts_as_the_identity_and_leaves_nothing_behind(model):
    unet = model.model.diffusion_model
    trainee = loop.make_trainee(unet, style="v2", frames=FRAMES, seed=0)
    trainee.module.to(model.load_device)
    assert len(trainee.module.in_unet_order()) == 21 and trainee.module.config.family == "AnimateDiff v2"
    comfy.model_management.load_models_gpu([model])
    x, t, context = (v.to(model.load_device) for v in (torch.randn(2 * FRAMES, 4, 8, 8), torch.full((2 * FRAMES,), 400.0),
                                                       torch.randn(2 * FRAMES, 5, 32)))
    plain = unet(x, t, context)
    options = loop._transformer_options(model, trainee, recompute=False)
    with loop.inserted(unet, trainee):
        inserted = unet(x, t, context, transformer_options={**options, "cond_or_uncond": [0, 0]})
    assert torch.equal(plain, inserted)
    assert not [m for m in unet.modules() if type(m).__name__ == "VanillaTemporalModule"]
    assert all(p.requires_grad for p in unet.parameters())  # the host's flags come back after training too
    loop.train(model, RandomClips(), trainee, options_for_steps(1))
    assert all(p.requires_grad for p in unet.parameters())


def options_for_steps(steps, **kw):
    return loop.TrainingOptions(**{"steps": steps, "batch_size": 2, "learning_rate": 1e-3, "seed": 5, **kw})


@pytest.mark.parametrize("mode", ["motion", "full"])
def test_gradient_checkpointing_gives_the_same_training(model, mode):
    unet = model.model.diffusion_model
    plain, checkpointed = (loop.make_trainee(unet, style="v3", frames=FRAMES, seed=1) for _ in range(2))
    a = loop.train(model, RandomClips(), plain, options_for_steps(2))
    b = loop.train(model, RandomClips(), checkpointed, options_for_steps(2, gradient_checkpointing=mode))
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    wa, wb = weights(plain.module), weights(checkpointed.module)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert not [m for m in unet.modules() if "forward" in vars(m)]  # the recomputing forwards are gone


def test_learning_rate_schedules():
    constant = loop.TrainingOptions(steps=10, learning_rate=1.0, warmup_steps=4)
    assert [loop.learning_rate(constant, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = loop.TrainingOptions(steps=10, learning_rate=1.0, lr_schedule="cosine")
    assert loop.learning_rate(cosine, 0) == 1.0 and loop.learning_rate(cosine, 5) == pytest.approx(0.5)
    assert loop.learning_rate(cosine, 9) < 0.03
    with pytest.raises(loop.TrainingError, match="noise_schedule"):
        loop.TrainingOptions(noise_schedule="karras")


def test_noise_schedules(model):
    """sqrt_linear is AnimateDiff's (linear betas 0.00085..0.012); model is SD1.5's own, exactly as the host makes
    it (scaled-linear), recomputed in float64."""
    ours = loop.training_alphas(model, "sqrt_linear")
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    torch.testing.assert_close(ours, torch.cumprod(1 - betas, 0), rtol=0, atol=1e-15)
    own = loop.training_alphas(model, "model")
    sigmas = model.model.model_sampling.sigmas.double().cpu()
    torch.testing.assert_close(own, 1 / (1 + sigmas ** 2), rtol=1e-6, atol=0)  # the host's table is float32
    assert torch.equal(own, loop.training_alphas(model, "linear"))
    assert ours[-1] < own[-1]  # AnimateDiff's schedule ends noisier (sigma_max 25 vs 14.6)


def test_refusals_say_what_to_do(model, tmp_path):
    unet = model.model.diffusion_model
    module_file = save_random_module(unet, tmp_path)
    animated = apply_motion_module(model, load_motion_patcher(module_file))
    trainee = loop.make_trainee(unet, style="v3", frames=FRAMES)
    with pytest.raises(loop.TrainingError, match="already has a motion module applied"):
        loop.train(animated, RandomClips(), trainee, options_for_steps(1))
    with pytest.raises(loop.TrainingError, match="LoRA adapts an existing motion module"):
        loop.make_trainee(unet, lora_rank=4)
    with pytest.raises(loop.TrainingError, match="at most 32 frames"):
        loop.make_trainee(unet, init=module_file, frames=48)
    with pytest.raises(loop.TrainingError, match="save_every needs a state_dir"):
        loop.train(model, RandomClips(), trainee, options_for_steps(1, save_every=1))


def save_random_module(unet, folder, seed=4):
    """A 'trained' module file: random weights everywhere, output projections included."""
    trainee = loop.make_trainee(unet, style="v2", frames=FRAMES, seed=seed)
    torch.manual_seed(seed)
    for temporal in trainee.module.in_unet_order():
        torch.nn.init.normal_(temporal.temporal_transformer.proj_out.weight, std=0.2)
    return loop.save_trained(trainee, folder / f"base_{seed}.safetensors", {"family": "test"})


LORA_KEY = re.compile(r"^(down_blocks\.\d|up_blocks\.\d|mid_block)\.motion_modules\.\d\.temporal_transformer\."
                      r"transformer_blocks\.0\.attention_blocks\.[01]\.processor\.(to_q|to_k|to_v|to_out)_lora\."
                      r"(down|up)\.weight$")


def test_motion_lora_trains_only_its_adapters_and_saves_the_published_layout(model, tmp_path):
    unet = model.model.diffusion_model
    base_file = save_random_module(unet, tmp_path)
    base_before = read_state_dict(base_file)
    unet_before = weights(unet)
    trainee = loop.make_trainee(unet, init=base_file, frames=FRAMES, lora_rank=4, lora_scale=0.5, seed=2)
    module_before = weights(trainee.module)
    assert not any(p.requires_grad for p in trainee.module.parameters())
    result = loop.train(model, RandomClips(), trainee, options_for_steps(3, learning_rate=1e-2))
    assert all(torch.equal(v, module_before[k]) for k, v in weights(trainee.module).items())
    assert all(torch.equal(v, unet_before[k]) for k, v in weights(unet).items())
    assert all(a.up.weight.abs().sum() > 0 for a in trainee.lora.adapters)  # every adapter learnt something

    meta = loop.training_metadata(trainee, options_for_steps(3), result, dataset_size=5, frames=FRAMES)
    path = loop.save_trained(trainee, tmp_path / "lora.safetensors", meta)
    sd = read_state_dict(path)
    # 21 modules x 2 attention blocks x (q, k, v, out) x (down, up), shapes down [r, C], up [C, r]
    assert len(sd) == 21 * 2 * 4 * 2 and all(LORA_KEY.match(k) for k in sd)
    widths = {m: c for m, c in zip(range(21), trainee.module.config.channels_in_unet_order)}
    assert {tuple(v.shape) for k, v in sd.items() if k.startswith("down_blocks.0") and k.endswith("down.weight")} == {(4, widths[0])}
    with pytest.raises(MotionModuleError, match="motion LoRA"):
        detect(sd, "lora.safetensors")  # not mistaken for a motion module

    # Loads back through the host path (Load Motion LoRA) and gives what training computed with the adapters.
    x = torch.randn(2 * FRAMES, 32, 8, 8)
    with torch.no_grad(), trainee.lora.attached():
        during_training = trainee.module.in_unet_order()[0](x.to(next(trainee.module.parameters()).device), FRAMES)
    merged = load_motion_module(base_file)
    merged = type(trainee.module)(merged.config)
    merged.load_state_dict(read_state_dict(base_file))
    assert merge_motion_lora(merged, sd) == 21 * 2 * 4
    with torch.no_grad():
        torch.testing.assert_close(merged.in_unet_order()[0](x, FRAMES), during_training.cpu(), rtol=1e-5, atol=1e-5)
    host = add_motion_lora(load_motion_patcher(base_file), path, 1.0)
    host.patch_model()
    try:
        key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_v.weight"
        patched = host.model.state_dict()[key]  # in the host's UNet dtype (fp16 on a GPU)
        torch.testing.assert_close(patched.float().cpu(), merged.state_dict()[key].to(patched.dtype).float(),
                                   rtol=1e-5, atol=1e-3 if patched.dtype == torch.float16 else 1e-6)
    finally:
        host.unpatch_model()
    assert {k: v for k, v in read_state_dict(base_file).items()}.keys() == base_before.keys()


def test_a_lora_run_continues_from_a_saved_lora(model, tmp_path):
    unet = model.model.diffusion_model
    base_file = save_random_module(unet, tmp_path)
    first = loop.make_trainee(unet, init=base_file, frames=FRAMES, lora_rank=2, lora_scale=2.0, seed=1)
    loop.train(model, RandomClips(), first, options_for_steps(1))
    path = loop.save_trained(first, tmp_path / "first.safetensors", {})
    again = loop.make_trainee(unet, init=base_file, frames=FRAMES, lora_rank=2, lora_scale=2.0, lora_init=path)
    for a, b in zip(first.lora.adapters, again.lora.adapters):
        assert torch.equal(a.down.weight.cpu(), b.down.weight) and torch.allclose(a.up.weight.cpu(), b.up.weight)

"""ControlNet per frame: the host's ControlNet apply node takes a batch of hint images, and with one hint per frame
(e.g. the frames of a Load Video, or their depth / pose maps) frame i is guided by hint i. A tiny ControlNet built
from the host's own classes, matching the tiny SD1.5 UNet, is attached with the host's Apply ControlNet node."""
import pytest
import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management
import comfy.ops
import comfy.sample

from adm.model_patcher.motion_patcher import apply_motion_module
from unets import tiny_motion_patcher, tiny_sd15_patcher, unet_config

FRAMES = 5
LATENT = 8  # latent side; hints are 8x larger, in pixels


def tiny_controlnet(seed=0):
    """comfy.controlnet.ControlNet around a host cldm.ControlNet shaped like tests/unets.py's tiny SD1.5 UNet."""
    config = unet_config(model_channels=32, context_dim=32)
    config.pop("out_channels")
    torch.manual_seed(seed)
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu",
                                     **config)
    for name, p in net.named_parameters():  # the host's layers skip weight init: give them values
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.01)
        elif name.startswith("input_hint_block"):  # variance-keeping, so the hint's content carries through
            torch.nn.init.normal_(p, std=(2 / p[0].numel()) ** 0.5)
        else:  # zero convs start at zero in training and grow; here they are large enough to steer clearly
            torch.nn.init.normal_(p, std=0.5 if name.startswith(("zero_convs", "middle_block_out")) else 0.05)
    net.eval().requires_grad_(False)
    return comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device())


def hints(seed=0):
    """One IMAGE per frame, [FRAMES, H, W, 3] in 0..1, as Load Video would give."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(FRAMES, LATENT * 8, LATENT * 8, 3, generator=generator)


def sample(model, control, images, seed=3):
    """Two euler steps of FRAMES latents, the ControlNet attached by the host's Apply ControlNet node (control=None:
    none attached)."""
    import nodes  # the host's core nodes: ControlNetApplyAdvanced is "Apply ControlNet"

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(FRAMES, 4, LATENT, LATENT, generator=generator)
    positive = [[torch.randn(1, 77, 32, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 32, generator=generator), {}]]
    if control is not None:
        positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control, images, strength=1.0, start_percent=0.0, end_percent=1.0)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative,
                               torch.zeros_like(noise), seed=seed, disable_pbar=True)


def per_frame_change(a, b):
    return (a - b).flatten(1).abs().mean(dim=1)


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_patcher()


@pytest.fixture(scope="module")
def control():
    return tiny_controlnet()


def with_hint_changed(images, k):
    changed = images.clone()
    changed[k] = 1 - changed[k]
    return changed


def test_the_controlnet_guides_the_sampling(model, control):
    assert per_frame_change(sample(model, control, hints()), sample(model, None, None)).min() > 1e-2


def test_without_motion_module_frame_k_depends_on_hint_k_only(model, control):
    images = hints()
    base = sample(model, control, images)
    for k in (0, 2, FRAMES - 1):
        changed = per_frame_change(sample(model, control, with_hint_changed(images, k)), base)
        others = [i for i in range(FRAMES) if i != k]
        assert changed[k] > 1e-2, (k, changed)
        assert torch.all(changed[others] == 0), (k, changed)  # independent images: bit for bit the same


def test_with_motion_module_hint_k_acts_most_on_frame_k(model, control):
    animated = apply_motion_module(model, tiny_motion_patcher())
    images = hints()
    base = sample(animated, control, images)
    for k in (0, 2, FRAMES - 1):
        changed = per_frame_change(sample(animated, control, with_hint_changed(images, k)), base)
        print(f"hint {k} changed the frames by " + ", ".join(f"{v:.4f}" for v in changed.tolist()))
        assert int(changed.argmax()) == k, (k, changed)
        others = [i for i in range(FRAMES) if i != k]
        assert torch.all(changed[others] > 0), (k, changed)  # ... and reaches the others through temporal attention


def test_a_single_hint_is_shared_by_every_frame(model, control):
    # The host repeats a batch of one hint for every frame: changing it changes all frames (no motion module).
    one = hints()[:1]
    base = sample(model, control, one)
    changed = per_frame_change(sample(model, control, 1 - one), base)
    assert torch.all(changed > 1e-2), changed

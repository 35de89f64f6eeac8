"""PIA: one UNet call of ours (the host's UNet, our motion modules, PIA's input through PIA Image Input's c_concat
and conv patch) against diffusers' PIA UNet: UNetMotionModel.from_unet2d with a MotionAdapter holding PIA's
9-channel conv_in (diffusers keeps the 2-D UNet's first 4 input channels and bias, PIA's last 5).

Both see the same clip, timesteps, text and the same [mask, image latent] channels: ours builds them from the
image (through a VAE) and the motion-intensity preset, diffusers gets them as its pipeline does, concatenated
after the latent. The comparison is on the noise prediction (ours is read back from the host's denoised output).
"""
import dataclasses

import pytest
import torch

import comfy.model_management
import comfy.model_patcher

from adm.model_patcher.image_to_video import apply_pia, pia_mask_values
from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
from adm.motion_modules.diffusers_format import to_diffusers
from adm.motion_modules.formats import published_state_dict
from parity.test_unet import BATCH, CONTEXT, FRAMES, SIZE, TOKENS, diffusers_unet2d, host_model, motion_module
from unets import tiny_motion_config

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4
PRESET, IMAGE_FRAME = "large motion", 2


class PixelsToLatent:
    """A VAE stand-in: any fixed map from pixels to a [1, 4, H/8, W/8] latent will do for a parity check."""

    def encode(self, pixels):
        pooled = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) * 4 - 2


def pia_module(mid: bool):
    config = tiny_motion_config(family="PIA", mid=(128,) if mid else ())
    return motion_module(dataclasses.replace(config, norm_across_frames=True))  # diffusers' norm, as test_unet


def diffusers_pia_unet(unet2d, module):
    motion = {k: v for k, v in published_state_dict(module).items() if not k.startswith("conv_in.")}
    state, config = to_diffusers(motion)
    adapter = diffusers.MotionAdapter(**{**config, "conv_in_channels": 9})
    state.update({"conv_in.weight": module.conv_in.weight, "conv_in.bias": module.conv_in.bias})
    adapter.load_state_dict(state, strict=True)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        model = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("mid", [False, True], ids=["no-mid-block", "mid-block"])
def test_pia_unet_call_matches_diffusers(mid):
    host = host_model("SD1.5")
    module = pia_module(mid)
    motion = comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                              offload_device=comfy.model_management.unet_offload_device())
    g = torch.Generator().manual_seed(7)
    image = torch.rand(1, SIZE * 8, SIZE * 8, 3, generator=g)
    vae = PixelsToLatent()
    # ResNets per frame, as diffusers (PIA itself normalises them across frames, like v1: frame_groupnorm)
    patched = apply_pia(apply_motion_module(host, motion, MotionOptions(frame_groupnorm="off")), image, vae, PRESET,
                        IMAGE_FRAME)
    reference = diffusers_pia_unet(diffusers_unet2d("SD1.5", host), module)

    x = torch.randn(BATCH * FRAMES, 4, SIZE, SIZE, generator=g)
    context = torch.randn(BATCH * FRAMES, TOKENS, CONTEXT, generator=g)
    comfy.model_management.load_models_gpu([patched])
    sampling = patched.model.model_sampling  # AnimateDiff's sqrt_linear schedule, swapped in by Apply Motion Module
    sigma = torch.tensor([14.6, 0.9]).repeat_interleave(FRAMES)
    options = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers, "cond_or_uncond": [0, 1]}
    with torch.no_grad():
        denoised = patched.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
        ours = (x - denoised) / sigma.view(-1, 1, 1, 1)

        latent = patched.model.process_latent_in(vae.encode(image))  # [1, 4, SIZE, SIZE], what PIA's pipeline feeds
        mask = torch.tensor(pia_mask_values(PRESET, range(FRAMES), IMAGE_FRAME)).view(1, 1, FRAMES, 1, 1)
        sample = torch.cat([
            sampling.calculate_input(sigma.view(-1, 1, 1, 1), x).view(BATCH, FRAMES, 4, SIZE, SIZE).permute(0, 2, 1, 3, 4),
            mask.expand(BATCH, 1, FRAMES, SIZE, SIZE),
            latent[:, :, None].expand(BATCH, 4, FRAMES, SIZE, SIZE)], dim=1)
        timesteps = sampling.timestep(sigma).view(BATCH, FRAMES)[:, 0]
        theirs = reference(sample=sample, timestep=timesteps, encoder_hidden_states=context).sample
        theirs = theirs.permute(0, 2, 1, 3, 4).reshape(ours.shape)
        zero_image = sample.clone()
        zero_image[:, 4:] = 0
        without = reference(sample=zero_image, timestep=timesteps, encoder_hidden_states=context).sample
    err = (ours - theirs).abs().max().item()
    effect = (theirs - without.permute(0, 2, 1, 3, 4).reshape(ours.shape)).abs().max().item()
    print(f"PIA UNet mid={mid}: max abs err {err:.3e} (output max {theirs.abs().max():.3f}, the image input changes "
          f"it by up to {effect:.3f})")
    assert err <= TOLERANCE
    assert effect > 1000 * TOLERANCE  # PIA's channels are really in the path being compared

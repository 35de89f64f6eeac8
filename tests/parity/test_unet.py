"""The whole animated UNet: the host's UNet with our motion modules inserted, against diffusers' UNetMotionModel
built from a UNet2DConditionModel holding the same weights and a MotionAdapter loaded through to_diffusers.

Both sides see identical inputs: the raw UNet call (latents, timesteps 0..999, context, and for SDXL the added
embedding built by the host's own SDXL.encode_adm from pooled text and size/crop conditions), so no sampler,
sigma scaling or prediction-type convention sits in between. Our modules run with norm_across_frames=True,
diffusers' behaviour (the default per-frame norm is pinned in test_temporal_block.py).
"""
import dataclasses

import pytest
import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils

from adm.model_patcher.motion_patcher import apply_motion_module
from adm.motion_modules import MotionModule
from adm.motion_modules.diffusers_format import to_diffusers
from adm.motion_modules.formats import published_state_dict
from unets import tiny_motion_config, unet_config

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

BATCH, FRAMES, SIZE, TOKENS, CONTEXT = 2, 8, 8, 7, 32
POOLED = 32                      # pooled text width of the tiny SDXL; the six size/crop ids add 6 x 256
TOLERANCE = 1e-4


class TinySDXL(comfy.supported_models.SDXL):
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}  # 2/4/8 heads at widths 32/64/128


def host_config(base: str) -> dict:
    if base == "SD1.5":
        return unet_config(model_channels=32, context_dim=CONTEXT)
    # SDXL's structure (3 levels, no attention at level 0, deeper transformers further down, linear proj_in,
    # the added embedding), at small widths and depths.
    return dict(unet_config("SDXL", model_channels=32, context_dim=CONTEXT), transformer_depth=[0, 0, 1, 1, 2, 2],
                transformer_depth_middle=2, transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
                adm_in_channels=POOLED + 6 * 256, num_classes="sequential")  # as the host's detection sets it


def host_model(base: str, seed: int = 0):
    if base == "SD1.5":
        config = comfy.supported_models.SD15(host_config(base))
        torch.manual_seed(seed)
        model = comfy.model_base.BaseModel(config, device="cpu")
    else:
        config = TinySDXL(host_config(base))
        torch.manual_seed(seed)
        model = comfy.model_base.SDXL(config, device="cpu")
    for name, p in model.diffusion_model.named_parameters():  # the host's layers skip weight init
        if p.dim() > 1:
            fan_in = p[0].numel()
            torch.nn.init.normal_(p, std=fan_in ** -0.5)
        elif "norm" in name and name.endswith("weight") or name.startswith("out.0.weight"):
            p.data.copy_(1 + 0.1 * torch.randn_like(p))
        else:
            torch.nn.init.normal_(p, std=0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def motion_config(base: str, mid: bool):
    if base == "SD1.5":
        config = tiny_motion_config(mid=(128,) if mid else (), family="AnimateDiff v2" if mid else "AnimateDiff v3")
    else:
        config = tiny_motion_config(family="AnimateDiff SDXL beta", base="SDXL", mid=(),
                                    down=((32, 32), (64, 64), (128, 128)), up=((128,) * 3, (64,) * 3, (32,) * 3))
    return dataclasses.replace(config, norm_across_frames=True)  # what diffusers does


def motion_module(config, seed: int = 1) -> MotionModule:
    torch.manual_seed(seed)
    module = MotionModule(config).eval().requires_grad_(False)
    for name, p in module.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
        elif name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        else:
            torch.nn.init.normal_(p, std=0.05)
    return module


def diffusers_unet2d(base: str, patcher):
    """diffusers' UNet2DConditionModel of the same shape, holding the host's weights (through the host's own
    unet_to_diffusers key map; every key on both sides used exactly once)."""
    channels = (32, 64, 128, 128) if base == "SD1.5" else (32, 64, 128)
    common = dict(sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
                  cross_attention_dim=CONTEXT, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
    if base == "SD1.5":
        unet = diffusers.UNet2DConditionModel(
            **common, attention_head_dim=8, use_linear_projection=False,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    else:
        unet = diffusers.UNet2DConditionModel(
            **common, attention_head_dim=(2, 4, 8), use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=POOLED + 6 * 256)
    key_map = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)  # diffusers key -> host key
    host = patcher.model.diffusion_model.state_dict()
    wanted = unet.state_dict()
    mapped = {d: host[h] for d, h in key_map.items() if d in wanted}
    assert set(mapped) == set(wanted), sorted(set(wanted) - set(mapped))[:5]
    assert {key_map[d] for d in mapped} == set(host), sorted(set(host) - {key_map[d] for d in mapped})[:5]
    unet.load_state_dict(mapped, strict=True)
    return unet.eval().requires_grad_(False)


def diffusers_motion_unet(unet2d, module: MotionModule):
    state, config = to_diffusers(published_state_dict(module))
    adapter = diffusers.MotionAdapter(**config)
    adapter.load_state_dict(state, strict=True)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # from_unet2d's .to(dtype) warns about a no-op cast
    try:
        model = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    if unet2d.config.addition_embed_type == "text_time":
        # from_unet2d copies conv_in, the time embedding and the blocks, but not SDXL's added-condition embedding.
        model.add_embedding.load_state_dict(unet2d.add_embedding.state_dict())
    return model.eval().requires_grad_(False)


def inputs(base: str, host):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, FRAMES, 4, SIZE, SIZE, generator=g)
    timesteps = torch.tensor([999.0, 261.0])
    context = torch.randn(BATCH * FRAMES, TOKENS, CONTEXT, generator=g)
    ours = dict(x=x.reshape(BATCH * FRAMES, 4, SIZE, SIZE), timesteps=timesteps.repeat_interleave(FRAMES),
                context=context)
    theirs = dict(sample=x.permute(0, 2, 1, 3, 4), timestep=timesteps, encoder_hidden_states=context)
    if base == "SDXL":
        pooled = torch.randn(BATCH, POOLED, generator=g)
        size = dict(height=1024, width=768, crop_h=16, crop_w=48, target_height=896, target_width=640)
        y = host.model.encode_adm(pooled_output=pooled, **size)
        ours["y"] = y.repeat_interleave(FRAMES, dim=0)
        ids = [size[k] for k in ("height", "width", "crop_h", "crop_w", "target_height", "target_width")]
        theirs["added_cond_kwargs"] = dict(text_embeds=pooled, time_ids=torch.tensor([ids] * BATCH, dtype=torch.float32))
    return ours, theirs


def image_model_output(unet2d, theirs_in):
    """diffusers' plain image UNet on the same frames: what the output would be without motion modules."""
    sample = theirs_in["sample"]
    frames = sample.shape[2]
    kwargs = {}
    if "added_cond_kwargs" in theirs_in:
        kwargs["added_cond_kwargs"] = {k: v.repeat_interleave(frames, dim=0)
                                       for k, v in theirs_in["added_cond_kwargs"].items()}
    out = unet2d(sample.permute(0, 2, 1, 3, 4).reshape(-1, *sample.shape[1:2], *sample.shape[3:]),
                 theirs_in["timestep"].repeat_interleave(frames), theirs_in["encoder_hidden_states"], **kwargs).sample
    return out


@pytest.mark.parametrize("base, mid", [("SD1.5", True), ("SD1.5", False), ("SDXL", False)],
                         ids=["v2-shaped", "v3-shaped", "SDXL-beta-shaped"])
def test_animated_unet_matches_diffusers(base, mid):
    host = host_model(base)
    module = motion_module(motion_config(base, mid))
    motion = comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                              offload_device=comfy.model_management.unet_offload_device())
    patched = apply_motion_module(host, motion)
    reference_2d = diffusers_unet2d(base, host)
    reference = diffusers_motion_unet(reference_2d, module)
    ours_in, theirs_in = inputs(base, host)

    comfy.model_management.load_models_gpu([patched])
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0, 1]}  # two clips, chunk-major
    with torch.no_grad():
        ours = patched.model.diffusion_model(ours_in["x"], ours_in["timesteps"], ours_in["context"],
                                             y=ours_in.get("y"), transformer_options=options)
        theirs = reference(**theirs_in).sample.permute(0, 2, 1, 3, 4).reshape(ours.shape)
        still = image_model_output(reference_2d, theirs_in)
    err = (ours - theirs).abs().max().item()
    effect = (theirs - still).abs().max().item()
    print(f"whole UNet {base} mid={mid}: max abs err {err:.3e} (output max {theirs.abs().max():.3f}, "
          f"motion modules change it by up to {effect:.3f})")
    assert err <= TOLERANCE
    assert effect > 1000 * TOLERANCE  # the modules are really in the path being compared

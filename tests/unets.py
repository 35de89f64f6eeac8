"""Host UNets with the SD1.5 / SDXL block structure at any width, for tests (full width for the real shapes)."""
import torch

import comfy.ops
import comfy.supported_models
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel


def unet_config(base: str = "SD1.5", model_channels: int = 320, context_dim: int | None = None) -> dict:
    common = dict(image_size=32, in_channels=4, out_channels=4, model_channels=model_channels, legacy=False,
                  use_spatial_transformer=True, use_checkpoint=False, use_temporal_attention=False,
                  use_temporal_resblock=False)
    if base == "SD1.5":
        return dict(common, num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], num_heads=8, adm_in_channels=None,
                    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                    use_linear_in_transformer=False, context_dim=context_dim or 768)
    return dict(common, num_res_blocks=[2] * 3, channel_mult=[1, 2, 4], num_head_channels=64,
                transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True,
                context_dim=context_dim or 2048, adm_in_channels=2816, num_classes="sequential")


def meta_unet(base: str = "SD1.5") -> UNetModel:
    """A full-size host UNet without memory: for placement checks."""
    with torch.device("meta"):
        return UNetModel(**unet_config(base), operations=comfy.ops.disable_weight_init, device="meta")


def tiny_sd15_patcher(seed: int = 0):
    """A ModelPatcher around a small SD1.5-shaped model (widths 32/64/128, context 32) with random weights."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher

    config = comfy.supported_models.SD15(unet_config(model_channels=32, context_dim=32))
    torch.manual_seed(seed)
    model = comfy.model_base.BaseModel(config, device="cpu")
    for name, p in model.diffusion_model.named_parameters():  # the host's layers skip weight init
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
        else:  # 1-D: norm scales (around 1) and biases (around 0)
            torch.nn.init.normal_(p, mean=1.0 if name.endswith("weight") else 0.0, std=0.01)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_motion_config(**overrides):
    from adm.motion_modules import MotionModuleConfig

    fields = dict(family="AnimateDiff v2", base="SD1.5", down=((32, 32), (64, 64), (128, 128), (128, 128)),
                  mid=(128,), up=((128,) * 3, (128,) * 3, (64,) * 3, (32,) * 3), max_frames=32,
                  extra={"name": "tiny.safetensors"})
    fields.update(overrides)
    return MotionModuleConfig(**fields)


def tiny_motion_lora_file(motion, path):
    """A v2 camera-LoRA-layout file (rank 4 on every attention projection) for ``motion``'s module, at ``path``."""
    from safetensors.torch import save_file
    g, sd = torch.Generator().manual_seed(0), {}
    for key, weight in motion.model.state_dict().items():
        if ".attention_blocks." in key and key.endswith(("to_q.weight", "to_v.weight", "to_out.0.weight")):
            stem, proj = (key[: -len(".to_out.0.weight")], "to_out") if "to_out" in key else key.rsplit(".", 2)[:2]
            sd[f"{stem}.processor.{proj}_lora.down.weight"] = torch.randn(4, weight.shape[1], generator=g) * 0.3
            sd[f"{stem}.processor.{proj}_lora.up.weight"] = torch.randn(weight.shape[0], 4, generator=g) * 0.3
    save_file(sd, str(path))
    return path


def tiny_motion_patcher(config=None, seed: int = 1):
    """A ModelPatcher around a tiny motion module with non-zero output projections (as a trained one has)."""
    import comfy.model_management
    import comfy.model_patcher
    from adm.motion_modules import MotionModule

    torch.manual_seed(seed)
    module = MotionModule(config or tiny_motion_config()).eval().requires_grad_(False)
    for m in module.in_unet_order():
        torch.nn.init.normal_(m.temporal_transformer.proj_out.weight, std=0.2)
    return comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())

"""One temporal block against diffusers' AnimateDiffTransformer3D, and our per-frame norm against a direct one."""
import pytest
import torch
import torch.nn.functional as F

from adm.motion_modules import VanillaTemporalModule, sdpa_attention
from adm.motion_modules.diffusers_format import module_to_diffusers

diffusers_motion = pytest.importorskip("diffusers.models.unets.unet_motion_model")

pytestmark = pytest.mark.parity

MAX_LEN = 32
BATCH, SIZE = 2, 4  # two clips, 4x4 latents


def random_module(channels: int, seed: int) -> VanillaTemporalModule:
    torch.manual_seed(seed)
    module = VanillaTemporalModule(channels, heads=8, max_len=MAX_LEN).eval().requires_grad_(False)
    for name, p in module.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=channels ** -0.5)
        elif name.endswith("weight"):  # norms: around 1, so the statistics matter
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            torch.nn.init.normal_(p, std=0.1)
    return module


def reference(module: VanillaTemporalModule):
    """diffusers' module exactly as its MotionAdapter builds it, holding our weights (strict load)."""
    channels = module.channels
    ref = diffusers_motion.MotionModules(in_channels=channels, layers_per_block=1, transformer_layers_per_block=1,
                                         num_attention_heads=8, max_seq_length=MAX_LEN).motion_modules[0]
    ref.load_state_dict(module_to_diffusers(module.state_dict(), MAX_LEN), strict=True)
    return ref.eval().requires_grad_(False)


def float_tolerance(reference_output: torch.Tensor) -> float:
    """float32 rounding: 16 ulp of the output's magnitude. The sums run in another order than diffusers' (fused
    q/k/v, 1x1-convolution matmuls on the CPU), so results agree to rounding, not bit for bit."""
    return 16 * torch.finfo(torch.float32).eps * max(1.0, reference_output.abs().max().item())


def clips(frames: int, channels: int, seed: int = 0) -> torch.Tensor:
    """(b f) c h w with per-frame offsets and scales, so per-frame and per-clip statistics differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, frames, channels, SIZE, SIZE, generator=g)
    scale = 1 + torch.arange(frames).view(1, frames, 1, 1, 1) * 0.5
    shift = torch.linspace(-2, 2, frames).view(1, frames, 1, 1, 1)
    return (x * scale + shift).reshape(BATCH * frames, channels, SIZE, SIZE)


@pytest.mark.parametrize("channels", [64, 320])
@pytest.mark.parametrize("frames", [1, 8, 16, 24])
def test_block_matches_diffusers_with_norm_across_frames(channels, frames):
    module = random_module(channels, seed=channels + frames)
    ref = reference(module)
    x = clips(frames, channels)
    ours = module(x.clone(), frames, sdpa_attention, norm_across_frames=True)
    theirs = ref(x.clone(), num_frames=frames)
    err = (ours - theirs).abs().max().item()
    print(f"temporal block C={channels} F={frames}: max abs err {err:.3e} (output max {theirs.abs().max():.2f})")
    assert err <= float_tolerance(theirs)
    assert not torch.allclose(ours, x, atol=1e-2)  # the block did something


class PerFrameGroupNorm(torch.nn.Module):
    """diffusers' GroupNorm, but applied to each frame of the 5-D (b, c, f, h, w) input on its own."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        n = self.norm
        frames = [F.group_norm(x[:, :, i], n.num_groups, n.weight, n.bias, n.eps) for i in range(x.shape[2])]
        return torch.stack(frames, dim=2)


@pytest.mark.parametrize("frames", [1, 16])
def test_default_norm_is_per_frame_and_differs_from_across_frames(frames):
    channels = 64
    module = random_module(channels, seed=7)
    ref = reference(module)
    ref.norm = PerFrameGroupNorm(ref.norm)
    assert module.temporal_transformer.norm.eps == 1e-6
    x = clips(frames, channels)
    default = module(x.clone(), frames)  # the default: per frame, as the original SD1.5 code
    per_frame = ref(x.clone(), num_frames=frames)
    across = module(x.clone(), frames, norm_across_frames=True)
    err = (default - per_frame).abs().max().item()
    gap = (default - across).abs().max().item()
    print(f"per-frame norm F={frames}: max abs err {err:.3e}; per-frame vs across-frames {gap:.3e}")
    assert err <= float_tolerance(per_frame)
    if frames == 1:
        assert gap <= float_tolerance(across)  # one frame: both modes normalise over the same numbers
    else:
        assert gap > 1e-2  # frames with different statistics: the two modes really differ

"""One SparseCtrl ControlNet call against diffusers' SparseControlNetModel holding the same weights, converted
from the published layout by diffusers' own single-file conversion (rgb and scribble, fp32)."""
import pytest
import torch

from adm.motion_modules import sparse_ctrl
from sparse_ctrl_files import FULL, RGB, SCRIBBLE, config, random_model

controlnet_sparsectrl = pytest.importorskip("diffusers.models.controlnets.controlnet_sparsectrl")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

pytestmark = pytest.mark.parity

FRAMES, LATENT = 4, 8


def reference(cfg, sd=None):
    """diffusers' model for ``cfg``; with ``sd`` (published names) it holds those weights."""
    kwargs = dict(block_out_channels=cfg.channels, cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.heads,
                  motion_num_attention_heads=cfg.heads, motion_max_seq_length=cfg.max_frames,
                  conditioning_channels=cfg.condition_channels,
                  use_simplified_condition_embedding=cfg.kind == RGB,
                  conditioning_embedding_out_channels=cfg.embedding_channels)
    ref = controlnet_sparsectrl.SparseControlNetModel(**kwargs)
    if sd is not None:
        converted = single_file_utils.convert_animatediff_checkpoint_to_diffusers(dict(sd))
        missing, unexpected = ref.load_state_dict(converted, strict=False)
        assert not unexpected, unexpected
        assert all(k.endswith("pos_embed.pe") for k in missing), missing  # the sinusoid, regenerated
    return ref.eval().requires_grad_(False)


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = LATENT if cfg.kind == RGB else LATENT * 8
    condition = torch.randn(FRAMES, cfg.condition_channels, size, size, generator=g)
    mask = torch.zeros(FRAMES, 1, size, size)
    mask[[0, 2]] = 1  # keyframes 0 and 2; the others hold no condition
    condition = condition * mask
    context = torch.randn(1, 7, cfg.context_dim, generator=g)
    return condition, mask, context


@pytest.mark.parametrize("kind", [RGB, SCRIBBLE])
def test_one_controlnet_call_matches_diffusers(kind):
    cfg = config(kind)
    ours = random_model(cfg, seed=1)
    ref = reference(cfg, ours.state_dict())
    condition, mask, context = inputs(cfg)
    timestep = torch.tensor(321.0)
    down, mid = ours(torch.cat([condition, mask], 1), timestep, context.expand(FRAMES, -1, -1), FRAMES,
                     norm_across_frames=True)  # diffusers normalises the motion modules' input over all frames
    five_d = lambda t: t.unsqueeze(0).transpose(1, 2)  # (f) c h w -> 1 c f h w
    sample = torch.randn(1, 4, FRAMES, LATENT, LATENT)  # ignored by both: the noisy input is set to zero
    ref_down, ref_mid = ref(sample, timestep, encoder_hidden_states=context.repeat_interleave(FRAMES, 0),
                            controlnet_cond=five_d(condition), conditioning_mask=five_d(mask), return_dict=False)
    assert len(down) == len(ref_down) == 12
    for i, (a, b) in enumerate([*zip(down, ref_down), (mid, ref_mid)]):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        tolerance = 1e-5 * max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= tolerance, (i, (a - b).abs().max().item(), tolerance)
    assert mid.abs().max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("kind", [RGB, SCRIBBLE])
def test_full_size_keys_and_shapes_are_the_published_ones(kind):
    """At SD1.5 size, every tensor ours holds maps, by diffusers' conversion of the original files, onto exactly
    diffusers' tensor of the same shape, and back: the published layout, nothing missing or extra."""
    cfg = config(kind, **FULL)
    with torch.device("meta"):
        ours = sparse_ctrl.SparseCtrlModel(cfg).state_dict()
        ref = reference(cfg).state_dict()
    converted = single_file_utils.convert_animatediff_checkpoint_to_diffusers(dict(ours))
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
           {k: tuple(v.shape) for k, v in ref.items() if not k.endswith("pos_embed.pe")}
    marker = "controlnet_cond_embedding.weight" if kind == RGB else "controlnet_cond_embedding.conv_in.weight"
    assert tuple(ours[marker].shape) == ((320, 5, 3, 3) if kind == RGB else (16, 4, 3, 3))  # formats.md §2.7
    assert sparse_ctrl.detect(ours, "x.ckpt") == sparse_ctrl.SparseCtrlConfig(**{**cfg.__dict__, "name": "x.ckpt"})

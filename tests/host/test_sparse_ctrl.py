"""SparseCtrl through the host: loading the published layouts, the Apply node's keyframes, a keyframe at frame k
acting on frame k, context windows, chaining with another ControlNet, and the v3 domain adapter as a stock LoRA."""
import logging

import pytest
import torch

import comfy.sample

from adm.model_patcher import sparse_ctrl as patcher
from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
from adm.motion_modules import MotionModuleError, detect as detect_motion_module
from adm.motion_modules.sparse_ctrl import RGB, SCRIBBLE, SparseCtrlError, load_sparse_ctrl
from adm.nodes.context import ContextWindows
from adm.nodes.sparse_ctrl import ApplySparseCtrl
from sparse_ctrl_files import config, random_model, save, state_dict
from unets import tiny_motion_config, tiny_motion_patcher, tiny_sd15_patcher

LATENT = 8
PLAIN = MotionOptions(schedule="use existing")


def control_from(model):
    return patcher.SparseCtrlControl(model, load_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def animated():
    return apply_motion_module(tiny_sd15_patcher(), tiny_motion_patcher(tiny_motion_config(max_frames=16)), PLAIN)


@pytest.fixture(scope="module")
def rgb():
    return control_from(random_model(config(RGB), seed=2, zero_scale=0.05))


def conds(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 32, generator=g), {}]], [[torch.randn(1, 77, 32, generator=g), {}]]


def sample(model, frames, control=None, hint=None, strength=1.0, steps=2, seed=3, positive_negative=None,
           size=LATENT, cfg=5.0):
    noise = torch.randn(frames, 4, size, size, generator=torch.Generator().manual_seed(seed))
    positive, negative = positive_negative or conds()
    if control is not None:
        positive, negative = patcher.apply_sparse_ctrl(positive, negative, control, hint, strength, 0.0, 1.0)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative,
                               torch.zeros_like(noise), seed=seed, disable_pbar=True)


def latent_keyframes(indices, frames, seed=7, size=LATENT):
    condition = torch.randn(len(indices), 4, size, size, generator=torch.Generator().manual_seed(seed))
    return patcher.keyframe_hint(condition, indices, frames)


def per_frame(a, b):
    return (a - b).flatten(1).abs().mean(dim=1)


# --- files ---

@pytest.mark.parametrize("kind", [RGB, SCRIBBLE])
@pytest.mark.parametrize("layout", ["flat.ckpt", "controlnet.ckpt", "file.safetensors"])
def test_loads_the_published_layouts_and_tells_rgb_from_scribble(tmp_path, kind, layout):
    sd = state_dict(config(kind), seed=4)
    path = tmp_path / f"v3_sd15_sparsectrl_{kind}_{layout}"
    save(path, sd, wrap=layout.split(".")[0])
    model = load_sparse_ctrl(path)
    assert model.config.kind == kind and model.config.channels == (32, 64, 128, 128)
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_refuses_other_files_with_what_they_are(tmp_path):
    motion = tmp_path / "mm.ckpt"
    torch.save(tiny_motion_patcher().model.state_dict(), motion)
    with pytest.raises(SparseCtrlError, match="not a SparseCtrl model"):
        load_sparse_ctrl(motion)
    controlnet = tmp_path / "control_sd15_canny.safetensors"
    save(controlnet, {"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3), "zero_convs.0.0.weight": torch.zeros(1)})
    with pytest.raises(SparseCtrlError, match="stock Load ControlNet Model"):
        load_sparse_ctrl(controlnet)
    damaged = state_dict(config(RGB))
    damaged["down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(32, 32, 3)
    save(tmp_path / "damaged.safetensors", damaged)
    with pytest.raises(SparseCtrlError, match="damaged"):
        load_sparse_ctrl(tmp_path / "damaged.safetensors")
    nan = state_dict(config(RGB))
    nan["conv_in.bias"][0] = float("nan")
    save(tmp_path / "nan.safetensors", nan)
    with pytest.raises(MotionModuleError, match="NaN"):
        load_sparse_ctrl(tmp_path / "nan.safetensors")
    # ... and Load Motion Module points SparseCtrl files here
    with pytest.raises(MotionModuleError, match="Load SparseCtrl"):
        detect_motion_module(state_dict(config(RGB)), "v3_sd15_sparsectrl_rgb.ckpt")


# --- the Apply node ---

@pytest.mark.parametrize("keyframes, count, frames, message", [
    ("0, 8, 15", 2, 16, "3 frame"), ("0, 16", 2, 16, "outside"), ("-1", 1, 16, "outside"),
    ("0, 0", 2, 16, "twice"), ("zero", 1, 16, "frame indices"), ("", 1, 16, "0 frame")])
def test_keyframes_are_checked(keyframes, count, frames, message):
    with pytest.raises(ValueError, match=message):
        patcher.parse_keyframes(keyframes, count, frames)


def test_the_node_builds_one_condition_and_mask_per_frame(rgb):
    scribble = control_from(random_model(config(SCRIBBLE), seed=2))
    images = torch.rand(2, 32, 32, 3)
    positive, negative = conds()
    out_pos, out_neg = ApplySparseCtrl().apply(positive, negative, scribble, images, "1, 3", 5, 1.0, 0.0, 1.0)
    hint = out_pos[0][1]["control"].cond_hint_original
    assert hint.shape == (5, 4, 32, 32)
    assert hint[:, -1, 0, 0].tolist() == [0, 1, 0, 1, 0]
    assert hint[[0, 2, 4]].abs().sum() == 0 and torch.equal(hint[3, :3], images[1].movedim(-1, 0))
    assert out_neg[0][1]["control"] is not None and "control" not in positive[0][1]  # inputs unchanged
    with pytest.raises(ValueError, match="VAE"):
        ApplySparseCtrl().apply(positive, negative, rgb, images, "1, 3", 5, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        ApplySparseCtrl().apply(positive, negative, scribble, images * float("nan"), "1, 3", 5, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="start_percent"):
        ApplySparseCtrl().apply(positive, negative, scribble, images, "1, 3", 5, 1.0, 0.8, 0.2)


# --- effect ---

def residuals_per_frame(model, hint, frames, base_hint):
    """Mean |change| per frame over all of the ControlNet's residuals, hint against base_hint."""
    context = torch.randn(frames, 7, 32, generator=torch.Generator().manual_seed(0))
    (down, mid), (down0, mid0) = (model(h, torch.tensor(500.0), context, frames) for h in (hint, base_hint))
    return torch.stack([per_frame(a, b) for a, b in zip([*down, mid], [*down0, mid0])]).mean(0)


def test_a_keyframe_at_k_changes_the_residuals_of_frame_k_most(rgb):
    """Against the same SparseCtrl given no keyframe (all frames masked out): frame k's residuals change most,
    every other frame's by less than half as much (they see the keyframe only through the motion modules)."""
    frames = 8
    for k in (0, 5):
        changed = residuals_per_frame(rgb.control_model, latent_keyframes([k], frames), frames,
                                      latent_keyframes([], frames))
        others = [i for i in range(frames) if i != k]
        assert torch.all(changed[others] < 0.5 * changed[k]), (k, changed)
        assert torch.all(changed[others] > 0), (k, changed)  # ... and they do see it


def test_a_keyframe_at_k_moves_the_output_of_frame_k_most(animated, rgb):
    """The sampled clip (1 euler step), keyframe at k against no keyframe, and against another image at k."""
    frames, k = 6, 4
    base = sample(animated, frames, rgb, latent_keyframes([], frames), steps=1)
    first = sample(animated, frames, rgb, latent_keyframes([k], frames, seed=1), steps=1)
    changed = per_frame(first, base)
    print("keyframe 4 moved the frames by " + ", ".join(f"{v:.3f}" for v in changed.tolist()))
    assert int(changed.argmax()) == k and changed[0] < changed[k], changed
    other_image = per_frame(sample(animated, frames, rgb, latent_keyframes([k], frames, seed=2), steps=1), first)
    assert int(other_image.argmax()) == k, other_image


def test_strength_zero_and_a_late_start_leave_the_clip_unchanged(animated, rgb):
    frames = 4
    base = sample(animated, frames, steps=1)
    hint = latent_keyframes([1], frames)
    assert torch.equal(sample(animated, frames, rgb, hint, strength=0.0, steps=1), base)
    positive, negative = patcher.apply_sparse_ctrl(*conds(), rgb, hint, 1.0, 0.99, 1.0)
    assert torch.equal(sample(animated, frames, positive_negative=(positive, negative), steps=1), base)


def test_frames_must_match_the_clip(animated, rgb):
    with pytest.raises(ValueError, match="frames"):
        sample(animated, 6, rgb, latent_keyframes([0], 5), steps=1)


# --- context windows ---

def test_each_window_gets_its_own_frames_conditions_and_mask(animated, rgb, monkeypatch):
    """48 frames in windows of 16 (overlap 4: 0-15, 12-27, 24-39, 32-47), keyframes 0, 20 and 47, 4x4 latents:
    every ControlNet call sees the conditions and mask of exactly its window's frames, so the window 24-39, which
    holds no keyframe, samples frames 28-31 (in no other window) exactly as without keyframes, while frame 20
    moves. (Fed the clip's first frames' hints instead, that window would get keyframe 0 at its frame 24.)"""
    frames, keys, size = 48, [0, 20, 47], 4
    hint = latent_keyframes(keys, frames, size=size)
    seen = []
    original = patcher.SparseCtrlControl.get_control

    def recording(self, x_noisy, t, cond, batched_number, transformer_options):
        window = list(transformer_options["context_window"].index_list)
        seen.append((window, torch.equal(self.cond_hint_original, hint[window])))
        return original(self, x_noisy, t, cond, batched_number, transformer_options)

    monkeypatch.setattr(patcher.SparseCtrlControl, "get_control", recording)
    windowed = ContextWindows().apply(animated, 16, 4, "standard_static", "pyramid", False)[0]
    out = sample(windowed, frames, rgb, hint, steps=1, size=size, cfg=1.0)
    windows = [tuple(w) for w, _ in seen]
    assert all(aligned for _, aligned in seen) and len(set(windows)) == 4, windows
    assert tuple(range(24, 40)) in windows
    base = sample(windowed, frames, rgb, latent_keyframes([], frames, size=size), steps=1, size=size, cfg=1.0)
    changed = per_frame(out, base)
    assert torch.all(changed[28:32] == 0) and changed[20] > 0, changed


# --- composition ---

def test_chains_with_another_controlnet(animated, rgb):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import nodes
    from unets import unet_config

    frames = 4
    settings = unet_config(model_channels=32, context_dim=32)
    settings.pop("out_channels")
    torch.manual_seed(0)
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **settings)
    for p in net.parameters():  # the host's layers skip weight init
        torch.nn.init.normal_(p, std=0.05)
    other = comfy.controlnet.ControlNet(net.eval().requires_grad_(False), load_device=torch.device("cpu"))
    images = torch.rand(frames, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(0))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(*conds(), other, images, 1.0, 0.0, 1.0)
    hint = latent_keyframes([2], frames)
    both = patcher.apply_sparse_ctrl(positive, negative, rgb, hint, 1.0, 0.0, 1.0)
    chained = both[0][0][1]["control"]
    assert chained.previous_controlnet is positive[0][1]["control"]
    assert len(chained.get_models()) == 2  # both loaded by the host
    only_other = sample(animated, frames, positive_negative=(positive, negative), steps=1, cfg=1.0)
    only_sparse = sample(animated, frames, rgb, hint, steps=1, cfg=1.0)
    together = sample(animated, frames, positive_negative=both, steps=1, cfg=1.0)
    assert per_frame(together, only_other).min() > 0 and per_frame(together, only_sparse).min() > 0


# --- the v3 domain adapter ---

def adapter_lora(model, rank=4):
    """A LoRA in v3_sd15_adapter.ckpt's layout (formats.md §2.6) for every spatial attention of ``model``."""
    import comfy.utils

    unet = model.model.diffusion_model
    diffusers_keys = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    sd = {}
    g = torch.Generator().manual_seed(0)
    for diffusers_key, comfy_key in diffusers_keys.items():
        if ".attn" not in diffusers_key or not diffusers_key.endswith(("to_q.weight", "to_k.weight", "to_v.weight",
                                                                         "to_out.0.weight")):
            continue
        weight = unet.get_parameter(comfy_key)
        name = diffusers_key[:-len(".weight")].replace(".to_", ".processor.to_").removesuffix(".0")
        sd[f"{name}_lora.down.weight"] = torch.randn(rank, weight.shape[1], generator=g) * 0.1
        sd[f"{name}_lora.up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * 0.1
    sd["animatediff_config"] = torch.zeros(0)  # stands in for the dummy entry (a tensor: safetensors holds nothing else)
    return sd


def test_the_domain_adapter_loads_through_the_stock_lora_loader(tmp_path, monkeypatch, caplog):
    import folder_paths
    import nodes

    model = tiny_sd15_patcher()
    sd = adapter_lora(model)
    save(tmp_path / "v3_sd15_adapter.safetensors", sd)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    with caplog.at_level(logging.WARNING):
        patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "v3_sd15_adapter.safetensors", 0.8)[0]
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not_loaded == ["lora key not loaded: animatediff_config"], not_loaded
    pairs = (len(sd) - 1) // 2
    assert pairs == 16 * 2 * 4 and len(patched.patches) == pairs  # 16 transformers (mid included) x 2 attns x q/k/v/out
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    before = model.model.diffusion_model.get_parameter(key[len("diffusion_model."):]).clone()
    down = sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight"]
    up = sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight"]
    patched.patch_model()
    try:
        after = patched.model.diffusion_model.get_parameter(key[len("diffusion_model."):]).clone()
    finally:
        patched.unpatch_model()
    torch.testing.assert_close(after, before + 0.8 * up @ down)

"""CameraCtrl on the real host: synthetic files in both published layouts (keys spelled out from the facts in
motion_modules/camera_ctrl.py), refusals, and sampling with a tiny SD1.5 UNet and AnimateDiff v3 module: zero
strength is plain AnimateDiff bit for bit, poses steer every frame, and inside context windows a window's frames
come out as the same frames sampled alone."""
import math

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management
import comfy.sample

from adm.model_patcher import camera_ctrl as host_camera_ctrl
from adm.model_patcher.camera_ctrl import apply_camera_ctrl, load_camera_ctrl_patcher
from adm.model_patcher.motion_patcher import MotionOptions, apply_motion_module
from adm.motion_modules.camera_ctrl import CameraCtrl, CameraCtrlConfig, CameraCtrlError, check_fits, parse_poses
from adm.motion_modules.formats import MotionModuleError, load_motion_module
from adm.nodes.camera_ctrl import ApplyCameraCtrlPoses
from adm.nodes.context import ContextWindows
from unets import tiny_motion_config, tiny_motion_patcher, tiny_sd15_patcher

PLAIN = MotionOptions(schedule="use existing")
SIZE = 8  # latent pixels (64 image pixels: the pose encoder halves 8 -> 4 -> 2 -> 1)
WIDTHS = (32, 64, 128, 128)
V3 = tiny_motion_config(family="AnimateDiff v3", mid=(), max_frames=32)
ATTENTION = "temporal_transformer.transformer_blocks.0.attention_blocks.0"


def merge_paths(config=V3) -> dict[str, int]:
    """Every motion module of the down and up blocks, with its width (CameraCtrl's decoder_add_posecond)."""
    return {f"{kind}.{i}.motion_modules.{j}.{ATTENTION}": width
            for kind, blocks in (("down_blocks", config.down), ("up_blocks", config.up))
            for i, block in enumerate(blocks) for j, width in enumerate(block)}


def published_keys() -> dict[str, tuple]:
    """The key layout of a CameraCtrl file as the facts describe it, for the tiny widths."""
    keys = {"encoder_conv_in.weight": (32, 384, 3, 3), "encoder_conv_in.bias": (32,)}
    for level, width in enumerate(WIDTHS):
        for unit in range(2):
            conv = f"encoder_down_conv_blocks.{level}.{unit}"
            keys.update({f"{conv}.block1.weight": (width, width, 3, 3), f"{conv}.block1.bias": (width,),
                         f"{conv}.block2.weight": (width, width, 1, 1), f"{conv}.block2.bias": (width,)})
            if unit == 0 and level and WIDTHS[level - 1] != width:
                keys.update({f"{conv}.in_conv.weight": (width, WIDTHS[level - 1], 1, 1), f"{conv}.in_conv.bias": (width,)})
            att = f"encoder_down_attention_blocks.{level}.{unit}"
            keys.update({f"{att}.attention_blocks.0.to_{p}.weight": (width, width) for p in "qkv"})
            keys.update({f"{att}.attention_blocks.0.to_out.0.weight": (width, width),
                         f"{att}.attention_blocks.0.to_out.0.bias": (width,),
                         f"{att}.attention_blocks.0.pos_encoder.pe": (1, 16, width),
                         f"{att}.norms.0.weight": (width,), f"{att}.norms.0.bias": (width,),
                         f"{att}.ff.net.0.proj.weight": (8 * width, width), f"{att}.ff.net.0.proj.bias": (8 * width,),
                         f"{att}.ff.net.2.weight": (width, 4 * width), f"{att}.ff.net.2.bias": (width,),
                         f"{att}.ff_norm.weight": (width,), f"{att}.ff_norm.bias": (width,)})
    for path, width in merge_paths().items():
        keys.update({f"{path}.processor.qkv_merge.weight": (width, width), f"{path}.processor.qkv_merge.bias": (width,)})
    return keys


def camera_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """Random weights in the published layout; qkv_merge non-zero, as after training (it starts at zero)."""
    torch.manual_seed(seed)
    model = CameraCtrl(CameraCtrlConfig(WIDTHS, merges=merge_paths()))
    for _, merge in model.merges():
        torch.nn.init.normal_(merge.weight, std=0.3)
        torch.nn.init.normal_(merge.bias, std=0.3)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cameractrl")
    sd = camera_state_dict()
    save_file(sd, str(folder / "CameraCtrl_pruned.safetensors"))
    encoder = {k: v for k, v in sd.items() if k.startswith("encoder_")}
    merges = {k: v for k, v in sd.items() if "qkv_merge" in k}
    torch.save({"epoch": 3, "global_step": 25000, "pose_encoder_state_dict": encoder,
                "attention_processor_state_dict": merges,
                "optimizer_state_dict": {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(3)}},
                                         "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}},
               folder / "CameraCtrl.ckpt")
    return folder, sd


@pytest.fixture(scope="module")
def camera(files):
    return load_camera_ctrl_patcher(files[0] / "CameraCtrl_pruned.safetensors")


@pytest.fixture(scope="module")
def motion():
    return apply_motion_module(tiny_sd15_patcher(), tiny_motion_patcher(V3), PLAIN)


def path_text(frames: int, pan: float = 0.0, turn: float = 0.0, start: int = 0) -> str:
    """RealEstate10K lines for a camera that moves sideways by ``pan`` and turns by ``turn`` radians per frame."""
    lines = ["https://www.youtube.com/watch?v=test"]
    for k in range(start, start + frames):
        c, s = math.cos(turn * k), math.sin(turn * k)
        matrix = (c, 0, s, pan * k, 0, 1, 0, 0, -s, 0, c, 0.1 * k)
        lines.append(" ".join(f"{v:.9f}" for v in (k, 0.474812461, 0.844111024, 0.5, 0.5, 0, 0, *matrix)))
    return "\n".join(lines)


def sample(model, frames=8, steps=1, seed=3, noise=None):
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 77, 32, generator=g), {}]]
    uncond = [[torch.randn(1, 77, 32, generator=g), {}]]
    noise = torch.randn(frames, 4, SIZE, SIZE, generator=g) if noise is None else noise
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", cond, uncond, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


def windows(model, length, overlap, per_batch=1):
    return ContextWindows().apply(model, length, overlap, "standard_static", "pyramid", False,
                                  windows_per_batch=per_batch)[0]


def attention_blocks(model):
    module = model.get_additional_models_with_key("animatediff_motion")[0].model
    return [module.get_submodule(f"{path}") for path in merge_paths()]


# ----------------------------------------------------------------------------------------------------- files

def test_the_model_has_the_published_keys_and_both_layouts_load_the_same(files):
    folder, sd = files
    assert {k: tuple(v.shape) for k, v in sd.items()} == published_keys()
    flat = load_camera_ctrl_patcher(folder / "CameraCtrl_pruned.safetensors").model.state_dict()
    nested = load_camera_ctrl_patcher(folder / "CameraCtrl.ckpt").model.state_dict()
    assert flat.keys() == sd.keys() == nested.keys()
    assert all(torch.equal(flat[k].float(), sd[k]) and torch.equal(nested[k].float(), sd[k]) for k in sd)
    config = load_camera_ctrl_patcher(folder / "CameraCtrl.ckpt").model.config
    assert (config.channels, config.units, config.downscale, config.kernel, config.max_frames) == (WIDTHS, 2, 8, 1, 16)


def test_load_motion_module_sends_a_cameractrl_file_to_its_loader(files):
    with pytest.raises(MotionModuleError, match="CameraCtrl model.*Load CameraCtrl"):
        load_motion_module(files[0] / "CameraCtrl_pruned.safetensors")


def edited(sd, drop=(), change=None):
    out = {k: v for k, v in sd.items() if not any(k.startswith(p) or p in k for p in drop)}
    out.update(change or {})
    return out


@pytest.mark.parametrize("make, message", [
    (lambda sd: {k: v for k, v in tiny_motion_patcher(V3).model.state_dict().items()},
     r"an AnimateDiff motion module \(load it with Load Motion Module"),
    (lambda sd: {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}, "Stable Diffusion checkpoint"),
    (lambda sd: edited(sd, drop=("qkv_merge",)), "has a pose encoder but no qkv_merge"),
    (lambda sd: edited(sd, drop=("encoder_",)), "has qkv_merge layers but no pose encoder"),
    (lambda sd: edited(sd, change={f"down_blocks.0.motion_modules.0.{ATTENTION}.processor.qkv_merge.weight": torch.zeros(64, 64)}),
     r"down_blocks\.0\.motion_modules\.0\..*qkv_merge is \[64, 64\], but its block's pose features are 32 wide"),
    (lambda sd: edited(sd, change={"down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.processor.qkv_merge.weight":
                                   torch.zeros(32, 32)}), "another video model .*Stable Video Diffusion"),
    (lambda sd: edited(sd, change={"encoder_conv_in.weight": torch.zeros(32, 100, 3, 3)}), "takes 100 channels"),
    (lambda sd: edited(sd, drop=("encoder_down_conv_blocks.2.1.block2.weight",)), r"missing: \['encoder_down_conv_blocks\.2\.1\.block2"),
    (lambda sd: edited(sd, change={"encoder_down_conv_blocks.1.1.block1.weight": torch.full((64, 64, 3, 3), float("nan"))}), "NaN"),
], ids=["motion-module", "sd-checkpoint", "no-merges", "no-encoder", "merge-width", "svd-keys", "input-channels",
        "missing-key", "nan"])
def test_files_that_are_not_cameractrl_are_refused_by_name(files, tmp_path, make, message):
    path = tmp_path / "wrong.safetensors"
    save_file(make(files[1]), str(path))
    with pytest.raises(CameraCtrlError, match=message) as error:
        load_camera_ctrl_patcher(path)
    assert str(error.value).startswith("wrong.safetensors")


# -------------------------------------------------------------------------------------------------- sampling

def test_zero_strength_is_plain_animatediff_bit_for_bit_and_the_model_passed_in_is_untouched(motion, camera):
    plain = sample(motion)
    wrappers = {k: dict(v) for k, v in motion.wrappers.items()}
    out = sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, pan=0.3)), strength=0.0))
    assert torch.equal(out, plain)
    steered = sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, pan=0.3))))
    assert torch.isfinite(steered).all() and not torch.equal(steered, plain)
    assert {k: dict(v) for k, v in motion.wrappers.items()} == wrappers and not motion.injections.get(host_camera_ctrl.KEY)
    assert torch.equal(sample(motion), plain)  # the camera's forward is gone once the other clone is patched
    comfy.model_management.unload_all_models()
    assert all("forward" not in block.__dict__ for block in attention_blocks(motion))


def test_different_poses_change_every_frame(motion, camera):
    a = sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, pan=0.4))))
    b = sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, turn=0.2))))
    assert all(not torch.equal(a[f], b[f]) for f in range(8))
    again = sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, pan=0.4))))
    assert torch.equal(a, again)


def test_a_second_apply_replaces_the_first(motion, camera):
    twice = apply_camera_ctrl(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, pan=0.4))), camera,
                              parse_poses(path_text(8, turn=0.2)))
    once = apply_camera_ctrl(motion, camera, parse_poses(path_text(8, turn=0.2)))
    assert len(twice.injections[host_camera_ctrl.KEY]) == 1
    assert torch.equal(sample(twice), sample(once))


@pytest.mark.parametrize("per_batch", [1, 3], ids=["one-by-one", "windows-batched"])
def test_inside_context_windows_a_windows_frames_equal_the_same_frames_sampled_alone(motion, camera, per_batch):
    """Windows 0-7, 8-15, 16-23 (no overlap): each frame gets exactly its window's output, which must equal an
    8-frame clip of the same noise with the same frames' poses, sampled without windows."""
    text = path_text(24, pan=0.3, turn=0.05)
    noise = torch.randn(24, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    clip = sample(windows(apply_camera_ctrl(motion, camera, parse_poses(text)), 8, 0, per_batch), noise=noise)
    alone = sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, pan=0.3, turn=0.05, start=8))),
                   noise=noise[8:16])
    scale = alone.abs().max().item()  # the tiny random UNet's one-step results reach a few hundred
    # batched windows: the pose encoder's convolutions on 3 clips at once round differently (~5e-6 relative)
    torch.testing.assert_close(clip[8:16], alone, rtol=1e-5, atol=1e-5 * scale)
    misaligned = sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, pan=0.3, turn=0.05))),
                        noise=noise[8:16])
    assert (clip[8:16] - misaligned).abs().max() > 1e-3 * scale  # other frames' poses: visibly another result


def test_a_48_frame_clip_samples_in_context_windows_of_16(motion, camera):
    model = windows(apply_camera_ctrl(motion, camera, parse_poses(path_text(48, pan=0.1))), 16, 4)
    out = sample(model, frames=48)
    assert out.shape[0] == 48 and torch.isfinite(out).all()
    assert not torch.equal(out, sample(windows(motion, 16, 4), frames=48))


# -------------------------------------------------------------------------------------------------- refusals

def test_more_frames_than_the_pose_encoder_takes_ask_for_context_windows(motion, camera):
    with pytest.raises(CameraCtrlError, match="at most 16 frames at once.*Context Windows"):
        sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(20))), frames=20)


def test_a_size_the_pose_features_cannot_halve_is_refused(motion, camera):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(CameraCtrlError, match="multiples of 64 pixels"):
        sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(4))), noise=torch.randn(4, 4, 12, 12, generator=g))


@pytest.mark.parametrize("make, message", [
    (lambda motion, camera: apply_camera_ctrl(tiny_sd15_patcher(), camera, parse_poses(path_text(4))),
     "has no motion module.*Apply Motion Module"),
    (lambda motion, camera: apply_camera_ctrl(motion, camera, parse_poses(path_text(4)), strength=float("nan")),
     "strength must be a number"),
    (lambda motion, camera: apply_camera_ctrl(motion, camera, parse_poses(path_text(4)), pose_size=(0, 720)),
     "pose_width and pose_height"),
    (lambda motion, camera: apply_camera_ctrl(motion, motion, parse_poses(path_text(4))), "from Load CameraCtrl"),
    (lambda motion, camera: ApplyCameraCtrlPoses().apply(motion, camera, "../secret.txt", 1.0, 1280, 720),
     "not a .txt file inside ComfyUI's input folder"),
    (lambda motion, camera: ApplyCameraCtrlPoses().apply(motion, camera, "none (use pose_text)", 1.0, 1280, 720, " "),
     "no poses"),
], ids=["no-motion-module", "nan-strength", "zero-pose-width", "not-a-cameractrl", "file-outside",
        "no-poses"])
def test_refusals_name_the_problem_and_leave_the_model_alone(motion, camera, make, message):
    before = {k: dict(v) for k, v in motion.wrappers.items()}
    with pytest.raises(ValueError, match=message):
        make(motion, camera)
    assert {k: dict(v) for k, v in motion.wrappers.items()} == before


@pytest.mark.parametrize("motion_config, message", [
    (tiny_motion_config(family="AnimateDiff v3", mid=(), down=((32, 32), (64, 64), (96, 96), (96, 96)),
                        up=((96,) * 3, (96,) * 3, (64,) * 3, (32,) * 3)),
     r"at down_blocks\.2\.motion_modules\.0 \(128 channels\), but 'tiny.safetensors' \(AnimateDiff v3, SD1.5\) has 96 "
     r"channels there.*v3_sd15_mm\.ckpt"),
    (tiny_motion_config(family="AnimateDiff SDXL beta", base="SDXL", mid=(), down=((32, 32), (64, 64), (128, 128)),
                        up=((128,) * 3, (64,) * 3, (32,) * 3)),
     r"at down_blocks\.3\.motion_modules\.0 \(128 channels\), but .*SDXL\) has no module there"),
], ids=["other-widths", "sdxl-module"])
def test_a_motion_module_without_cameractrls_modules_is_refused(camera, motion_config, message):
    with pytest.raises(CameraCtrlError, match=message):
        check_fits(camera.model.config, motion_config)
    check_fits(camera.model.config, V3)  # the module it was made for


def test_the_node_reads_pose_text(motion, camera):
    model = ApplyCameraCtrlPoses().apply(motion, camera, "none (use pose_text)", 1.0, 1280, 720, path_text(8, pan=0.4))[0]
    assert torch.equal(sample(model), sample(apply_camera_ctrl(motion, camera, parse_poses(path_text(8, pan=0.4)))))

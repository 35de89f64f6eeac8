"""CameraCtrl against its own code (hehao13/CameraCtrl, main branch), run from a local copy of that repository:
the pose encoder (``CameraPoseEncoder``, weights moved across by their published key names, which must match
strictly), the attention with ``qkv_merge`` (``PoseAdaptorAttnProcessor`` on ``TemporalSelfAttention``) and the
Plücker embedding (``Camera``, ``get_relative_pose``, ``ray_condition`` of ``cameractrl/data/dataset.py``).

Nothing is copied: the reference is imported from the repository. Where it comes from: CAMERACTRL_REPO (a checkout,
or a bare git directory whose HEAD is read with ``git archive``), else the mirror the project's tooling fetches to
``<work>/.mirror/hehao13+CameraCtrl/repo``. Without either, or without diffusers, the tests skip.
"""
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from adm.motion_modules.camera_ctrl import (CameraCtrlConfig, CameraPoseEncoder, conditioned_attention, parse_poses,
                                            plucker_embedding)
from adm.motion_modules.temporal_transformer import VersatileAttention, sdpa_attention

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parents[2]
MIRROR = Path(os.environ.get("CAMERACTRL_REPO", ROOT.parent / ".mirror" / "hehao13+CameraCtrl" / "repo"))
WIDTHS = (32, 64, 128, 128)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The ``cameractrl`` package of the reference repository, importable."""
    pytest.importorskip("diffusers")
    pytest.importorskip("einops")
    if (MIRROR / "cameractrl").is_dir():
        source = MIRROR
    elif MIRROR.is_dir() and shutil.which("git") and shutil.which("tar"):
        source = tmp_path_factory.mktemp("cameractrl")
        archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "HEAD", "cameractrl"], capture_output=True)
        if archive.returncode:
            pytest.skip(f"cannot read the CameraCtrl repository at {MIRROR}: {archive.stderr.decode()[:200]}")
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    else:
        pytest.skip(f"no copy of hehao13/CameraCtrl at {MIRROR} (set CAMERACTRL_REPO to a checkout)")
    sys.path.insert(0, str(source))
    # dataset.py imports decord for its video reader at module level; the pose functions used here do not need it
    sys.modules.setdefault("decord", types.SimpleNamespace(VideoReader=None))
    try:
        from cameractrl.data import dataset
        from cameractrl.models import attention_processor, motion_module, pose_adaptor
    except ImportError as e:
        pytest.skip(f"the CameraCtrl reference does not import here ({e})")
    finally:
        sys.path.remove(str(source))
    return types.SimpleNamespace(dataset=dataset, motion_module=motion_module, pose_adaptor=pose_adaptor,
                                 attention_processor=attention_processor)


def reference_encoder(ref):
    """The published configuration (adv3_256_384_cameractrl_relora.yaml pose_encoder_kwargs) at tiny widths."""
    torch.manual_seed(0)
    return ref.pose_adaptor.CameraPoseEncoder(
        downscale_factor=8, channels=list(WIDTHS), nums_rb=2, cin=384, ksize=1, sk=True, use_conv=False,
        compression_factor=1, temporal_attention_nhead=8, attention_block_types=("Temporal_Self",),
        temporal_position_encoding=True, temporal_position_encoding_max_len=16).eval()


def test_pose_encoder_matches_the_reference(ref):
    theirs = reference_encoder(ref)
    ours = CameraPoseEncoder(CameraCtrlConfig(WIDTHS))
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same key names and shapes
    clips, frames = 2, 8
    plucker = torch.randn(clips, 6, frames, 64, 96, generator=torch.Generator().manual_seed(1))  # b c f h w
    with torch.no_grad():
        want = theirs(plucker)
        got = ours.encode(plucker.transpose(1, 2).reshape(clips * frames, 6, 64, 96), frames, sdpa_attention)
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunks", [1, 2], ids=["cond", "cond+uncond"])
def test_attention_with_qkv_merge_matches_the_reference(ref, chunks):
    channels, frames, tokens, scale = 64, 12, 10, 0.7
    torch.manual_seed(2)
    attn = ref.motion_module.TemporalSelfAttention(
        attention_mode="Temporal_Self", query_dim=channels, heads=8, dim_head=channels // 8, bias=False,
        cross_attention_dim=None, temporal_position_encoding=True, temporal_position_encoding_max_len=32).eval()
    processor = ref.attention_processor.PoseAdaptorAttnProcessor(
        hidden_size=channels, pose_feature_dim=channels, query_condition=True, key_value_condition=True, scale=scale)
    torch.nn.init.normal_(processor.qkv_merge.weight, std=0.2)  # zero at the start of training, not after
    torch.nn.init.normal_(processor.qkv_merge.bias, std=0.2)
    attn.set_processor(processor)
    ours = VersatileAttention(channels, 8, 32)
    state = attn.state_dict()
    # the processor's weights sit under the attention's path: the published "<attention>.processor.qkv_merge.*"
    assert [k for k in state if "processor" in k] == ["processor.qkv_merge.weight", "processor.qkv_merge.bias"]
    ours.load_state_dict({k: v for k, v in state.items() if "processor" not in k}, strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(chunks * tokens, frames, channels, generator=g)  # (b h w) f c, chunk-major
    pose = torch.randn(tokens, frames, channels, generator=g)         # one chunk's
    with torch.no_grad():
        want = attn(x, pose_feature=pose.repeat(chunks, 1, 1))  # the pipeline repeats the features for CFG
        got = conditioned_attention(ours, processor.qkv_merge, x.clone(), pose, scale, sdpa_attention)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_plucker_embedding_matches_the_reference(ref):
    lines = ["https://www.youtube.com/watch?v=x"]
    for k in range(16):  # 16 frames and a 24x40 image: no axis of size 3 (the reference's torch.cross(dim=None))
        a, t = 0.04 * k, (0.2 * k, -0.05 * k, 0.1 * k)
        c, s = torch.cos(torch.tensor(a)).item(), torch.sin(torch.tensor(a)).item()
        matrix = (c, 0, s, t[0], 0, 1, 0, t[1], -s, 0, c, t[2])
        lines.append(" ".join(f"{v:.9f}" for v in (k, 0.47 + 0.01 * k, 0.84, 0.5, 0.48, 0, 0, *matrix)))
    height, width = 24, 40
    entries = [[float(v) for v in line.split()] for line in lines[1:]]
    cameras = [ref.dataset.Camera(entry) for entry in entries]
    c2w = ref.dataset.RealEstate10KPose.get_relative_pose(types.SimpleNamespace(zero_t_first_frame=True), cameras)
    intrinsics = torch.tensor([[c.fx * width, c.fy * height, c.cx * width, c.cy * height] for c in cameras],
                              dtype=torch.float32)
    want = ref.dataset.ray_condition(intrinsics[None], torch.as_tensor(c2w)[None], height, width, "cpu")[0]  # f h w 6
    # the clip has the poses' aspect ratio, so no focal length is rescaled (inference.py's adjustment is a no-op)
    got = plucker_embedding(parse_poses("\n".join(lines)), height, width, pose_size=(width, height))
    torch.testing.assert_close(got.permute(0, 2, 3, 1), want, rtol=1e-4, atol=1e-5)

"""CameraCtrl poses: the RealEstate10K pose-file parser (also on hostile input) and the Plücker embedding,
checked against a per-pixel computation in plain Python floats (rigid inverse written out, no matrix inverse)."""
import math

import pytest
import torch

from adm.motion_modules.camera_ctrl import (MAX_POSE_FRAMES, CameraCtrlError, parse_poses, plucker_embedding,
                                            read_pose_file)

URL = "https://www.youtube.com/watch?v=QShWPZxTDoE"


def rotation(ax: float, ay: float, az: float) -> list[list[float]]:
    """Rz @ Ry @ Rx, as nested lists."""
    def mul(a, b):
        return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = [[1, 0, 0], [0, cx, -sx], [0, sx, cx]]
    ry = [[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]
    rz = [[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]
    return mul(rz, mul(ry, rx))


# (fx, fy, cx, cy, rotation angles, translation) of a world-to-camera pose per frame
CAMERAS = [(0.47, 0.84, 0.5, 0.5, (0.0, 0.1, 0.0), (0.7, -0.06, 0.2)),
           (0.47, 0.84, 0.52, 0.49, (0.05, 0.3, -0.1), (0.95, 0.2, -1.0)),
           (0.5, 0.8, 0.45, 0.55, (-0.2, 0.6, 0.15), (1.2, 0.1, -1.1))]


def pose_line(timestamp, fx, fy, cx, cy, angles, translation) -> str:
    r, t = rotation(*angles), translation
    matrix = [v for i in range(3) for v in (*r[i], t[i])]
    return " ".join(f"{v:.9f}" for v in (timestamp, fx, fy, cx, cy, 0.0, 0.0, *matrix))


def pose_text(cameras=CAMERAS, url=True) -> str:
    lines = [URL] if url else []
    return "\n".join(lines + [pose_line(158692025 + 266934 * i, *c) for i, c in enumerate(cameras)]) + "\n"


def test_parses_realestate10k_lines_skipping_the_url_line():
    poses = parse_poses(pose_text())
    assert len(poses) == 3
    fx, fy, cx, cy, angles, translation = CAMERAS[1]
    assert poses.intrinsics[1].tolist() == pytest.approx([fx, fy, cx, cy], abs=1e-9)
    r = rotation(*angles)
    torch.testing.assert_close(poses.world_to_camera[1, :3, :3], torch.tensor(r, dtype=torch.float64), rtol=0, atol=1e-8)
    assert poses.world_to_camera[1, :3, 3].tolist() == pytest.approx(list(translation), abs=1e-9)
    assert poses.world_to_camera[1, 3].tolist() == [0, 0, 0, 1]


def test_the_url_line_blank_lines_and_comments_are_optional():
    text = "# my path\n\n" + pose_text(url=False).replace("\n", "\n\n")
    a, b = parse_poses(text), parse_poses(pose_text())
    assert torch.equal(a.intrinsics, b.intrinsics) and torch.equal(a.world_to_camera, b.world_to_camera)


def test_frames_past_the_last_pose_hold_the_last_pose():
    poses = parse_poses(pose_text())
    picked = poses.at([2, 0, 7, 3])
    assert torch.equal(picked.world_to_camera, poses.world_to_camera[[2, 0, 2, 2]])


def test_a_pose_file_is_read_and_named_in_errors(tmp_path):
    good = tmp_path / "0bf152ef84195293.txt"
    good.write_text(pose_text())
    assert len(read_pose_file(good)) == 3
    bad = tmp_path / "broken.txt"
    bad.write_text(pose_text() + "1 2 3\n")
    with pytest.raises(CameraCtrlError, match=r"^broken\.txt, line 5: 3 values, but a pose line has 19"):
        read_pose_file(bad)
    binary = tmp_path / "picture.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 10)
    with pytest.raises(CameraCtrlError, match=r"picture\.txt: not a text file"):
        read_pose_file(binary)
    with pytest.raises(CameraCtrlError, match=r"missing\.txt: no such pose file"):
        read_pose_file(tmp_path / "missing.txt")


def replaced(index: int, value: str, line: int = 1) -> str:
    """pose_text with field ``index`` of pose line ``line`` (0-based among poses) replaced."""
    lines = pose_text().splitlines()
    fields = lines[1 + line].split()
    fields[index] = value
    lines[1 + line] = " ".join(fields)
    return "\n".join(lines)


@pytest.mark.parametrize("text, message", [
    (replaced(3, "abc"), r"line 3: 'abc' is not a number"),
    (replaced(9, "nan"), r"line 3: 'nan' is not a finite number"),
    (replaced(18, "-inf", 0), r"line 2: '-inf' is not a finite number"),
    (replaced(1, "0"), r"line 3: focal lengths fx=0"),
    (replaced(2, "-0.8"), r"line 3: focal lengths .* fy=-0.8"),
    (pose_line(0, 0.5, 0.5, 0.5, 0.5, (0, 0, 0), (0, 0, 0)).replace("1.000000000", "0.000000000"), "line 1: the 3x3 rotation part"),
    (pose_text() + "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20\n", r"line 5: 20 values"),
    ("", "no poses"),
    (URL + "\n\n# nothing\n", "no poses"),
], ids=["word", "nan", "inf", "zero-focal", "negative-focal", "singular-rotation", "too-many-values", "empty",
        "only-url"])
def test_bad_lines_are_refused_naming_the_source_and_line(text, message):
    with pytest.raises(CameraCtrlError, match=message) as error:
        parse_poses(text, "path.txt")
    assert str(error.value).startswith("path.txt")


def test_too_many_poses_are_refused_at_the_first_line_too_many():
    line = pose_line(0, *CAMERAS[0])
    with pytest.raises(CameraCtrlError, match=rf"line {MAX_POSE_FRAMES + 2}: more than {MAX_POSE_FRAMES} poses"):
        parse_poses(URL + "\n" + "\n".join([line] * (MAX_POSE_FRAMES + 5)), "long.txt")
    with pytest.raises(CameraCtrlError, match="not a CameraCtrl pose file"):
        parse_poses("1 " * 3_000_000, "huge")


def expected_plucker(cameras, height, width, pose_size):
    """Per pixel, in Python floats: intrinsics rescaled to the clip's aspect ratio, the pose relative to the first
    camera (w2c_0 @ c2w_k with c2w = [R^T | -R^T t]), ray d = R_rel @ normalise(...), origin t_rel, (o x d, d)."""
    out = torch.zeros(len(cameras), 6, height, width, dtype=torch.float64)
    r0, t0 = rotation(*cameras[0][4]), cameras[0][5]
    for f, (fx, fy, cx, cy, angles, t) in enumerate(cameras):
        pose_ratio = pose_size[0] / pose_size[1]
        if pose_ratio > width / height:
            fx_px, fy_px = fx * height * pose_ratio, fy * height
        else:
            fx_px, fy_px = fx * width, fy * width / pose_ratio
        r = rotation(*angles)
        rt = [[r[j][i] for j in range(3)] for i in range(3)]  # R^T
        rel_r = [[sum(r0[i][k] * rt[k][j] for k in range(3)) for j in range(3)] for i in range(3)]
        rt_t = [sum(rt[i][k] * t[k] for k in range(3)) for i in range(3)]
        rel_t = [t0[i] - sum(r0[i][k] * rt_t[k] for k in range(3)) for i in range(3)]
        for row in range(height):
            for col in range(width):
                ray = [(col + 0.5 - cx * width) / fx_px, (row + 0.5 - cy * height) / fy_px, 1.0]
                norm = math.sqrt(sum(v * v for v in ray))
                d = [sum(rel_r[i][k] * ray[k] for k in range(3)) / norm for i in range(3)]
                o = rel_t
                m = [o[1] * d[2] - o[2] * d[1], o[2] * d[0] - o[0] * d[2], o[0] * d[1] - o[1] * d[0]]
                out[f, :, row, col] = torch.tensor(m + d, dtype=torch.float64)
    return out


@pytest.mark.parametrize("height, width, pose_size", [(3, 5, (1280, 720)), (6, 2, (1280, 720)), (4, 4, (720, 1280))],
                         ids=["poses-wider", "clip-taller", "poses-taller"])
def test_plucker_embedding_matches_a_per_pixel_computation(height, width, pose_size):
    got = plucker_embedding(parse_poses(pose_text()), height, width, pose_size)
    assert got.shape == (3, 6, height, width) and got.dtype == torch.float32
    want = expected_plucker(CAMERAS, height, width, pose_size)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got[0, :3].abs().max() == 0  # the first camera sits at the origin: no moment
    torch.testing.assert_close(got[:, 3:].norm(dim=1), torch.ones(3, height, width))  # unit directions


def test_the_embedding_is_relative_to_the_first_pose_given():
    later = plucker_embedding(parse_poses(pose_text()).at([1, 2]), 4, 4)  # a clip that starts at frame 1
    torch.testing.assert_close(later.double(), expected_plucker(CAMERAS[1:], 4, 4, (1280, 720)), rtol=1e-5, atol=1e-5)
    # the clip's first camera sits at the origin: no moment, up to the rounding of inv(c2w_1) @ c2w_1 (4.7e-17
    # on some CPUs, exactly 0 on others)
    assert later[0, :3].abs().max() < 1e-6 and later[1, :3].abs().max() > 0.01

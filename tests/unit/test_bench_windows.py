"""The seam figures of headless/bench_windows.py: which frame pairs count as hand-overs between windows."""
import torch

from headless.bench_windows import seam_report

# window 16, overlap 4, 40 frames: the host's standard_static schedule. Hand-overs: pairs (11,12)..(15,16)
# and (23,24)..(27,28).
WINDOWS = [list(range(0, 16)), list(range(12, 28)), list(range(24, 40))]


def ramp(frames=40, step=0.5):
    return torch.arange(float(frames)).view(frames, 1, 1, 1) * step


def test_a_smooth_clip_has_no_seam():
    report = seam_report(ramp(), WINDOWS)
    assert report["inside_mad"] == report["seam_mad"] == report["worst_seam_mad"] == 0.5
    assert report["inside_pair_sd"] == 0 and report["hand_overs"] == 2


def test_a_jump_in_one_hand_over_is_its_worst():
    clip = ramp()
    clip[14:] += 3.0  # between frames 13 and 14: inside the first hand-over
    report = seam_report(clip, WINDOWS)
    assert report["inside_mad"] == 0.5
    assert report["worst_seam_mad"] == 0.5 + 3.0 / 5  # spread over that hand-over's 5 pairs
    assert report["seam_mad"] == 0.5 + 3.0 / 10


def test_jumps_inside_windows_count_as_inside():
    clip = torch.zeros(40, 1, 1, 1)
    clip[5:] += 1.0  # inside the first window alone
    report = seam_report(clip, WINDOWS)
    assert report["inside_mad"] > 0 and report["seam_mad"] == 0

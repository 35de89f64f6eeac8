"""Measures of the small world (world/measure.py), checked on clips whose truth is known: rendered ground truth,
the same blurred and noisy (as a small model's output is), frames drawn independently, injected seams."""
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from adm.world import measure, scenes

SIZE = scenes.SIZE
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def blurred(clip: torch.Tensor, seed: int = 0, sigma: float = 1.0, noise: float = 0.05) -> torch.Tensor:
    """Gaussian blur on the torus plus Gaussian noise, clamped to [0, 1]."""
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = F.pad(clip, (3, 3, 3, 3), mode="circular")
    x = F.conv2d(x, kernel.view(1, 1, 1, 7).repeat(3, 1, 1, 1), groups=3)
    x = F.conv2d(x, kernel.view(1, 1, 7, 1).repeat(3, 1, 1, 1), groups=3)
    return (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def moving(direction, speed, shape="square", background="striped", colour="red", start=(30.5, 1.25)):
    return scenes.Scene(colour, shape, background, start=start, direction=direction, speed=speed)


def still_frames_clip(scene: scenes.Scene, frames: int, rng: random.Random) -> torch.Tensor:
    """A clip of ``frames`` stills of the scene's object, each at an independently drawn place."""
    return torch.cat([scenes.render(scenes.Scene(scene.colour, scene.shape, scene.background,
                                                 start=(rng.uniform(0, SIZE), rng.uniform(0, SIZE))))
                      for _ in range(frames)])


@pytest.mark.parametrize("shape, background", [("square", "plain"), ("square", "striped"), ("circle", "checked"),
                                               ("diamond", "ocean")])
def test_the_tracker_recovers_rendered_trajectories_in_every_direction_and_speed_across_the_edges(shape, background):
    for direction in scenes.DIRECTIONS:
        for speed in scenes.SPEEDS:
            scene = moving(direction, speed, shape, background)       # starts on an edge: wraps at once
            result = measure.track(scenes.render(scene, 16), scene.colour)
            # on a textured background the object weight's D (the median background) is not the background
            # under each edge pixel: a bias that repeats with the sub-pixel phase (up to 0.135 px measured over
            # 150 random clips) and so leaves the velocity alone
            tolerance = 0.05 if background == "plain" else 0.15
            assert measure.wrap(result.positions - scene.positions(16)).abs().max() < tolerance
            assert result.found.all() and ((result.area - 64).abs() < 16).all()
            vx, vy = measure.velocity(result.positions, result.found)
            assert vx == pytest.approx(scene.velocity()[0], abs=0.02)
            assert vy == pytest.approx(scene.velocity()[1], abs=0.02)


def test_an_object_split_over_the_corners_is_measured_whole_and_an_absent_one_is_flagged():
    scene = scenes.Scene("green", "circle", "plain", start=(0.0, 0.0))
    clip = scenes.render(scene, 2)
    result = measure.track(clip, "green")
    assert measure.wrap(result.positions).abs().max() < 0.2 and result.found.all()
    absent = measure.track(clip, "magenta")
    assert not absent.found.any() and (absent.area < 1).all() and torch.isfinite(absent.positions).all()
    assert measure.velocity(absent.positions, absent.found) == (0.0, 0.0)


def test_blurred_noisy_clips_still_track():
    for direction in scenes.DIRECTIONS:
        scene = moving(direction, "slowly", "diamond", "checked", "green")
        result = measure.track(blurred(scenes.render(scene, 16)), scene.colour)
        assert result.found.all() and measure.wrap(result.positions - scene.positions(16)).abs().max() < 0.5
        vx, vy = measure.velocity(result.positions)
        assert (vx, vy) == pytest.approx(scene.velocity(), abs=0.05)


def test_motion_scores_are_perfect_on_ground_truth_and_near_chance_on_independent_stills():
    clips, _, drawn = scenes.clip_batch(3, 24, 16, backgrounds=scenes.BASE_BACKGROUNDS + ("ocean",))
    truth = measure.motion_scores(clips, drawn)
    assert truth["direction_accuracy"] == 1.0 and truth["found"] == 1.0 and truth["clips"] == 24
    assert truth["cosine"] > 0.999 and truth["speed_ratio"] == pytest.approx(1.0, abs=0.02)
    assert truth["speed_error"] < 0.02 and truth["wake_behind"] == 1.0   # every rendered frame shows its motion
    rng = random.Random(5)
    stills = torch.stack([still_frames_clip(scene, 16, rng) for scene in drawn])
    chance = measure.motion_scores(stills, drawn)
    assert chance["direction_accuracy"] < 0.5 and abs(chance["cosine"]) < 0.4
    assert chance["wake_behind"] == 0.0                                      # still objects leave no wake
    # a wake on the other side (the clip played backwards) shows the opposite motion on every frame
    assert measure.motion_scores(clips.flip(1), drawn)["wake_behind"] == 1.0
    backwards = [dataclasses.replace(s, direction=OPPOSITE[s.direction]) for s in drawn]
    assert measure.motion_scores(clips, backwards)["wake_behind"] == 0.0
    # a still clip: no speed, no direction
    frozen = torch.stack([clip[:1].expand(16, -1, -1, -1) for clip in clips[:4]])
    assert measure.motion_scores(frozen, drawn[:4])["direction_accuracy"] == 0.0
    with pytest.raises(ValueError, match="asks for no motion"):
        measure.motion_scores(clips[:1], [scenes.Scene("red", "square", "plain", (3.0, 3.0))])


def test_appearance_change_is_zero_for_a_steady_object_and_grows_when_it_changes():
    scene = moving("down", "quickly", "circle", "plain", "yellow")
    clip = scenes.render(scene, 12)
    assert measure.appearance_change(clip, "yellow") < 0.02
    flicker = clip.clone()
    flicker[1::2] = 0.6 * flicker[1::2] + 0.4 * scenes.background("plain")   # every other frame washed out
    assert measure.appearance_change(flicker, "yellow") > 0.2


def test_seams_show_at_an_injected_jump_and_not_elsewhere():
    scene = moving("right", "slowly", "square", "checked", "magenta", start=(5.0, 9.0))
    clip = scenes.render(scene, 16)
    jumped = scenes.Scene(scene.colour, scene.shape, scene.background, start=(8.0, 9.0), direction="right",
                          speed="slowly")
    clip[8:] = scenes.render(jumped, 16)[8:]              # from frame 8 on, the object is 3 px further right
    at_jump = measure.seam_scores(clip, "magenta", [8])
    assert at_jump["displacement_at_seams"] == pytest.approx(3.0, abs=0.2) and at_jump["displacement_ratio"] > 10
    control = measure.seam_scores(clip, "magenta", [4])
    assert control["displacement_ratio"] == pytest.approx(1.0, abs=0.3)
    assert control["appearance_ratio"] == pytest.approx(1.0, abs=0.3)
    # an appearance seam: from frame 8 on the object is washed out toward the background, where it stays on course
    faded = scenes.render(scene, 16)
    faded[8:] = 0.7 * faded[8:] + 0.3 * scenes.background("checked")
    assert measure.seam_scores(faded, "magenta", [8])["appearance_ratio"] > 3
    assert measure.seam_scores(faded, "magenta", [4])["appearance_ratio"] == pytest.approx(1.0, abs=0.3)
    with pytest.raises(ValueError, match="outside the clip's transitions 1..15"):
        measure.seam_scores(clip, "magenta", [16])


def test_global_displacement_recovers_a_pan_and_reads_zero_for_a_still_camera():
    for pan, expected in (("left", 1.0), ("right", -1.0)):
        clips, _, _ = scenes.clip_batch(1, 3, 8, backgrounds=("striped", "checked", "ocean"), pan=pan)
        for clip in clips:
            assert measure.global_displacement(clip) == pytest.approx((expected, 0.0), abs=0.05)
    clips, _, drawn = scenes.clip_batch(2, 3, 8, backgrounds=("striped", "checked"))
    for clip, scene in zip(clips, drawn):                   # objects move, the camera does not
        assert measure.global_displacement(clip, ignore_colour=scene.colour) == pytest.approx((0, 0), abs=0.05)
        assert measure.global_displacement(clip[:1].expand(8, -1, -1, -1)) == (0.0, 0.0)


def test_the_domain_classifier_separates_held_out_images_and_is_deterministic():
    classifier = measure.DomainClassifier.trained(seed=0, count=128)
    base, _ = scenes.image_batch(100, 100, scenes.BASE_BACKGROUNDS)
    ocean, _ = scenes.image_batch(101, 100, (scenes.PERSONAL_BACKGROUND,))
    assert classifier.share(base) <= 0.05 and classifier.share(ocean) >= 0.95
    assert classifier.share(blurred(ocean)) >= 0.95               # a blurry personalized frame still counts
    assert torch.equal(classifier.weight, measure.DomainClassifier.trained(seed=0, count=128).weight)
    clips, _, _ = scenes.clip_batch(4, 2, 4, backgrounds=(scenes.PERSONAL_BACKGROUND,))
    assert classifier.share(clips) == 1.0                          # a batch of clips: every frame counts


def test_colour_per_frame_sees_the_switch_at_the_keyframe():
    red = moving("left", "slowly", "circle", "striped", "red")
    yellow = scenes.Scene("yellow", red.shape, red.background, red.start, red.direction, red.speed)
    clip = torch.cat([scenes.render(red, 16)[:8], scenes.render(yellow, 16)[8:]])
    assert measure.colour_per_frame(clip) == ["red"] * 8 + ["yellow"] * 8
    assert measure.colour_per_frame(blurred(clip)) == ["red"] * 8 + ["yellow"] * 8
    assert measure.colour_per_frame(scenes.background("ocean")[None]) == [None]


def test_bad_input_is_refused_with_the_fix():
    clip = scenes.render(moving("up", "slowly"), 2)
    with pytest.raises(ValueError, match=r"expected a tensor \[frames, 3, 32, 32\]"):
        measure.track(clip.permute(0, 2, 3, 1), "red")
    with pytest.raises(ValueError, match=r"\(frames \+ 1\) / 2"):
        measure.track(clip * 2 - 1, "red")
    with pytest.raises(ValueError, match="unknown colour 'blue'"):
        measure.track(clip, "blue")
    with pytest.raises(ValueError, match="needs at least 2"):
        measure.appearance_change(clip[:1], "red")


def test_a_flat_cost_gives_no_sub_pixel_shift():
    # Along an axis without detail (vertical stripes seen for a vertical shift) every shift costs the same, but the
    # FFT correlation leaves rounding of about 1e-17 that a parabola through it would read as up to half a pixel.
    assert measure._parabola(torch.tensor([1e-17, 0.0, 3e-17], dtype=torch.float64), 1) == 0.0
    assert measure._parabola(torch.tensor([0.3, 0.1, 0.5], dtype=torch.float64), 1) == pytest.approx(-1 / 6)

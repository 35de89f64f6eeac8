"""The small world's renderer (world/scenes.py): deterministic by seed, a torus (positions and pans wrap),
captions with and without motion words, backgrounds light on every side, and clear refusals."""
import pytest
import torch

from adm.world import measure, scenes


def test_batches_are_deterministic_by_seed():
    clips, captions, drawn = scenes.clip_batch(7, 3, 4)
    again, captions_again, drawn_again = scenes.clip_batch(7, 3, 4)
    assert torch.equal(clips, again) and captions == captions_again and drawn == drawn_again
    assert not torch.equal(clips, scenes.clip_batch(8, 3, 4)[0])
    images, texts = scenes.image_batch(3, 5)
    assert torch.equal(images, scenes.image_batch(3, 5)[0]) and texts == scenes.image_batch(3, 5)[1]
    assert clips.shape == (3, 4, 3, scenes.SIZE, scenes.SIZE) and 0 <= clips.min() and clips.max() <= 1


def test_positions_wrap_around_the_torus():
    right = scenes.Scene("red", "square", "plain", start=(31.5, 0.25), direction="right", speed="quickly")
    assert right.positions(3).tolist() == [[31.5, 0.25], [0.5, 0.25], [1.5, 0.25]]
    up = scenes.Scene("red", "square", "plain", start=(4.0, 0.25), direction="up", speed="slowly")
    assert up.positions(2)[1].tolist() == [4.0, 31.75]
    # an object on the corner is drawn split over all four corners, whole
    mask = scenes.object_mask("square", 0.0, 0.0)
    assert mask[0, 0] == mask[-1, -1] == mask[0, -1] == mask[-1, 0] == 1 and mask[16, 16] == 0
    assert mask.sum() == pytest.approx(scenes.object_mask("square", 16.0, 16.0).sum())


def test_captions_name_the_motion_of_moving_objects_only():
    scene = scenes.Scene("red", "square", "striped", start=(3.0, 3.0), direction="left", speed="slowly")
    assert scene.caption() == "a red square moving left slowly on a striped background"
    still = scenes.Scene("green", "circle", "plain", start=(3.0, 3.0))
    assert still.caption() == "a green circle on a plain background"
    assert all("moving" not in c for c in scenes.image_batch(0, 20, motion_words=0.0)[1])
    assert all(" moving " in c for c in scenes.image_batch(0, 20, motion_words=1.0)[1])
    # a still captioned without motion words shows no wake: only the object's colour and the background's greys
    stills = scenes.image_batch(0, 20, backgrounds=("plain",), motion_words=0.0)[0]
    assert stills.amax() < scenes.WAKE_COLOUR[0] - 0.01
    _, pan_captions, pan_scenes = scenes.clip_batch(0, 4, 2, pan="left")
    assert all("moving" not in c for c in pan_captions) and all(s.velocity() == (0.0, 0.0) for s in pan_scenes)


@pytest.mark.parametrize("direction", list(scenes.DIRECTIONS))
def test_one_frame_shows_the_motion_a_wake_behind_the_object_as_long_as_its_speed(direction):
    def wake_behind(speed):
        scene = scenes.Scene("red", "square", "plain", start=(16.0, 16.0), direction=direction, speed=speed)
        white = (scenes.render(scene)[0] - 0.35).amin(0) > 0.02   # whiter than the plain grey
        ys, xs = torch.nonzero(white, as_tuple=True)
        dx, dy = scenes.DIRECTIONS[direction]
        along = measure.wrap(xs + 0.5 - 16.0) * dx + measure.wrap(ys + 0.5 - 16.0) * dy
        return white.sum().item(), -along.min().item(), along.max().item()
    (slow_area, slow_reach, slow_ahead) = wake_behind("slowly")
    (fast_area, fast_reach, fast_ahead) = wake_behind("quickly")
    assert slow_area > 0 and fast_area > slow_area
    # all of it lies behind, reaching back past the object's edge by WAKE_FRAMES frames of motion
    assert slow_ahead < 0 and fast_ahead < 0
    assert slow_reach == pytest.approx(scenes.OBJECT_RADIUS + scenes.WAKE_FRAMES * 0.5, abs=1)
    assert fast_reach == pytest.approx(scenes.OBJECT_RADIUS + scenes.WAKE_FRAMES * 1.0, abs=1)
    still = scenes.Scene("red", "square", "plain", start=(16.0, 16.0))
    assert torch.equal(scenes.wake_mask(still, 16.0, 16.0), torch.zeros(scenes.SIZE, scenes.SIZE))


def test_pictures_are_framed_on_their_subject():
    # every still, and the first frame of every clip, has its object within FRAMING pixels of the centre
    _, _, drawn = scenes.clip_batch(5, 40, 2)
    starts = torch.tensor([s.start for s in drawn])
    assert (starts - scenes.SIZE / 2).abs().max() <= scenes.FRAMING
    assert (starts - scenes.SIZE / 2).abs().max() > scenes.FRAMING / 2   # jittered, not pinned


@pytest.mark.parametrize("pan, step", [("left", 1), ("right", -1)])
def test_a_pan_rolls_the_whole_frame(pan, step):
    clips, _, _ = scenes.clip_batch(2, 3, 5, backgrounds=("striped", "checked", "ocean"), pan=pan)
    for clip in clips:
        for t in range(4):
            assert torch.allclose(clip[t + 1], torch.roll(clip[t], step, dims=2), atol=1e-5)


def test_the_personalized_background_is_never_a_base_one_and_unknown_ones_are_refused():
    ocean = scenes.background("ocean").flatten(1).T                     # [pixels, 3]
    for kind in scenes.BASE_BACKGROUNDS:                                  # no base pixel comes near an ocean one
        assert torch.cdist(scenes.background(kind).flatten(1).T, ocean).min() > 0.25, kind
    with pytest.raises(ValueError, match="unknown background 'sea'.*ocean"):
        scenes.background("sea")


def test_base_gradients_are_light_on_each_of_the_four_sides():
    # so that the motion module sees every direction of motion over every direction of light (module docstring)
    def light_side(kind):
        brightness = scenes.background(kind).mean(0)                      # [y, x]
        rows, cols = brightness.mean(1), brightness.mean(0)
        sides = {"top": rows[:8].mean() - rows[-8:].mean(), "bottom": rows[-8:].mean() - rows[:8].mean(),
                 "left": cols[:8].mean() - cols[-8:].mean(), "right": cols[-8:].mean() - cols[:8].mean()}
        return max(sides, key=sides.get)
    graded = [kind for kind in scenes.BASE_BACKGROUNDS if kind in scenes.GRADIENTS]
    assert sorted(map(light_side, graded)) == ["bottom", "left", "right", "top"]
    assert light_side("ocean") == "top"
    # nothing in any background is as light as a wake in every channel, so the tracker never reads one as wake
    assert all(not measure.wake_pixels(scenes.background(kind)[None]).any()
               for kind in scenes.BASE_BACKGROUNDS + (scenes.PERSONAL_BACKGROUND,))

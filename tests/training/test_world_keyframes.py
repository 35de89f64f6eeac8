"""Issue 13's "a keyframe given at frame k conditions frame k", with trained weights: a small SparseCtrl (rgb)
trained here, in minutes, on a briefly trained world base and a motion module, through world/keyframes.py; then
loaded with Load SparseCtrl's loader and sampled through Apply SparseCtrl's path and the host's KSampler, alone
and inside context windows on a 48-frame clip. Figures (this training on more clips; a stronger base) are in
BENCHMARKS.md."""
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from adm.model_patcher.context_windows import apply_context_windows, make_handler
from adm.model_patcher.sparse_ctrl import load_sparse_ctrl
from adm.motion_modules.sparse_ctrl import RGB
from adm.training.loop import make_trainee, save_trained
from adm.world import keyframes, models, motion, scenes, study

pytestmark = pytest.mark.training

STEPS = 10  # sampling steps


def _hash(module) -> str:
    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyframes")
    base, text = models.new_unet_patcher(0), models.TextEncoder()
    models.train_images(base, text, lambda step: scenes.image_batch(step, 16), 200)
    module = folder / "module.safetensors"  # a new module: the identity, as training starts one
    save_trained(make_trainee(base.model.diffusion_model, style="v2", frames=motion.FRAMES), module, {})
    before = _hash(base.model.diffusion_model)
    losses = keyframes.train_sparse_ctrl(base, text, module, folder / "ctrl.safetensors", 200, batch_size=1,
                                         learning_rate=2e-3)
    assert _hash(base.model.diffusion_model) == before, "training the SparseCtrl changed the frozen image model"
    return base, text, module, folder / "ctrl.safetensors", losses


def _pair(patcher, text, control, scene, k, frames, seed):
    image, position = keyframes.keyframe(scene, k, frames)
    given = models.sample(patcher, text, [scene.caption()], frames, seed, steps=STEPS,
                          control=keyframes.keyframes_given(patcher, control, {k: image}, frames))
    plain = models.sample(patcher, text, [scene.caption()], frames, seed, steps=STEPS)
    return keyframes.scores(given, plain, image, position, k, scene.colour), given, plain


def test_untrained_sparse_ctrl_changes_nothing(world, tmp_path):
    base, text, module, _, _ = world
    path = tmp_path / "new.safetensors"
    save_file(keyframes.new_sparse_ctrl(base).state_dict(), str(path))
    scene = study.eval_scenes(1, 3, scenes.BASE_BACKGROUNDS)[0]
    _, given, plain = _pair(motion.animated(base, module), text, load_sparse_ctrl(path), scene, 5, motion.FRAMES, 1)
    assert torch.equal(given, plain)  # zero convs: a new SparseCtrl starts by changing nothing


def test_trained_sparse_ctrl_loads_as_published_and_pulls_its_frame(world):
    base, text, module, path, losses = world
    assert sum(losses[-50:]) < sum(losses[:50])
    control = load_sparse_ctrl(path)
    assert control.config.kind == RGB and control.config.channels == (32, 64, 64, 64)
    patcher = motion.animated(base, module)
    rows = []
    for i, (scene, k) in enumerate(zip(study.eval_scenes(3, 5, scenes.BASE_BACKGROUNDS), (0, 7, 15))):
        rows.append(_pair(patcher, text, control, scene, k, motion.FRAMES, seed=10 + i)[0])
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("distance_ratio", "pull_at_keyframe", "pull_far")}
    assert mean["distance_ratio"] < 0.9, rows                       # frame k moved toward the keyframe ...
    assert mean["pull_at_keyframe"] > 2 * mean["pull_far"], rows    # ... frames far from k much less
    assert all(r["pull_at_keyframe"] > r["pull_far"] for r in rows), rows
    assert sum(r["object_error_px"]["with"] for r in rows) < sum(r["object_error_px"]["without"] for r in rows), rows


def test_keyframe_inside_context_windows_on_48_frames(world):
    base, text, module, path, _ = world
    windows = apply_context_windows(motion.animated(base, module), make_handler(16, 4, "standard_static", "pyramid"))
    scene = study.eval_scenes(1, 7, scenes.BASE_BACKGROUNDS)[0]
    row, given, plain = _pair(windows, text, load_sparse_ctrl(path), scene, 40, 48, seed=4)
    assert given.shape == plain.shape == (48, 3, scenes.SIZE, scenes.SIZE)
    assert row["distance_ratio"] < 0.9 and row["pull_at_keyframe"] > 2 * row["pull_far"], row

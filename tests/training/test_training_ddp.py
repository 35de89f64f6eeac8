"""Training on two processes with torch.distributed (gloo, on the CPU), launched by torchrun the way
``torchrun --nproc_per_node 2 -m headless train`` is: each process trains on its own shard of the clips;
DistributedDataParallel averages the gradients, so both end with identical weights; process 0 writes the state.

This file is also the worker torchrun starts: ``python -m torch.distributed.run --standalone --nproc_per_node 2
tests/training/test_training_ddp.py OUT``.
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.training
ROOT = Path(__file__).resolve().parents[2]
STEPS, FRAMES = 3, 4


def test_two_gloo_processes_train_disjoint_shards_and_end_with_identical_weights(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    names = ranks[0]["weights"].keys()
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in names)
    # They started apart (each process made its own random module: DDP broadcast rank 0's) and moved.
    assert not all(torch.equal(ranks[0]["init"][k], ranks[1]["init"][k]) for k in names)
    assert not all(torch.equal(ranks[0]["weights"][k], ranks[0]["init"][k]) for k in names)
    seen = [set(r["indices"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each process its own shard
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == STEPS  # averaged over processes
    states = sorted((tmp_path / "states").glob("step-*.pt"))
    assert [p.name for p in states] == [f"step-{STEPS:07d}.pt"]  # written once, by process 0
    state = torch.load(states[0], weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # both processes' RNG states, for a resume
    print(f"\nDDP: 2 gloo processes, {STEPS} steps, weights identical on both ({len(names)} tensors), "
          f"shards {sorted(seen[0])} / {sorted(seen[1])}")


def worker(out: Path) -> None:
    """One process of the run (started by torchrun)."""
    sys.path[:0] = [os.environ.get("COMFYUI_DIR", str(ROOT / ".host" / "ComfyUI")), str(ROOT / "tests")]
    package = types.ModuleType("adm")
    package.__path__ = [str(ROOT)]
    sys.modules.setdefault("adm", package)
    from comfy.cli_args import args
    args.cpu = True
    torch.set_num_threads(1)

    from adm.training import loop
    from adm.training.cli import init_distributed
    from unets import tiny_sd15_patcher
    rank, world = init_distributed(cpu=True)
    assert world == 2

    class Recorded:
        def __init__(self):
            self.indices = []

        def __len__(self):
            return 12  # 6 clips a process per epoch: STEPS x batch 2, one epoch

        def example(self, index, rng):
            self.indices.append(index)
            g = torch.Generator().manual_seed(index)
            return loop.Example(torch.randn(FRAMES, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g))

    model = tiny_sd15_patcher()  # the same frozen model everywhere (seeded)
    trainee = loop.make_trainee(model.model.diffusion_model, style="v3", frames=FRAMES, seed=100 + rank)
    init = {k: v.clone() for k, v in trainee.module.state_dict().items()}
    source = Recorded()
    options = loop.TrainingOptions(steps=STEPS, batch_size=2, learning_rate=1e-3, seed=0, state_dir=str(out / "states"))
    result = loop.train(model, source, trainee, options)
    torch.save({"weights": {k: v.cpu() for k, v in trainee.module.state_dict().items()}, "init": init,
                "indices": source.indices, "losses": result.losses}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

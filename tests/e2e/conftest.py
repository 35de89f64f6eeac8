"""One real ComfyUI server for all end-to-end tests, with random stand-in models in the real layouts."""
import pytest
import torch

from adm.headless.demo_models import ensure_random_models
from adm.headless.server import start_server
from adm.motion_modules import LAYOUTS, MotionModule, published_state_dict
from conftest import COMFYUI_DIR, ROOT

MOTION_LORA = "RANDOM-WEIGHTS_v2_lora_PanLeft.ckpt"


def random_motion_lora(path, rank=8):
    """A motion LoRA in the published v2 camera-LoRA layout (every attention projection, mid block included)."""
    with torch.device("meta"):
        module_sd = published_state_dict(MotionModule(LAYOUTS["AnimateDiff v2"]))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, weight in module_sd.items():
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            suffix = f".{proj}.0.weight" if proj == "to_out" else f".{proj}.weight"
            if ".attention_blocks." in key and key.endswith(suffix):
                stem = key[: -len(suffix)]
                sd[f"{stem}.processor.{proj}_lora.down.weight"] = torch.randn(rank, weight.shape[1], generator=g) * 0.02
                sd[f"{stem}.processor.{proj}_lora.up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * 0.02
    torch.save(sd, path)


@pytest.fixture(scope="session")
def e2e_models():
    # Cached across runs (they take ~20 s to make); the folders are only read through extra_model_paths.
    models = ROOT / ".host" / "test-models"
    ensure_random_models(models)
    loras = models / "animatediff_motion_lora"
    loras.mkdir(exist_ok=True)
    if not (loras / MOTION_LORA).exists():
        random_motion_lora(loras / MOTION_LORA)
    (models / "animatediff_models" / "not_a_motion_module.safetensors").write_bytes(
        (models / "checkpoints").glob("*.safetensors").__next__().read_bytes()[:4096])
    return models


@pytest.fixture(scope="session")
def e2e_motion_lora(e2e_models):
    return MOTION_LORA


@pytest.fixture(scope="session")
def e2e_dirs(tmp_path_factory):
    return {name: tmp_path_factory.mktemp(name) for name in ("input", "output", "config", "user")}


@pytest.fixture(scope="session")
def e2e_server(e2e_models, e2e_dirs):
    config = e2e_dirs["config"] / "extra_model_paths.yaml"
    config.write_text(f"adm_tests:\n  base_path: {e2e_models}\n  checkpoints: checkpoints\n"
                      f"  animatediff_models: animatediff_models\n  animatediff_motion_lora: animatediff_motion_lora\n"
                      f"  controlnet: controlnet\n")
    with start_server(COMFYUI_DIR, host_args=[f"--extra-model-paths-config={config}",
                                              f"--output-directory={e2e_dirs['output']}",
                                              f"--input-directory={e2e_dirs['input']}",
                                              f"--user-directory={e2e_dirs['user']}"]) as url:
        yield url

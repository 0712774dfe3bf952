import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*torchvision.*")
# Tiny models gain nothing from threads, and two OpenMP threads on a busy 2-core machine spin-wait
# each other into 100x slowdowns (measured): one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd15():
    from cmlora.tiny import tiny_sd15_pipeline

    return tiny_sd15_pipeline(seed=0)


@pytest.fixture(scope="session")
def sdxl():
    from cmlora.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def sd15_loras(sd15, tmp_path_factory):
    """Three kohya LoRAs (UNet + text encoder) for the tiny SD-1.5 pipeline."""
    from cmlora.tiny import write_random_lora

    folder = tmp_path_factory.mktemp("loras")
    return [write_random_lora(sd15, folder / f"lora{k}.safetensors", seed=k, rank=2 + k) for k in range(3)]


def pipeline_state(pipe):
    """Everything compose() must leave as found: module objects and every tensor's values."""
    state = {}
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        state[component + ".modules"] = [(n, id(m)) for n, m in model.named_modules()]
        state[component + ".tensors"] = {k: v.clone() for k, v in model.state_dict().items()}
    state["scheduler"] = dict(pipe.scheduler.config)
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if key.endswith(".tensors"):
            assert before[key].keys() == after[key].keys(), key
            for name in before[key]:
                assert torch.equal(before[key][name], after[key][name]), name
        else:
            assert before[key] == after[key], key

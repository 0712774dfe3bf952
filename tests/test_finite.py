"""No "successful" broken image: absurd strengths are refused up front, and a generation whose
latents or decoded image are non-finite or saturated raises instead of saving a black frame."""

import pytest
import torch
from safetensors.torch import save_file

from cmlora import LoRA, compose
from cmlora.app.cli import main
from cmlora.errors import GenerationError, LoRAFileError, OptionError
from cmlora.loras import read_lora_file
from cmlora.sampler import check_decoded, check_latents
from cmlora.tiny import random_lora_state_dict


def test_absurd_weights_and_scales_are_refused_up_front(sd15, sd15_loras):
    with pytest.raises(OptionError, match="weight must be a number in"):
        LoRA(sd15_loras[0], weight=1e30)
    with pytest.raises(OptionError, match="lora_scale must be a number in"):
        compose(sd15, [LoRA(sd15_loras[0])], method="merge", prompt="x", lora_scale=1e30, progress=False)


def test_a_file_with_an_absurd_alpha_is_refused(sd15, tmp_path):
    path = tmp_path / "alpha.safetensors"
    save_file(random_lora_state_dict(sd15, rank=4, alpha=1e30), str(path))
    with pytest.raises(LoRAFileError, match="scales the LoRA by 2.5e\\+29"):
        read_lora_file(path)


def test_checks_of_latents_and_decoded_images():
    fine = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    check_latents(fine)
    check_decoded(fine.clamp(-0.9, 0.9))
    broken = fine.clone()
    broken[1, 0, 0, 0] = float("nan")
    with pytest.raises(GenerationError, match=r"image\(s\) \[1\]"):
        check_latents(broken)
    with pytest.raises(GenerationError, match="not finite"):
        check_decoded(broken)
    with pytest.raises(GenerationError, match="saturated"):
        check_decoded(torch.full((1, 3, 8, 8), -1.0))  # a black frame


def test_overflowing_lora_raises_and_the_cli_saves_nothing(sd15, tmp_path, capsys):
    """Finite factors whose product overflows float32: the images would be NaN (saved black)."""
    state = random_lora_state_dict(sd15, rank=4, text_encoder=False)
    state = {k: (v * 1e18 if k.endswith("lora_up.weight") else v) for k, v in state.items()}
    path = tmp_path / "huge.safetensors"
    save_file(state, str(path))
    with pytest.raises(GenerationError):
        compose(sd15, [LoRA(path)], method="merge", prompt="x", num_inference_steps=2, progress=False)
    out = tmp_path / "out"
    code = main(
        ["generate", "--base", "tiny-sd15", "--lora", str(path), "--prompt", "x", "--steps", "2"]
        + ["--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lower it" in err[0] and "Traceback" not in err[0]
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("spec", ["{}:1e30", "{}:1e3000"])
def test_cli_refuses_an_absurd_lora_weight(spec, sd15_loras, tmp_path, capsys):
    code = main(
        ["generate", "--base", "tiny-sd15", "--lora", spec.format(sd15_loras[0]), "--prompt", "x"]
        + ["--out", str(tmp_path / "o"), "--quiet"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "weight" in err[0]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_cli_refuses_an_absurd_lora_scale(sd15_loras, tmp_path, capsys):
    code = main(
        ["generate", "--base", "tiny-sd15", "--lora", str(sd15_loras[0]), "--prompt", "x"]
        + ["--lora-scale", "1e30", "--out", str(tmp_path / "o"), "--quiet"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lora_scale" in err[0]

"""Mini world: a small procedural text-to-image world (bundled base pipeline, 11 LoRAs, detectors) where
multi-LoRA composition can be run and scored on a CPU in minutes.  See ``cmlora.mini.world``."""

from __future__ import annotations

import json
import os

ASSET_ENV = "CMLORA_MINI_ASSETS"
#: The assets installed with the package (the shipped world), whatever ``CMLORA_MINI_ASSETS`` says.
PACKAGED_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
#: Sampling defaults of the mini world (generate, sweeps, benchmarks, checks): 64x64, 20 DPM-Solver++
#: steps, guidance 5 (the base was trained with 10 % empty captions; higher guidance oversaturates).
SIZE, STEPS, GUIDANCE = 64, 20, 5.0


def assets_dir() -> str:
    """Folder with pipeline/, loras/, mini_lora_info.json, prompts.json, detectors.safetensors."""
    return os.environ.get(ASSET_ENV) or PACKAGED_ASSETS


def pipeline_dir() -> str:
    return os.path.join(assets_dir(), "pipeline")


def lora_path(lora_id: str) -> str:
    return os.path.join(assets_dir(), "loras", f"{lora_id}.safetensors")


def profile_path() -> str:
    """The frequency profile of the 11 LoRAs (``cmlora profile``), used by default for cmlora."""
    return os.path.join(assets_dir(), "mini_profile.json")


def info() -> dict:
    """The LoRA info in the ComposLoRA ``*_lora_info.json`` layout."""
    with open(os.path.join(assets_dir(), "mini_lora_info.json")) as f:
        return json.load(f)


def prompts() -> dict:
    """{'prompt': base prompt, 'negative_prompt': ...} of the mini world."""
    with open(os.path.join(assets_dir(), "prompts.json")) as f:
        return json.load(f)["mini"]


def load_pipeline(device: str = "cpu", dtype=None):
    """The bundled base StableDiffusionPipeline (DPM-Solver++ scheduler), loaded offline."""
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = dtype or torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        pipeline_dir(),
        dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


__all__ = ["assets_dir", "pipeline_dir", "lora_path", "profile_path", "info", "prompts", "load_pipeline"]

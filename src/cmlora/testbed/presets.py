"""Generation settings of the testbeds: the papers' published ones (COMPOSLORA.md) and the mini
world's defaults, and the pipeline settings (scheduler, VAE) the published runs used."""

from __future__ import annotations

from .. import mini
from ..errors import OptionError

# Published generation settings (COMPOSLORA.md). "zhong": Zhong et al. 2024; "cmlora": CMLoRA's code.
PRESETS: dict[str, dict[str, dict]] = {
    "zhong": {
        "reality": {
            "width": 768,
            "height": 1024,
            "steps": 100,
            "guidance": 7.0,
            "lora_scale": 0.8,
            "base_seed": 111,
        },
        "anime": {
            "width": 512,
            "height": 512,
            "steps": 200,
            "guidance": 10.0,
            "lora_scale": 0.8,
            "base_seed": 111,
        },
    },
    "cmlora": {
        style: {
            "width": 512,
            "height": 512,
            "steps": 220,
            "guidance": 8.5,
            "lora_scale": 1.0,
            "base_seed": 222,
        }
        for style in ("reality", "anime")
    },
}
MINI_DEFAULTS = {
    "width": mini.SIZE,
    "height": mini.SIZE,
    "steps": mini.STEPS,
    "guidance": mini.GUIDANCE,
    "lora_scale": 1.0,
    "base_seed": 0,
}
PUBLISHED_SCHEDULER = "dpmsolver++"
"""Both papers: DPMSolverMultistepScheduler with algorithm_type dpmsolver++ (set on the base's config)."""
PUBLISHED_DTYPE = "fp32"


def apply_pipeline_settings(pipe, scheduler: str | None, vae: str | None, allow_pickle: bool = False) -> None:
    """Put the published scheduler and VAE into ``pipe`` (None leaves that part as loaded).

    Like the published code, the scheduler is DPMSolverMultistepScheduler built from the base's own
    scheduler config with ``algorithm_type`` set, so betas and timestep spacing stay the checkpoint's.
    A VAE with pickled (``.bin``) weights only is refused unless ``allow_pickle``, like the base.
    """
    if scheduler is not None:
        from diffusers import DPMSolverMultistepScheduler

        if scheduler != PUBLISHED_SCHEDULER:
            raise OptionError(f"unknown scheduler {scheduler!r}; expected {PUBLISHED_SCHEDULER!r}")
        config = {**pipe.scheduler.config, "algorithm_type": scheduler}
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config)
    if vae is not None:
        from diffusers import AutoencoderKL

        current = pipe.vae
        kwargs = {} if allow_pickle else {"use_safetensors": True}
        try:
            loaded = AutoencoderKL.from_pretrained(vae, torch_dtype=current.dtype, **kwargs)
        except (OSError, ValueError) as exc:
            hint = "" if allow_pickle else " (a VAE with .bin weights only needs --allow-pickle)"
            raise OptionError(
                f"cannot load the VAE {vae!r} ({type(exc).__name__}: {exc}); pass a local diffusers VAE "
                f"folder with --vae, or --vae none to keep the base model's own{hint}"
            ) from exc
        pipe.vae = loaded.to(current.device).eval()

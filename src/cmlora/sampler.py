"""The one denoising loop and its denoiser. Every method runs through ``denoise``, which only steps
the scheduler; the ``Denoiser`` asks the method for step i's plan, executes its UNet calls
(``calls.py``), mixes the predictions and applies guidance. Neither knows anything of any method.
Also prompt encoding and decoding, with the checks that refuse a broken image.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .adapters import AdapterSet
from .calls import CallExecutor, Conditioning, Counters, call_groups
from .errors import GenerationError
from .frequency import latent_high_frequency
from .macs import MacCounter
from .methods import Method, StepState
from .plans import StepPlan
from .unet_cache import CachePoint, default_cache_block


def encode_prompt(
    pipe, prompt: str, negative_prompt: str | None, cfg: bool, height: int, width: int
) -> Conditioning:
    """diffusers' own encode_prompt, for SD-1.5 and SDXL; SDXL also gets its time ids."""
    device = pipe._execution_device
    out = pipe.encode_prompt(
        prompt=prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative_prompt,
    )
    if len(out) == 2:
        cond, uncond = out
        return Conditioning(torch.cat([uncond, cond]) if cfg else cond)
    cond, uncond, pooled, uncond_pooled = out
    projection_dim = (
        pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    )
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=cond.dtype, text_encoder_projection_dim=projection_dim
    ).to(device)
    if cfg:
        return Conditioning(
            torch.cat([uncond, cond]),
            {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])},
        )
    return Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids})


class Denoiser:
    """One step's composed noise prediction for a method, as k-diffusion's model wrappers are: it
    asks the method for the step's plan, runs the plan's UNet calls, mixes their predictions and
    applies guidance. The loop around it (``denoise``) only steps the scheduler, so every method
    shares one loop and the step's logic is testable on its own.

    ``fuse`` applies to steps of one UNet call (merge, switch): their adapter set holds for many
    calls, so fusing it into the weights pays once. Steps of several calls change the set per call
    and run un-fused. ``batch`` runs the calls of one mode as one batched UNet invocation.
    """

    def __init__(
        self,
        pipe,
        adapters: AdapterSet,
        method: Method,
        conditionings: dict[str, Conditioning],
        guidance_scale: float,
        macs: MacCounter,
        research: bool = False,
        batch: bool = False,
        fuse: bool = False,
    ):
        self.method, self.conditionings = method, conditionings
        self.guidance_scale, self.cfg = guidance_scale, guidance_scale > 1.0
        self.research, self.batch, self.fuse = research, batch, fuse
        point = None
        if method.uses_cache:
            layer, block = method.cache_point
            if block is None:  # not given: this UNet's default, written back for the record
                block = default_cache_block(pipe.unet, layer)
                method.cache_point = (layer, block)
            point = CachePoint(layer, block)
        self.executor = CallExecutor(pipe, adapters, macs, point, research)
        self.counters = Counters()
        self.plan: StepPlan | None = None

    def __call__(self, step: int, t, latents: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        """The guided prediction at step ``step`` (timestep ``t``); ``model_input`` is ``latents``
        scaled by the scheduler, ``latents`` feed the statistic of methods that read it."""
        method, cfg = self.method, self.cfg
        hf = latent_high_frequency(latents) if (method.needs_high_frequency or self.research) else None
        plan = self.plan = method.plan(step, StepState(high_frequency=hf))
        x = torch.cat([model_input, model_input]) if cfg else model_input
        results: list = [None] * len(plan.calls)
        fuse_step = self.fuse and len(plan.calls) == 1
        for group in call_groups(plan.calls, self.batch):
            calls = [plan.calls[k] for k in group]
            conds = [self.conditionings[c.embedding] for c in calls]
            outputs = self.executor.run(calls, x, t, conds, self.counters, fuse_step)
            for k, result in zip(group, outputs, strict=True):
                results[k] = result
        similarities = {
            call.cache_key: round(similarity, 6)
            for call, (_, similarity) in zip(plan.calls, results, strict=True)
            if similarity is not None
        }
        mixed, patch_weights = None, None
        if plan.mix is not None:
            preds = [eps.float() for eps, _ in results]
            mixed, patch_weights = plan.mix.guided(preds, plan.weights, self.guidance_scale if cfg else None)
        else:
            for weight, (eps, _) in zip(plan.weights, results, strict=True):
                term = eps.float() * weight
                mixed = term if mixed is None else mixed + term
            if cfg:
                uncond, cond = mixed.chunk(2)
                mixed = uncond + self.guidance_scale * (cond - uncond)
        entry = plan.trace()
        if patch_weights is not None:
            entry["patch_weights"] = {
                (plan.calls[k].cache_key or plan.calls[k].adapters[0][0]): round(w, 6)
                for k, w in patch_weights.items()
            }
        entry["t"] = int(t) if torch.is_tensor(t) and t.numel() == 1 else float(t)
        if self.research:
            entry["high_frequency"] = None if hf is None else round(hf, 6)
            entry["cache_similarity"] = similarities
        self.counters.trace.append(entry)
        return mixed


def denoise(
    denoiser: Denoiser,
    latents: torch.Tensor,
    scheduler,
    on_step: Callable[[int, StepPlan], None] | None = None,
) -> torch.Tensor:
    """The one loop: the scheduler's steps over the denoiser's predictions."""
    start = time.perf_counter()
    for i, t in enumerate(scheduler.timesteps):
        eps = denoiser(i, t, latents, scheduler.scale_model_input(latents, t))
        latents = scheduler.step(eps.to(latents.dtype), t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, denoiser.plan)
    denoiser.counters.loop_seconds = time.perf_counter() - start
    return latents


def decode(pipe, latents: torch.Tensor) -> list:
    vae = pipe.vae
    config = vae.config
    upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
    original_dtype = vae.dtype
    try:
        if upcast:
            vae.to(torch.float32)
        latents = latents.to(vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(original_dtype)
    check_decoded(image)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


#: Share of saturated pixel values above which a decoded image is degenerate (a flat black or white
#: frame, what an absurd LoRA strength gives): real images come nowhere near it.
SATURATED_SHARE = 0.99


def check_latents(latents: torch.Tensor) -> None:
    if not torch.isfinite(latents).all():
        bad = [k for k in range(latents.shape[0]) if not torch.isfinite(latents[k]).all()]
        raise GenerationError(
            f"the denoised latents of image(s) {bad} of this batch are not finite (NaN or inf): a LoRA "
            "strength (weight, --lora-scale or a file's alpha) is too large for this model; lower it"
        )


def check_decoded(image: torch.Tensor) -> None:
    """Refuse decoded images that are non-finite or saturated almost everywhere."""
    if not torch.isfinite(image).all():
        raise GenerationError(
            "the decoded image is not finite (NaN or inf): a LoRA strength (weight, --lora-scale or a "
            "file's alpha) is too large for this model, or the VAE overflows in this dtype (try fp32)"
        )
    saturated = (image.float().abs() >= 1.0).flatten(1).float().mean(1)
    if (saturated >= SATURATED_SHARE).any():
        raise GenerationError(
            f"the decoded image is saturated ({float(saturated.max()):.1%} of its values at black or "
            "white): a LoRA strength (weight, --lora-scale or a file's alpha) is too large; lower it"
        )

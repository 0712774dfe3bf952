"""The one denoising loop. Every method runs through ``denoise``: it asks the method for step i's
plan, executes its UNet calls (adapters switched through the router, full or cached), mixes the
predictions, applies guidance and takes the scheduler step. It knows nothing of any method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters import AdapterSet
from .macs import MacCounter
from .methods import Method, StepState
from .plans import StepPlan, UNetCall
from .unet_cache import CachePoint, UNetSplit


@dataclass
class Conditioning:
    """Prompt embeddings for one text-encoder activation, CFG batch order [uncond; cond]."""

    embeds: torch.Tensor
    added: dict | None = None


@dataclass
class Counters:
    full_calls: int = 0
    cached_calls: int = 0
    macs: int = 0
    unet_seconds: float = 0.0
    trace: list[dict] = field(default_factory=list)


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


class CallExecutor:
    """Runs one plan's UNet calls and keeps the per-LoRA cache entries of one image."""

    def __init__(
        self, pipe, adapters: AdapterSet, macs: MacCounter, point: CachePoint | None, research: bool
    ):
        self.unet = pipe.unet
        self.adapters = adapters
        self.macs = macs
        self.split = UNetSplit(self.unet, point) if point is not None else None
        self.cache: dict[str, torch.Tensor] = {}
        self.research = research

    def run(self, call: UNetCall, x: torch.Tensor, t, cond: Conditioning, counters: Counters) -> tuple:
        self.adapters.unet.set(call.adapters)
        signature = (call.mode, tuple(x.shape), tuple(cond.embeds.shape), call.adapters)
        similarity = None
        start = time.perf_counter()
        if call.mode == "plain":
            eps, macs = self.macs.count(
                signature,
                lambda: self.unet(
                    x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added, return_dict=False
                )[0],
            )
            counters.full_calls += 1
        else:
            if self.split is None:
                raise RuntimeError("plan asks for a cached/full split call but the method has no cache point")
            key = call.cache_key or "+".join(n for n, _ in call.adapters)
            entry = None
            if call.mode == "cached":
                if key not in self.cache:
                    raise RuntimeError(
                        f"plan asks for a cached call of {key!r} before any full call stored its features"
                    )
                entry = self.cache[key]
            (eps, new_entry), macs = self.macs.count(
                signature, lambda: self.split(x, t, cond.embeds, cond.added, entry=entry)
            )
            if call.mode == "full":
                if self.research and key in self.cache:
                    similarity = float(
                        torch.nn.functional.cosine_similarity(
                            self.cache[key].flatten().float(), new_entry.flatten().float(), dim=0
                        )
                    )
                self.cache[key] = new_entry
                counters.full_calls += 1
            else:
                counters.cached_calls += 1
        counters.unet_seconds += time.perf_counter() - start
        counters.macs += macs
        self.adapters.unet.clear()
        return eps, similarity


def denoise(
    pipe,
    adapters: AdapterSet,
    method: Method,
    conditionings: dict[str, Conditioning],
    latents: torch.Tensor,
    scheduler,
    guidance_scale: float,
    macs: MacCounter,
    research: bool = False,
    on_step: Callable[[int, StepPlan], None] | None = None,
) -> tuple[torch.Tensor, Counters]:
    """Run the trajectory. ``conditionings`` holds one entry per embedding key the method uses."""
    from .frequency import latent_high_frequency

    cfg = guidance_scale > 1.0
    point = CachePoint(*method.cache_point) if method.uses_cache else None
    executor = CallExecutor(pipe, adapters, macs, point, research)
    counters = Counters()
    for i, t in enumerate(scheduler.timesteps):
        hf = latent_high_frequency(latents) if (method.needs_high_frequency or research) else None
        plan = method.plan(i, StepState(high_frequency=hf))
        x = torch.cat([latents, latents]) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        mixed = None
        similarities = {}
        for call, weight in zip(plan.calls, plan.weights, strict=True):
            eps, similarity = executor.run(call, x, t, conditionings[call.embedding], counters)
            if similarity is not None:
                similarities[call.cache_key] = round(similarity, 6)
            term = eps.float() * weight
            mixed = term if mixed is None else mixed + term
        if cfg:
            uncond, cond = mixed.chunk(2)
            mixed = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(mixed.to(latents.dtype), t, latents, return_dict=False)[0]
        entry = plan.trace()
        entry["t"] = int(t) if torch.is_tensor(t) and t.numel() == 1 else float(t)
        if research:
            entry["high_frequency"] = None if hf is None else round(hf, 6)
            entry["cache_similarity"] = similarities
        counters.trace.append(entry)
        if on_step is not None:
            on_step(i, plan)
    return latents, counters


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
    return pipe.image_processor.postprocess(image.float(), output_type="pil")

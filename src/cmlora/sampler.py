"""The one denoising loop. Every method runs through ``denoise``: it asks the method for step i's
plan, executes its UNet calls (adapters switched through the router, full or cached), mixes the
predictions, applies guidance and takes the scheduler step. It knows nothing of any method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters import AdapterSet, RowGroup
from .errors import GenerationError
from .macs import MacCounter
from .methods import Method, StepState
from .plans import StepPlan, UNetCall
from .unet_cache import CachePoint, UNetSplit, default_cache_block


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
    loop_seconds: float = 0.0
    invocations: int = 0
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
    """Runs a plan's UNet calls and keeps the per-LoRA cache entries of one image.

    Calls of the same mode can run as one batched UNet invocation: each call's CFG rows get their
    own adapters through the router's row groups (PEFT-style mixed-adapter batches). Sequential
    execution is the same code with groups of one.
    """

    def __init__(
        self, pipe, adapters: AdapterSet, macs: MacCounter, point: CachePoint | None, research: bool
    ):
        self.unet = pipe.unet
        self.adapters = adapters
        self.macs = macs
        self.split = UNetSplit(self.unet, point) if point is not None else None
        self.cache: dict[str, torch.Tensor] = {}
        self.research = research

    def run(
        self,
        calls: list[UNetCall],
        x: torch.Tensor,
        t,
        conds: list[Conditioning],
        counters: Counters,
        fuse: bool = False,
    ) -> list:
        """Execute calls (all of one mode) in one UNet invocation; returns (eps, similarity) per call.
        ``fuse``: the caller found this a step's only call; its adapters run fused (see ``Router``)."""
        mode = calls[0].mode
        rows = x.shape[0]
        router = self.adapters.unet
        if len(calls) == 1:
            router.set(calls[0].adapters, fuse=fuse)
            xb, embeds, added = x, conds[0].embeds, conds[0].added
        else:
            router.set_rows(
                [RowGroup(slice(k * rows, (k + 1) * rows), c.adapters) for k, c in enumerate(calls)]
            )
            xb = torch.cat([x] * len(calls))
            embeds = torch.cat([c.embeds for c in conds])
            added = (
                None
                if conds[0].added is None
                else {key: torch.cat([c.added[key] for c in conds]) for key in conds[0].added}
            )
        signature = (mode, tuple(xb.shape), tuple(embeds.shape), tuple(c.adapters for c in calls), fuse)
        keys = [c.cache_key or "+".join(n for n, _ in c.adapters) for c in calls]
        similarities: list[float | None] = [None] * len(calls)
        _wait_for_device(x)
        start = time.perf_counter()
        try:
            if mode == "plain":
                out, macs = self.macs.count(
                    signature,
                    lambda: self.unet(
                        xb, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False
                    )[0],
                )
            else:
                if self.split is None:
                    raise RuntimeError(
                        "plan asks for a cached/full split call but the method has no cache point"
                    )
                entry = None
                if mode == "cached":
                    missing = [k for k in keys if k not in self.cache]
                    if missing:
                        raise RuntimeError(
                            f"plan asks for cached calls of {missing} before any full call stored them"
                        )
                    entry = torch.cat([self.cache[k] for k in keys]) if len(keys) > 1 else self.cache[keys[0]]
                (out, new_entry), macs = self.macs.count(
                    signature, lambda: self.split(xb, t, embeds, added, entry=entry)
                )
                if mode == "full":
                    for k, key in enumerate(keys):
                        fresh = new_entry[k * rows : (k + 1) * rows]
                        if self.research and key in self.cache:
                            similarities[k] = float(
                                torch.nn.functional.cosine_similarity(
                                    self.cache[key].flatten().float(), fresh.flatten().float(), dim=0
                                )
                            )
                        self.cache[key] = fresh
        finally:
            router.clear()
        _wait_for_device(x)
        counters.unet_seconds += time.perf_counter() - start
        counters.macs += macs
        if mode == "cached":
            counters.cached_calls += len(calls)
        else:
            counters.full_calls += len(calls)
        counters.invocations += 1
        return list(zip(out.split(rows), similarities, strict=True))


def _wait_for_device(x: torch.Tensor) -> None:
    """CUDA kernels run asynchronously: without a barrier around each UNet call, its seconds would be
    launch time only and the time outside UNet calls would absorb the GPU's work. One barrier per call
    costs the overlap of a few kernel launches, far under a UNet call."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _groups(calls: tuple[UNetCall, ...], batch: bool) -> list[list[int]]:
    """Indices of calls executed together: one per call, or one per mode when batching."""
    if not batch:
        return [[k] for k in range(len(calls))]
    by_mode: dict[str, list[int]] = {}
    for k, call in enumerate(calls):
        by_mode.setdefault(call.mode, []).append(k)
    return list(by_mode.values())


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
    batch: bool = False,
    fuse: bool = False,
) -> tuple[torch.Tensor, Counters]:
    """Run the trajectory. ``conditionings`` holds one entry per embedding key the method uses.

    ``fuse`` applies to steps of one UNet call (merge, switch): their adapter set holds for many
    calls, so fusing it into the weights pays once. Steps of several calls change the set per
    call and run un-fused."""
    from .frequency import latent_high_frequency

    cfg = guidance_scale > 1.0
    point = None
    if method.uses_cache:
        layer, block = method.cache_point
        if block is None:  # not given: this UNet's default, written back for the record
            block = default_cache_block(pipe.unet, layer)
            method.cache_point = (layer, block)
        point = CachePoint(layer, block)
    executor = CallExecutor(pipe, adapters, macs, point, research)
    counters = Counters()
    loop_start = time.perf_counter()
    for i, t in enumerate(scheduler.timesteps):
        hf = latent_high_frequency(latents) if (method.needs_high_frequency or research) else None
        plan = method.plan(i, StepState(high_frequency=hf))
        x = torch.cat([latents, latents]) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        mixed = None
        similarities = {}
        results: list = [None] * len(plan.calls)
        fuse_step = fuse and len(plan.calls) == 1
        for group in _groups(plan.calls, batch):
            calls = [plan.calls[k] for k in group]
            conds = [conditionings[c.embedding] for c in calls]
            for k, result in zip(group, executor.run(calls, x, t, conds, counters, fuse_step), strict=True):
                results[k] = result
        for call, (_, similarity) in zip(plan.calls, results, strict=True):
            if similarity is not None:
                similarities[call.cache_key] = round(similarity, 6)
        patch_weights = None
        if plan.mix is not None:
            preds = [eps.float() for eps, _ in results]
            mixed, patch_weights = plan.mix.guided(preds, plan.weights, guidance_scale if cfg else None)
        else:
            for weight, (eps, _) in zip(plan.weights, results, strict=True):
                term = eps.float() * weight
                mixed = term if mixed is None else mixed + term
            if cfg:
                uncond, cond = mixed.chunk(2)
                mixed = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(mixed.to(latents.dtype), t, latents, return_dict=False)[0]
        entry = plan.trace()
        if patch_weights is not None:
            entry["patch_weights"] = {
                (plan.calls[k].cache_key or plan.calls[k].adapters[0][0]): round(w, 6)
                for k, w in patch_weights.items()
            }
        entry["t"] = int(t) if torch.is_tensor(t) and t.numel() == 1 else float(t)
        if research:
            entry["high_frequency"] = None if hf is None else round(hf, 6)
            entry["cache_similarity"] = similarities
        counters.trace.append(entry)
        if on_step is not None:
            on_step(i, plan)
    counters.loop_seconds = time.perf_counter() - loop_start
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

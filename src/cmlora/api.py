"""Public API: ``compose(pipe, loras, method=..., ...)`` and the reusable ``Composer`` session.

Read top to bottom: ``Composer`` loads the LoRAs into the user's pipeline (all files checked
before anything changes), ``generate`` builds the method's plans and runs the one loop in
``sampler.denoise`` per image, then leaves the pipeline as it found it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .adapters import AdapterSet, installed_in
from .calls import Conditioning
from .compiled import check_backend, compile_blocks, composing, uncompile_blocks
from .errors import OptionError
from .loras import LoRA, LoRAFile, load_lora_tensors, read_lora_file, resolve
from .macs import MacCounter
from .methods import Method
from .plans import StepPlan
from .records import library_versions
from .request import GenerationRecord, GenerationRequest, check_loras, seeds_from
from .sampler import Denoiser, check_latents, decode, denoise, encode_prompt


@dataclass
class ComposeResult:
    images: list = field(default_factory=list)
    records: list[GenerationRecord] = field(default_factory=list)


class Composer:
    """LoRAs installed in a pipeline for several generations (sweeps, the web app).

    Use as a context manager, or call ``close()``: the pipeline gets its original modules back.
    """

    def __init__(
        self,
        pipe,
        loras: Sequence[LoRA],
        allow_partial: bool = False,
        allow_pickle: bool = False,
        model_name: str | None = None,
    ):
        """``model_name`` is what records call the base model (default: the pipeline's own path)."""
        if installed_in(pipe):
            raise OptionError(
                "this pipeline already has an open cmlora Composer (its LoRAs are installed): use that "
                "one, or close() it (or leave its `with` block) before opening another"
            )
        self.pipe = pipe
        self.loras = check_loras(loras)
        self.model_name = model_name
        # every file judged from its header and resolved against the pipeline (shapes only) before
        # any tensor is read; then only the pairs that land are read
        files: list[LoRAFile] = [
            read_lora_file(lora.path, allow_pickle=allow_pickle, tensors=False) for lora in self.loras
        ]
        resolved = [resolve(f, pipe, allow_partial=allow_partial) for f in files]
        for lora_file, items in zip(files, resolved, strict=True):
            load_lora_tensors(lora_file, [item.weights for item in items])
        self.files = {lora.adapter: f for lora, f in zip(self.loras, files, strict=True)}
        self.adapters = AdapterSet(pipe)
        try:
            for lora, lora_file, items in zip(self.loras, files, resolved, strict=True):
                self.adapters.attach(lora.adapter, lora_file, items)
        except BaseException:
            self.adapters.detach()
            raise
        self.macs = MacCounter(pipe.unet)
        self.compiled = False
        for lora_file in files:  # tensors now live in the wrappers, on the model's device
            lora_file.modules.clear()

    def compile(self, **options) -> None:
        """``torch.compile`` the UNet's blocks for this session (``options`` go to torch.compile,
        e.g. ``mode="max-autotune"``); switching LoRAs does not recompile. Undone by ``close()``."""
        if not self.compiled:
            check_backend(options.get("backend", "inductor"))
            self.adapters.stack()
            compile_blocks(self.pipe.unet, **options)
            self.compiled = True

    def __enter__(self) -> Composer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.compiled:
            uncompile_blocks(self.pipe.unet)
            self.compiled = False
        self.adapters.detach()

    # ------------------------------------------------------------------ generation

    def _profile_options(self, request: GenerationRequest) -> dict:
        """The H/L partition a request's profile gives this session's files (an explicit order or
        partition never meets a profile: the request refused that)."""
        if request.profile is None:
            return {}
        pf = request.profile
        threshold = pf.settings.get("threshold")
        threshold = (
            threshold if isinstance(threshold, int | float) and not isinstance(threshold, bool) else None
        )
        _, high, low = pf.order_for({name: f.sha256 for name, f in self.files.items()}, threshold=threshold)
        return {"high": list(high), "low": list(low)}

    def generate(
        self,
        prompt: str,
        method: str = "cmlora",
        variant: str | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] = 0,
        num_images: int = 1,
        lora_scale: float = 1.0,
        profile=None,
        research: bool = False,
        progress: bool = True,
        on_step: Callable[[int, StepPlan], None] | None = None,
        batch_calls: bool = True,
        batch_size: int = 1,
        fuse_loras: bool = True,
        **options,
    ) -> ComposeResult:
        """Keyword form of :meth:`run`: builds the ``GenerationRequest`` (which checks every value)
        for this session's LoRAs. ``batch_calls=False`` and ``fuse_loras=False`` trade speed for
        memory (README, Speed)."""
        request = GenerationRequest(
            loras=self.loras,
            prompt=prompt,
            method=method,
            variant=variant,
            options=options,
            negative_prompt=negative_prompt,
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            seeds=seeds_from(seed, num_images),
            lora_scale=lora_scale,
            profile=profile,
            research=research,
            batch_calls=batch_calls,
            batch_size=batch_size,
            fuse_loras=fuse_loras,
        )
        return self.run(request, progress=progress, on_step=on_step)

    def run(
        self,
        request: GenerationRequest,
        progress: bool = True,
        on_step: Callable[[int, StepPlan], None] | None = None,
    ) -> ComposeResult:
        """Generate a request's images. ``batch_size`` seeds are denoised together, one UNet call
        serving all of them; a method whose plan reads the latents (cmlora online) and ``research``
        runs keep one image per loop, since their per-step statistic would mix the images; each
        record says its batch size."""
        if request.loras != self.loras:
            raise OptionError(
                f"the request's LoRAs {[lora.adapter for lora in request.loras]} are not this session's "
                f"{[lora.adapter for lora in self.loras]}: open a Composer with the request's LoRAs"
            )
        height, width = self._size(request)
        fuse = request.fuse_loras and not self.compiled  # compiled graphs select stacked adapters instead
        if not fuse:
            self.adapters.release_fused()
        profile_options = self._profile_options(request)
        probe = request.build_method(profile_options)
        size = 1 if probe.needs_high_frequency or request.research else request.batch_size
        seeds = list(request.seeds)
        result = ComposeResult()
        for first in range(0, len(seeds), size):
            images, records = self._images(
                request.build_method(profile_options),
                request,
                height,
                width,
                seeds[first : first + size],
                progress,
                on_step,
                fuse,
            )
            result.images.extend(images)
            result.records.extend(records)
        return result

    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        """The request's size, or the model's default; a model whose VAE shrinks more than 8x needs
        sides that are multiples of its own factor."""
        pipe = self.pipe
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        default = int(pipe.unet.config.sample_size) * factor
        height = default if request.height is None else request.height
        width = default if request.width is None else request.width
        for label, value in (("height", height), ("width", width)):
            if value % factor:
                raise OptionError(
                    f"{label} must be a positive multiple of {factor} for this model, got {value}"
                )
        return height, width

    def _images(
        self,
        method: Method,
        request: GenerationRequest,
        height: int,
        width: int,
        seeds: list[int],
        progress: bool,
        on_step: Callable[[int, StepPlan], None] | None,
        fuse: bool,
    ) -> tuple[list, list[GenerationRecord]]:
        """One denoising loop for ``seeds`` together; per-image records share its counts and split
        its time and MACs evenly."""
        pipe = self.pipe
        start = time.perf_counter()
        steps, guidance = request.steps, request.guidance_scale
        rows = len(seeds)
        with torch.inference_mode(), composing() if self.compiled else nullcontext():
            conditionings = self._encode(
                method, request.prompt, request.negative_prompt, guidance > 1.0, height, width
            )
            if rows > 1:
                conditionings = {key: _per_image(c, rows) for key, c in conditionings.items()}
            scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            device = pipe._execution_device
            scheduler.set_timesteps(steps, device=device)
            noise = torch.cat([_initial_latents(pipe, seed, height, width, device) for seed in seeds])
            latents = noise * scheduler.init_noise_sigma
            bar = _progress(steps, progress, method)
            try:

                def step_callback(i: int, plan: StepPlan) -> None:
                    bar.update(1) if bar is not None else None
                    if on_step is not None:
                        on_step(i, plan)

                denoiser = Denoiser(
                    pipe,
                    self.adapters,
                    method,
                    conditionings,
                    guidance,
                    self.macs,
                    research=request.research,
                    batch=request.batch_calls,
                    fuse=fuse,
                )
                latents = denoise(denoiser, latents, scheduler, on_step=step_callback)
            finally:
                if bar is not None:
                    bar.close()
                self.adapters.unet.clear()
            check_latents(latents)
            images = decode(pipe, latents)
        seconds = time.perf_counter() - start
        counters = denoiser.counters
        records = [
            GenerationRecord(
                base_model=self.model_name
                or str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or ""),
                pipeline=type(pipe).__name__,
                loras=[
                    {
                        "name": lora.adapter,
                        "file": str(lora.path),
                        "sha256": self.files[lora.adapter].sha256,
                        "format": self.files[lora.adapter].format,
                        "weight": lora.weight,
                        "category": lora.category,
                        "triggers": list(lora.triggers),
                    }
                    for lora in self.loras
                ],
                method=method.name,
                variant=method.variant,
                options=method.options(),
                lora_scale=method.comp.lora_scale,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                seed=seed,
                height=height,
                width=width,
                steps=steps,
                guidance_scale=guidance,
                scheduler=type(scheduler).__name__,
                # diffusers' private keys ("_use_default_values") vary run to run: records must not
                scheduler_config={k: v for k, v in scheduler.config.items() if not k.startswith("_")},
                dtype=str(pipe.unet.dtype).replace("torch.", ""),
                device=str(pipe._execution_device),
                versions=library_versions(),
                full_calls=counters.full_calls,
                cached_calls=counters.cached_calls,
                macs=round(counters.macs / rows),
                seconds=round(seconds / rows, 4),
                unet_seconds=round(counters.unet_seconds / rows, 4),
                loop_seconds=round(counters.loop_seconds / rows, 4),
                unet_invocations=counters.invocations,
                batched_calls=request.batch_calls,
                fused_loras=fuse,
                batch_size=rows,
                trace=counters.trace,
                method_label=request.label,
            )
            for seed in seeds
        ]
        return images, records

    def _encode(self, method: Method, prompt, negative_prompt, cfg, height, width) -> dict[str, Conditioning]:
        """One text-encoder pass per distinct text-encoder activation the method needs."""
        te_loras = {name for name, components in self.adapters.components.items() if components - {"unet"}}
        out: dict[str, Conditioning] = {}
        by_activation: dict[tuple, Conditioning] = {}
        for key in method.embedding_keys():
            activation = tuple((n, s) for n, s in method.text_activation(key) if n in te_loras)
            if activation not in by_activation:
                with self.adapters.text_active(activation):
                    by_activation[activation] = encode_prompt(
                        self.pipe, prompt, negative_prompt, cfg, height, width
                    )
            out[key] = by_activation[activation]
        return out


def compose(
    pipe,
    loras: Sequence[LoRA],
    method: str = "cmlora",
    variant: str | None = None,
    prompt: str = "",
    allow_partial: bool = False,
    allow_pickle: bool = False,
    **kwargs,
) -> ComposeResult:
    """Generate with a multi-LoRA method; the pipeline is left exactly as it was found."""
    with Composer(pipe, loras, allow_partial=allow_partial, allow_pickle=allow_pickle) as composer:
        return composer.generate(prompt=prompt, method=method, variant=variant, **kwargs)


def _per_image(cond: Conditioning, images: int) -> Conditioning:
    """Repeat each conditioning row once per image: with CFG, [uncond; cond] becomes
    [uncond x B; cond x B], the order ``torch.cat([latents, latents])`` gives the latents."""
    added = None if cond.added is None else {k: v.repeat_interleave(images, 0) for k, v in cond.added.items()}
    return Conditioning(cond.embeds.repeat_interleave(images, 0), added)


def _initial_latents(pipe, seed: int, height: int, width: int, device) -> torch.Tensor:
    """Noise from a CPU generator seeded per image: the same on every device, and independent of
    whatever ran before (no shared generator whose state leaks between images)."""
    factor = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // factor, width // factor)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=pipe.unet.dtype)


def _progress(steps: int, enabled: bool, method: Method):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    label = method.name + (f"-{method.variant}" if method.variant else "")
    return tqdm(total=steps, desc=label, unit="step", leave=False)

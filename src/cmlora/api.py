"""Public API: ``compose(pipe, loras, method=..., ...)`` and the reusable ``Composer`` session.

Read top to bottom: ``Composer`` loads the LoRAs into the user's pipeline (all files checked
before anything changes), ``generate`` builds the method's plans and runs the one loop in
``sampler.denoise`` per image, then leaves the pipeline as it found it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import AdapterSet, installed_in
from .compiled import check_backend, compile_blocks, composing, uncompile_blocks
from .errors import OptionError
from .loras import MAX_STRENGTH, LoRA, LoRAFile, load_lora_tensors, read_lora_file, resolve
from .macs import MacCounter
from .methods import Composition, Method, build_method, default_variant, method_label, reads_profile
from .plans import StepPlan
from .records import library_versions
from .sampler import Conditioning, check_latents, decode, denoise, encode_prompt

MAX_SEED = 2**63 - 1


@dataclass
class ComposeResult:
    images: list = field(default_factory=list)
    records: list[dict] = field(default_factory=list)


def _check_loras(loras: Sequence[LoRA]) -> list[LoRA]:
    loras = [lora if isinstance(lora, LoRA) else LoRA(lora) for lora in loras]
    names = [lora.adapter for lora in loras]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise OptionError(f"duplicate LoRA/adapter names {duplicates}: give each LoRA a distinct name=")
    paths = [str(Path(lora.path).resolve()) for lora in loras]
    same = sorted({p for p in paths if paths.count(p) > 1})
    if same:
        raise OptionError(f"the same LoRA file is listed twice: {same}")
    return loras


class Composer:
    """LoRAs installed in a pipeline for several generations (sweeps, the web app).

    Use as a context manager, or call ``close()``: the pipeline gets its original modules back.
    """

    def __init__(self, pipe, loras: Sequence[LoRA], allow_partial: bool = False, allow_pickle: bool = False):
        if installed_in(pipe):
            raise OptionError(
                "this pipeline already has an open cmlora Composer (its LoRAs are installed): use that "
                "one, or close() it (or leave its `with` block) before opening another"
            )
        self.pipe = pipe
        self.loras = _check_loras(loras)
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

    def _composition(self, steps: int, lora_scale: float) -> Composition:
        return Composition(
            names=tuple(lora.adapter for lora in self.loras),
            weights={lora.adapter: float(lora.weight) for lora in self.loras},
            categories={lora.adapter: lora.category for lora in self.loras},
            num_steps=steps,
            lora_scale=lora_scale,
        )

    def _profile_options(self, profile, method: str, variant: str | None, options: dict) -> dict:
        """A profile file sets the H/L partition of the methods that read one (cmlora,
        switch-profiled); an explicit order/partition wins, loudly."""
        if profile is None:
            return options
        if not reads_profile(method, variant):
            label = method_label(method, variant)
            raise OptionError(
                f"profile= sets the LoRA order of cmlora and switch-profiled only (method is {label!r})"
            )
        given = sorted(set(options) & {"order", "high", "low"})
        if given:
            raise OptionError(
                f"profile= conflicts with {given}: give either a profile or an explicit order/partition"
            )
        from .profiles import ProfileFile

        pf = profile if isinstance(profile, ProfileFile) else ProfileFile.load(profile)
        threshold = pf.settings.get("threshold")
        threshold = (
            threshold if isinstance(threshold, int | float) and not isinstance(threshold, bool) else None
        )
        _, high, low = pf.order_for({name: f.sha256 for name, f in self.files.items()}, threshold=threshold)
        return {**options, "high": list(high), "low": list(low)}

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
        # Batched per-LoRA calls were never slower on CPU (mini: composite N=5 1.86x; SD-1.5 256 px:
        # 1.32x, +0.5 GB peak; README, Speed, `benchmarks/speed.py --batch both`). False saves memory.
        batch_calls: bool = True,
        batch_size: int = 1,
        # Steps of one UNet call (merge, switch) run their LoRAs fused into the weights; this holds one
        # copy of each LoRA-wrapped layer's weight while the Composer lives. False saves that memory.
        fuse_loras: bool = True,
        **options,
    ) -> ComposeResult:
        """``batch_size`` seeds are denoised together, one UNet call serving all of them. A small
        model on a CPU pays per call, not per row (the mini UNet: 44 ms at 2 rows, 43 at 4), so two
        seeds of merge took 1.92 s instead of 3.30. A method whose plan reads the latents (cmlora
        online) and ``research`` runs keep one image per loop, since their per-step statistic would
        mix the images; each record says its batch size."""
        pipe = self.pipe
        height, width = _check_size(pipe, height, width)
        seeds = _check_seeds(seed, num_images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OptionError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(prompt, str):
            raise OptionError(f"prompt must be a string, got {type(prompt).__name__}")
        if (
            not isinstance(guidance_scale, int | float)
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise OptionError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not (1 <= num_inference_steps <= 1000)
        ):
            raise OptionError(
                f"num_inference_steps must be an integer in [1, 1000], got {num_inference_steps!r}"
            )
        if (
            isinstance(lora_scale, bool)
            or not isinstance(lora_scale, int | float)
            or not math.isfinite(lora_scale)
            or not 0 <= lora_scale <= MAX_STRENGTH
        ):
            raise OptionError(f"lora_scale must be a number in [0, {MAX_STRENGTH:g}], got {lora_scale!r}")
        variant = variant or default_variant(method)
        options = self._profile_options(profile, method, variant, options)
        batch = bool(batch_calls)
        fuse = bool(fuse_loras) and not self.compiled  # compiled graphs select stacked adapters instead
        if not fuse:
            self.adapters.release_fused()
        comp = self._composition(num_inference_steps, float(lora_scale))
        probe = build_method(method, comp, variant, **options)  # validate every option before any work
        size = 1 if probe.needs_high_frequency or research else batch_size
        result = ComposeResult()
        for first in range(0, len(seeds), size):
            fresh = build_method(method, comp, variant, **options)
            images, records = self._images(
                fresh,
                prompt,
                negative_prompt,
                num_inference_steps,
                guidance_scale,
                height,
                width,
                seeds[first : first + size],
                research,
                progress,
                on_step,
                batch,
                fuse,
            )
            for record in records:
                record["method_label"] = method_label(method, variant)
            result.images.extend(images)
            result.records.extend(records)
        return result

    def _images(
        self,
        method: Method,
        prompt,
        negative_prompt,
        steps,
        guidance,
        height,
        width,
        seeds: list[int],
        research,
        progress,
        on_step,
        batch,
        fuse,
    ) -> tuple[list, list[dict]]:
        """One denoising loop for ``seeds`` together; per-image records share its counts and split
        its time and MACs evenly."""
        pipe = self.pipe
        start = time.perf_counter()
        cfg = guidance > 1.0
        rows = len(seeds)
        with torch.inference_mode(), composing() if self.compiled else nullcontext():
            conditionings = self._encode(method, prompt, negative_prompt, cfg, height, width)
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

                latents, counters = denoise(
                    pipe,
                    self.adapters,
                    method,
                    conditionings,
                    latents,
                    scheduler,
                    guidance,
                    self.macs,
                    research=research,
                    on_step=step_callback,
                    batch=batch,
                    fuse=fuse,
                )
            finally:
                if bar is not None:
                    bar.close()
                self.adapters.unet.clear()
            check_latents(latents)
            images = decode(pipe, latents)
        seconds = time.perf_counter() - start
        records = []
        for seed in seeds:
            record = self._record(
                method, prompt, negative_prompt, steps, guidance, height, width, seed, scheduler
            )
            record.update(
                full_calls=counters.full_calls,
                cached_calls=counters.cached_calls,
                macs=round(counters.macs / rows),
                seconds=round(seconds / rows, 4),
                unet_seconds=round(counters.unet_seconds / rows, 4),
                loop_seconds=round(counters.loop_seconds / rows, 4),
                unet_invocations=counters.invocations,
                batched_calls=batch,
                fused_loras=fuse,
                batch_size=rows,
                trace=counters.trace,
            )
            records.append(record)
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

    def _record(
        self, method: Method, prompt, negative_prompt, steps, guidance, height, width, seed, scheduler
    ) -> dict:
        pipe = self.pipe
        return {
            "base_model": str(
                getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or ""
            ),
            "pipeline": type(pipe).__name__,
            "loras": [
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
            "method": method.name,
            "variant": method.variant,
            "options": method.options(),
            "lora_scale": method.comp.lora_scale,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "height": height,
            "width": width,
            "steps": steps,
            "guidance_scale": guidance,
            "scheduler": type(scheduler).__name__,
            # diffusers' private keys ("_use_default_values") vary run to run: records must not
            "scheduler_config": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
            "dtype": str(pipe.unet.dtype).replace("torch.", ""),
            "device": str(pipe._execution_device),
            "versions": library_versions(),
        }


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


def _check_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    default = int(pipe.unet.config.sample_size) * factor
    height = default if height is None else height
    width = default if width is None else width
    multiple = max(8, factor)
    for label, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise OptionError(f"{label} must be a positive multiple of {multiple}, got {value!r}")
        if value > 8192:
            raise OptionError(f"{label} {value} is larger than 8192 pixels")
    return height, width


def _check_seeds(seed, num_images: int) -> list[int]:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise OptionError(f"num_images must be an integer >= 1, got {num_images!r}")
    seeds = (
        list(seed)
        if isinstance(seed, list | tuple)
        else [seed + k if isinstance(seed, int) else seed for k in range(num_images)]
    )
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise OptionError(f"seed must be an integer in [0, 2**63-1], got {s!r}")
    return seeds


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

"""What the core is asked for and what it gives back: ``GenerationRequest`` and ``GenerationRecord``.

Every front-end (CLI, sweep, web app, the Python API) builds a ``GenerationRequest``; its
constructor checks every rule of a request, here and nowhere else, so a front-end never re-writes
a check and the sampler never sees an unchecked value. ``dataclasses.replace`` re-runs the checks,
so a request changed for another method or seed is checked again.

The core answers with one ``GenerationRecord`` per image: typed, immutable, and a read-only
mapping with the keys and order of the JSON record that PNGs and sidecars carry, so front-ends
read it (``record["seed"]``) and serialise it, but cannot edit what the core measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import OptionError
from .loras import MAX_STRENGTH, LoRA
from .methods import (
    METHOD_VARIANTS,
    METHODS,
    Composition,
    build_method,
    default_variant,
    method_label,
    reads_profile,
    split_label,
)
from .methods.base import check_float, check_int

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
MAX_SIDE = 8192
#: Latent sizes of every supported UNet are 1/8 of the image; a model with a larger VAE factor
#: asks for more (``Composer`` checks that against the loaded model).
SIZE_MULTIPLE = 8
#: Options that fix the LoRA order or partition by hand; a profile would set them too.
ORDER_OPTIONS = ("order", "high", "low")


def check_loras(loras: Sequence[LoRA | str | Path]) -> tuple[LoRA, ...]:
    """LoRAs of one composition: each a ``LoRA`` (a bare path becomes one), distinct adapter names,
    distinct files (the same file twice would be counted twice by every method)."""
    if isinstance(loras, str | Path | LoRA):
        raise OptionError("loras must be a list of LoRA (or file paths), got a single one: wrap it in [ ]")
    checked = tuple(lora if isinstance(lora, LoRA) else LoRA(lora) for lora in loras)
    names = [lora.adapter for lora in checked]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise OptionError(f"duplicate LoRA/adapter names {duplicates}: give each LoRA a distinct name=")
    paths = [str(Path(lora.path).resolve()) for lora in checked]
    same = sorted({p for p in paths if paths.count(p) > 1})
    if same:
        raise OptionError(f"the same LoRA file is listed twice: {same}")
    return checked


def resolve_method(method: object, variant: str | None = None) -> tuple[str, str | None]:
    """(name, variant) of a method name plus optional variant, or of a label such as
    ``cmlora-online``; a label that already names a variant takes no other."""
    if not isinstance(method, str):
        raise OptionError(f"method must be a string, got {method!r}")
    if method in METHODS:
        if variant is None:
            return method, default_variant(method)
        variants = METHOD_VARIANTS.get(method)
        if variants is None:
            raise OptionError(
                f"method {method!r} has no variants (got variant={variant!r}); {', '.join(METHOD_VARIANTS)} do"
            )
        if variant not in variants:
            raise OptionError(f"unknown {method} variant {variant!r}; choose one of {', '.join(variants)}")
        return method, variant
    name, named = split_label(method)
    if variant is not None and variant != named:
        raise OptionError(f"method {method!r} already names a variant: drop variant={variant!r}")
    return name, named


def check_seeds(seeds: object) -> tuple[int, ...]:
    """At least one seed, each an integer a CPU generator takes (profiling uses the rule too)."""
    seeds = tuple(seeds) if isinstance(seeds, list | tuple) else (seeds,)
    if not seeds:
        raise OptionError("seeds is empty: give at least one seed")
    for s in seeds:
        if not _is_int(s) or not 0 <= s <= MAX_SEED:
            raise OptionError(f"seed must be an integer in [0, 2**63-1], got {s!r}")
    return seeds  # type: ignore[return-value]


def seeds_from(seed: int | Sequence[int], num_images: int = 1) -> tuple[int, ...]:
    """``seed, seed+1, ...`` for ``num_images`` images, or an explicit list of seeds."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise OptionError(f"num_images must be an integer >= 1, got {num_images!r}")
    if isinstance(seed, list | tuple):
        return tuple(seed)
    return tuple(seed + k if _is_int(seed) else seed for k in range(num_images))  # type: ignore[operator]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the LoRAs, the method with its options, the sampling settings and the seeds.

    ``method`` is a method name (``variant`` picks a variant) or a label such as ``cmlora-online``;
    once checked, ``method`` holds the label and ``variant`` None (``method_name`` and
    ``method_variant`` give the parts).
    ``height``/``width`` None mean the model's default size. ``profile`` (a file written by
    ``cmlora profile``, or a loaded ``ProfileFile``) orders the LoRAs of the methods that read one.
    ``batch_size`` seeds are denoised together; ``batch_calls`` runs the per-LoRA calls of one step
    as one batched call; ``fuse_loras`` fuses the LoRAs of one-call steps into the weights.
    """

    loras: tuple[LoRA, ...]
    prompt: str = ""
    method: str = "cmlora"
    variant: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    negative_prompt: str | None = None
    steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    seeds: tuple[int, ...] = (0,)
    lora_scale: float = 1.0
    profile: Any = None
    research: bool = False
    batch_calls: bool = True
    batch_size: int = 1
    fuse_loras: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "loras", check_loras(self.loras))
        if not isinstance(self.prompt, str):
            raise OptionError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise OptionError(
                f"negative_prompt must be a string or None, got {type(self.negative_prompt).__name__}"
            )
        # ``method`` keeps the label and ``variant`` None, so ``replace(request, method=...)`` never
        # carries the old method's variant over to the new one
        name, variant = resolve_method(self.method, self.variant)
        set_(self, "method", method_label(name, variant))
        set_(self, "variant", None)
        set_(self, "_resolved", (name, variant))
        # values are checked, not converted: records keep the number the user gave (5, not 5.0)
        check_int("num_inference_steps", self.steps, 1, MAX_STEPS)
        check_float("guidance_scale", self.guidance_scale, 0)
        if not _is_number(self.lora_scale) or not 0 <= self.lora_scale <= MAX_STRENGTH:
            raise OptionError(
                f"lora_scale must be a number in [0, {MAX_STRENGTH:g}], got {self.lora_scale!r}"
            )
        for label, value in (("height", self.height), ("width", self.width)):
            if value is None:
                continue
            if not _is_int(value) or value <= 0 or value % SIZE_MULTIPLE:
                raise OptionError(f"{label} must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}")
            if value > MAX_SIDE:
                raise OptionError(f"{label} {value} is larger than {MAX_SIDE} pixels")
        set_(self, "seeds", check_seeds(self.seeds))
        check_int("batch_size", self.batch_size, 1)
        if not isinstance(self.options, Mapping):
            raise OptionError(f"options must be a mapping of option name to value, got {self.options!r}")
        set_(self, "options", MappingProxyType(dict(self.options)))
        set_(self, "profile", self._checked_profile())
        self.build_method()  # every option's value judged by its method, before any work

    def _checked_profile(self):
        """A profile is loaded (and so checked) here; only the methods that read one take it, and
        it conflicts with an order or partition given by hand."""
        if self.profile is None:
            return None
        if not reads_profile(self.method_name, self.method_variant):
            raise OptionError(
                f"profile= sets the LoRA order of cmlora and switch-profiled only (method is {self.label!r})"
            )
        given = sorted(set(self.options) & set(ORDER_OPTIONS))
        if given:
            raise OptionError(
                f"profile= conflicts with {given}: give either a profile or an explicit order/partition"
            )
        from .profiles import ProfileFile

        return self.profile if isinstance(self.profile, ProfileFile) else ProfileFile.load(self.profile)

    @property
    def label(self) -> str:
        return self.method

    @property
    def method_name(self) -> str:
        return self._resolved[0]  # type: ignore[attr-defined]

    @property
    def method_variant(self) -> str | None:
        """The variant in effect (a method's default when the label names none)."""
        return self._resolved[1]  # type: ignore[attr-defined]

    def composition(self) -> Composition:
        return Composition(
            names=tuple(lora.adapter for lora in self.loras),
            weights={lora.adapter: float(lora.weight) for lora in self.loras},
            categories={lora.adapter: lora.category for lora in self.loras},
            num_steps=self.steps,
            lora_scale=float(self.lora_scale),
        )

    def build_method(self, extra: Mapping[str, Any] | None = None):
        """A fresh method object (methods keep per-run state); ``extra`` options are the ones a
        session derives (a profile's partition), checked by the method like the user's."""
        return build_method(
            self.method_name, self.composition(), self.method_variant, **{**self.options, **(extra or {})}
        )


@dataclass(frozen=True, eq=False)
class GenerationRecord(Mapping):
    """Everything needed to regenerate one image, and what making it cost. A read-only mapping
    whose keys and order are those of the JSON record (``records.save_image`` writes it)."""

    base_model: str
    pipeline: str
    loras: list[dict]
    method: str
    variant: str | None
    options: dict
    lora_scale: float
    prompt: str
    negative_prompt: str | None
    seed: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    scheduler: str
    scheduler_config: dict
    dtype: str
    device: str
    versions: dict
    full_calls: int
    cached_calls: int
    macs: int
    seconds: float
    unet_seconds: float
    loop_seconds: float
    unet_invocations: int
    batched_calls: bool
    fused_loras: bool
    batch_size: int
    trace: Any
    method_label: str

    def __getitem__(self, key: str) -> Any:
        if key not in _RECORD_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_RECORD_KEYS)

    def __len__(self) -> int:
        return len(_RECORD_KEYS)

    def __repr__(self) -> str:
        return f"GenerationRecord({self.method_label}, seed={self.seed}, {self.width}x{self.height})"

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (a copy) in the record's key order, e.g. to build a sweep row from."""
        return {key: getattr(self, key) for key in _RECORD_KEYS}


_RECORD_KEYS: tuple[str, ...] = tuple(f.name for f in fields(GenerationRecord))

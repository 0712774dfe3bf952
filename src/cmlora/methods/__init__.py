"""Method registry: method names, their variants and labels, and which read a frequency profile.

Front-ends ask the registry; they never spell method vocabularies themselves."""

from __future__ import annotations

import inspect

from ..errors import OptionError
from .base import Composition, Method, StepState
from .baselines import SWITCH_VARIANTS, Composite, Merge, NoneMethod, Switch
from .cmlora import VARIANTS, CMLoRA
from .loratorio import LoRAtorio

METHODS: dict[str, type[Method]] = {
    "none": NoneMethod,
    "merge": Merge,
    "switch": Switch,
    "composite": Composite,
    "cmlora": CMLoRA,
    "loratorio": LoRAtorio,
}
#: Each method's variants, the default first. A default variant that is not spelled in the label
#: ("switch" is switch-standard) keeps the labels of runs made before the variant existed.
METHOD_VARIANTS: dict[str, tuple[str, ...]] = {"switch": SWITCH_VARIANTS, "cmlora": VARIANTS}
_UNSPELLED_DEFAULT = {"switch"}

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "METHOD_VARIANTS",
    "VARIANTS",
    "Composition",
    "Method",
    "StepState",
    "build_method",
    "accepted_options",
    "default_variant",
    "method_label",
    "reads_profile",
    "split_label",
]


def default_variant(name: str) -> str | None:
    variants = METHOD_VARIANTS.get(name)
    return variants[0] if variants else None


def accepted_options(name: str) -> tuple[str, ...]:
    """The options a method takes (its constructor's keywords), ``variant`` excluded: front-ends
    ask this instead of inspecting method classes."""
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    skip = ("self", "comp", "variant")
    return tuple(p for p in inspect.signature(METHODS[name].__init__).parameters if p not in skip)


def build_method(name: str, comp: Composition, variant: str | None = None, **options: object) -> Method:
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    if variant is not None:
        if name not in METHOD_VARIANTS:
            with_variants = ", ".join(METHOD_VARIANTS)
            raise OptionError(
                f"method {name!r} has no variants (got variant={variant!r}); {with_variants} do"
            )
        options["variant"] = variant
    accepted = [*accepted_options(name), *(["variant"] if name in METHOD_VARIANTS else [])]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(f"method {name!r} has no option(s) {unknown}; its options are {accepted}")
    if comp.n == 0 and name != "none":
        raise OptionError(f"method {name!r} needs at least one LoRA (got none)")
    return cls(comp, **options)


def method_label(name: str, variant: str | None) -> str:
    """The name runs, files and tables use: ``cmlora-offline``, ``switch-profiled``, ``merge``."""
    variant = variant or default_variant(name)
    if variant is None or (name in _UNSPELLED_DEFAULT and variant == default_variant(name)):
        return name
    return f"{name}-{variant}"


METHOD_LABELS: tuple[str, ...] = tuple(
    method_label(name, variant) for name in METHODS for variant in METHOD_VARIANTS.get(name, (None,))
)


def split_label(label: str) -> tuple[str, str | None]:
    """``cmlora-online`` -> ("cmlora", "online"); a bare name with variants gets its default."""
    name, _, variant = label.partition("-")
    if name in METHODS and (label in METHOD_LABELS or (not variant and name in METHOD_VARIANTS)):
        return name, variant or default_variant(name)
    if name in METHODS and variant:
        if name not in METHOD_VARIANTS:
            raise OptionError(
                f"method {name!r} has no variants (got {label!r}); {', '.join(METHOD_VARIANTS)} do"
            )
        raise OptionError(
            f"unknown {name} variant {variant!r} in {label!r}; choose one of {', '.join(METHOD_VARIANTS[name])}"
        )
    raise OptionError(f"unknown method {label!r}; choose from {', '.join(METHOD_LABELS)}")


def reads_profile(name: str, variant: str | None) -> bool:
    """Whether the method orders and partitions its LoRAs by a frequency profile."""
    return name == "cmlora" or (name == "switch" and (variant or default_variant(name)) == "profiled")

"""Method registry: a method name (+ variant) and options become a ``Method``."""

from __future__ import annotations

import inspect

from ..errors import OptionError
from .base import Composition, Method, StepState
from .baselines import Composite, Merge, NoneMethod, Switch
from .cmlora import VARIANTS, CMLoRA

METHODS: dict[str, type[Method]] = {
    "none": NoneMethod,
    "merge": Merge,
    "switch": Switch,
    "composite": Composite,
    "cmlora": CMLoRA,
}

__all__ = ["METHODS", "VARIANTS", "Composition", "Method", "StepState", "build_method", "method_label"]


def build_method(name: str, comp: Composition, variant: str | None = None, **options: object) -> Method:
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    if variant is not None:
        if name != "cmlora":
            raise OptionError(f"method {name!r} has no variants (got variant={variant!r}); only cmlora does")
        options["variant"] = variant
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "comp")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(f"method {name!r} has no option(s) {unknown}; its options are {accepted}")
    if comp.n == 0 and name != "none":
        raise OptionError(f"method {name!r} needs at least one LoRA (got none)")
    return cls(comp, **options)


def method_label(name: str, variant: str | None) -> str:
    return f"{name}-{variant}" if name == "cmlora" else name

"""What every method knows about a composition, and the option checks they share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import OptionError
from ..plans import StepPlan

TEXT_ENCODER_POLICIES = ("all", "first", "per_lora")


@dataclass(frozen=True)
class Composition:
    """The LoRAs as methods see them: names in user order, weights a_i, categories. Built from a
    ``GenerationRequest``, which checked its values (names distinct, steps and scale in range)."""

    names: tuple[str, ...]
    weights: dict[str, float]
    categories: dict[str, str | None]
    num_steps: int
    lora_scale: float = 1.0

    @property
    def n(self) -> int:
        return len(self.names)

    def character_first(self) -> list[str]:
        """User order with character LoRAs moved to the front (switch starts with the character)."""
        chars = [n for n in self.names if self.categories.get(n) == "character"]
        return chars + [n for n in self.names if n not in chars]


@dataclass
class StepState:
    """What the sampler knows when it asks for step i's plan (online variants read it)."""

    high_frequency: float | None = None
    extra: dict = field(default_factory=dict)


class Method:
    """A method turns a composition + options into one plan per step.

    Plans are asked for in step order, so a method may keep state (the online variant's phase).
    """

    name: str = ""
    variant: str | None = None
    uses_cache: bool = False
    needs_high_frequency: bool = False
    text_encoder: str = "all"

    def __init__(self, comp: Composition):
        self.comp = comp

    def plan(self, step: int, state: StepState | None = None) -> StepPlan:
        raise NotImplementedError

    def options(self) -> dict:
        """Every option's effective value, for the record."""
        return {"text_encoder": self.text_encoder}

    def plans(self, states: list[StepState] | None = None) -> list[StepPlan]:
        """All plans of a run (states per step for the online variant)."""
        return [self.plan(i, states[i] if states else StepState()) for i in range(self.comp.num_steps)]

    def te_strength(self, name: str) -> float:
        """Strength of a LoRA in the text encoder (merge and switch use a_i as strength too)."""
        return self.comp.lora_scale

    def embedding_keys(self) -> list[str]:
        """The prompt embeddings this method's calls use (one text-encoder pass each)."""
        if self.text_encoder == "none":
            return ["none"]
        if self.text_encoder == "per_lora":
            return list(self.comp.names)
        if self.text_encoder == "first":
            return [self.comp.character_first()[0]]
        return ["all"]

    def text_activation(self, key: str) -> tuple[tuple[str, float], ...]:
        if key == "none":
            return ()
        names = self.comp.names if key == "all" else (key,)
        return tuple((n, self.te_strength(n)) for n in names)

    def embedding_for(self, name: str | None) -> str:
        if self.text_encoder == "per_lora" and name is not None:
            return name
        if self.text_encoder == "first":
            return self.comp.character_first()[0]
        return "all"


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise OptionError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def check_float(
    name: str, value: object, low: float, high: float | None = None, low_open: bool = False
) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        bound = lo if high is None else f"{lo} and <= {high}"
        raise OptionError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def cache_point_option(
    method: str, uses_cache: bool, cache_layer: object, cache_block: object
) -> tuple[int, int | None]:
    """(layer, block) of a method's cache point; block None means the UNet's default, which the
    session resolves (``Composer``). Given to a run that caches nothing they would be silently
    ignored, so they are refused."""
    if not uses_cache:
        given = [n for n, v in (("cache_layer", cache_layer), ("cache_block", cache_block)) if v is not None]
        if given:
            raise OptionError(
                f"{method}: {' and '.join(given)} set, but this run caches nothing (cache_interval 1): "
                "give cache_interval > 1, or drop them"
            )
        return 0, None
    layer = 0 if cache_layer is None else check_int("cache_layer", cache_layer, 0, 8)
    block = None if cache_block is None else check_int("cache_block", cache_block, 0, 8)
    return layer, block


def check_text_encoder(value: object) -> str:
    if value not in TEXT_ENCODER_POLICIES:
        raise OptionError(f"text_encoder policy must be one of {TEXT_ENCODER_POLICIES}, got {value!r}")
    return str(value)

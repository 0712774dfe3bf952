"""The baselines of Zhong et al. 2024: none, merge, switch, composite (optionally cached)."""

from __future__ import annotations

from ..errors import OptionError
from ..plans import StepPlan, UNetCall, mix_weights, refresh_steps
from .base import (
    Composition,
    Method,
    StepState,
    cache_point_option,
    check_float,
    check_int,
    check_text_encoder,
)
from .cmlora import PUBLISHED_PHASE_FRACTION, resolve_partition


class NoneMethod(Method):
    name = "none"

    def __init__(self, comp: Composition, text_encoder: str = "all"):
        super().__init__(comp)
        self.text_encoder = "none"

    def plan(self, step: int, state: StepState | None = None) -> StepPlan:
        return StepPlan(step, (UNetCall((), "plain", embedding="none"),), (1.0,))


class Merge(Method):
    """All adapters active at once, each at strength lora_scale * a_i."""

    name = "merge"

    def __init__(self, comp: Composition, text_encoder: str = "all"):
        super().__init__(comp)
        if check_text_encoder(text_encoder) == "per_lora":
            raise OptionError("merge runs one UNet call per step: text_encoder='per_lora' does not apply")
        self.text_encoder = text_encoder
        self._call = UNetCall(
            tuple((n, comp.lora_scale * comp.weights[n]) for n in comp.names),
            "plain",
            embedding=self.embedding_for(None),
        )

    def te_strength(self, name: str) -> float:
        return self.comp.lora_scale * self.comp.weights[name]

    def plan(self, step: int, state: StepState | None = None) -> StepPlan:
        return StepPlan(step, (self._call,), (1.0,))


SWITCH_VARIANTS = ("standard", "profiled")


class Switch(Method):
    """One adapter per step, changing every tau steps.

    standard (Zhong et al.): steps [k tau, (k+1) tau) use LoRA k mod N, character first. The
    published code gives the first LoRA tau + 1 steps (an off-by-one); this does not.

    profiled (the CMLoRA repository's "Switch-A"): the order and H/L partition resolved exactly as
    CMLoRA resolves them (explicit partition, order, profile, categories); slot k = step // tau
    rotates through H in the early phase and through (H minus its first) + L from the first slot
    at or after ``phase_fraction`` of the steps, as CMLoRA offline's dominance does, the late
    rotation starting at the first LoRA not yet active (see ``_profiled_phases``). The published
    callback's defects are not reproduced: it never activated the last LoRA of its list with more
    than 2 LoRAs, switched every step with 2, and stopped switching after step 120.
    """

    name = "switch"

    def __init__(
        self,
        comp: Composition,
        tau: int = 5,
        text_encoder: str = "first",
        variant: str = "standard",
        phase_fraction: float = PUBLISHED_PHASE_FRACTION,
        order: list[str] | None = None,
        high: list[str] | None = None,
        low: list[str] | None = None,
        scores: dict[str, float] | None = None,
    ):
        super().__init__(comp)
        if variant not in SWITCH_VARIANTS:
            raise OptionError(
                f"unknown switch variant {variant!r}; choose one of {', '.join(SWITCH_VARIANTS)}"
            )
        self.variant = variant
        self.tau = check_int("tau", tau, 1, 10_000)
        self.text_encoder = check_text_encoder(text_encoder)
        if variant == "standard":
            given = [k for k, v in (("order", order), ("high", high), ("low", low), ("scores", scores)) if v]
            if given or phase_fraction != PUBLISHED_PHASE_FRACTION:
                raise OptionError(
                    f"switch-standard takes no {given or ['phase_fraction']}: its order is character "
                    "first, then user order; use variant 'profiled' for a frequency order"
                )
            self.order = comp.character_first()
            self.high, self.low = self.order, []
            self.phase_fraction = None
        else:
            self.high, self.low = resolve_partition(comp, order, high, low, scores)
            self.order = self.high + self.low
            self.phase_fraction = check_float("phase_fraction", phase_fraction, 0.0, 1.0)
            self._profiled_phases()

    def options(self) -> dict:
        opts = {**super().options(), "variant": self.variant, "tau": self.tau, "order": self.order}
        if self.variant == "profiled":
            opts |= {"high": list(self.high), "low": list(self.low), "phase_fraction": self.phase_fraction}
        return opts

    def te_strength(self, name: str) -> float:
        return self.comp.lora_scale * self.comp.weights[name]

    def active(self, step: int) -> str:
        """The LoRA of this step."""
        slot = step // self.tau
        if self.variant == "standard":
            return self.order[slot % len(self.order)]
        if slot < self._first_late:
            return self.high[slot % len(self.high)]
        return self._late[(slot - self._first_late + self._late_start) % len(self._late)]

    def _profiled_phases(self) -> None:
        """Early slots rotate through H; late ones through (H minus its first) + L, starting at the
        first LoRA the early phase has not activated, so that every LoRA is active whenever the
        run has at least N slots (T >= N tau)."""
        self._first_late = -(-round(self.phase_fraction * self.comp.num_steps) // self.tau)
        early = {self.high[k % len(self.high)] for k in range(min(self._first_late, len(self.high)))}
        self._late = (self.high[1:] + self.low or self.high) if early else self.order
        self._late_start = next((k for k, n in enumerate(self._late) if n not in early), 0)

    def plan(self, step: int, state: StepState | None = None) -> StepPlan:
        name = self.active(step)
        call = UNetCall(
            ((name, self.comp.lora_scale * self.comp.weights[name]),),
            "plain",
            embedding=self.embedding_for(name),
        )
        return StepPlan(step, (call,), (1.0,), dominant=name)

    def embedding_for(self, name: str | None) -> str:
        # "first" means the first LoRA of this method's own order (a profiled order may not start
        # with the character)
        if self.text_encoder == "first":
            return self.order[0]
        return super().embedding_for(name)

    def embedding_keys(self) -> list[str]:
        return [self.order[0]] if self.text_encoder == "first" else super().embedding_keys()


class Composite(Method):
    """One call per LoRA per step, predictions averaged with weights a_i / sum a.

    With ``cache_interval`` c > 1 every LoRA refreshes its deep features every c steps (offsets
    spread over steps) and uses cached calls in between: the "composite + cache" ablation.
    """

    name = "composite"

    def __init__(
        self,
        comp: Composition,
        text_encoder: str = "all",
        cache_interval: int = 1,
        cache_layer: int | None = None,
        cache_block: int | None = None,
    ):
        super().__init__(comp)
        self.text_encoder = check_text_encoder(text_encoder)
        self.cache_interval = check_int("cache_interval", cache_interval, 1, 10_000)
        self.uses_cache = self.cache_interval > 1
        self.cache_point = cache_point_option(self.name, self.uses_cache, cache_layer, cache_block)
        self.weights = mix_weights(list(comp.names), comp.weights, None, 1.0)
        self.refresh = {
            n: refresh_steps(comp.num_steps, self.cache_interval, k) for k, n in enumerate(comp.names)
        }

    def options(self) -> dict:
        opts = {**super().options(), "cache_interval": self.cache_interval}
        if self.uses_cache:
            opts["cache_point"] = list(self.cache_point)
        return opts

    def plan(self, step: int, state: StepState | None = None) -> StepPlan:
        calls = []
        for name in self.comp.names:
            if not self.uses_cache:
                mode = "plain"
            else:
                mode = "full" if step in self.refresh[name] else "cached"
            calls.append(
                UNetCall(
                    ((name, self.comp.lora_scale),), mode, cache_key=name, embedding=self.embedding_for(name)
                )
            )
        return StepPlan(step, tuple(calls), self.weights)

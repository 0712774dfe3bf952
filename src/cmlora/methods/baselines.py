"""The baselines of Zhong et al. 2024: none, merge, switch, composite (optionally cached)."""

from __future__ import annotations

from ..errors import OptionError
from ..plans import StepPlan, UNetCall, mix_weights, refresh_steps
from .base import Composition, Method, StepState, check_int, check_text_encoder


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


class Switch(Method):
    """One adapter per step, changing every tau steps: steps [k tau, (k+1) tau) use LoRA k mod N.

    The published code gives the first LoRA tau + 1 steps (an off-by-one); this does not.
    """

    name = "switch"

    def __init__(self, comp: Composition, tau: int = 5, text_encoder: str = "first"):
        super().__init__(comp)
        self.tau = check_int("tau", tau, 1, 10_000)
        self.text_encoder = check_text_encoder(text_encoder)
        self.order = comp.character_first()

    def options(self) -> dict:
        return {**super().options(), "tau": self.tau, "order": self.order}

    def te_strength(self, name: str) -> float:
        return self.comp.lora_scale * self.comp.weights[name]

    def plan(self, step: int, state: StepState | None = None) -> StepPlan:
        name = self.order[(step // self.tau) % len(self.order)]
        call = UNetCall(
            ((name, self.comp.lora_scale * self.comp.weights[name]),),
            "plain",
            embedding=self.embedding_for(name),
        )
        return StepPlan(step, (call,), (1.0,), dominant=name)


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
        cache_layer: int = 0,
        cache_block: int = 1,
    ):
        super().__init__(comp)
        self.text_encoder = check_text_encoder(text_encoder)
        self.cache_interval = check_int("cache_interval", cache_interval, 1, 10_000)
        self.cache_point = (
            check_int("cache_layer", cache_layer, 0, 8),
            check_int("cache_block", cache_block, 0, 8),
        )
        self.uses_cache = self.cache_interval > 1
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

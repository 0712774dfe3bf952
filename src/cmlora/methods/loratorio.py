"""LoRAtorio-style composition (Foteinopoulou, Budvytis, Liwicki, arXiv 2508.11624), implemented
from the paper's description (no code was published): at every step the base model and each LoRA
predict the noise; each LoRA's prediction is compared with the base's per latent patch (cosine
similarity), a SoftMin over LoRAs weights them per patch, and classifier-free guidance runs against
the base model's unconditional prediction. Choices that are ours: the patch size and temperature
defaults, user weights as SoftMin priors, the "mixed" guidance alternative, and per-call feature
caching (every call, the base model's included, refreshes every ``cache_interval`` steps, refreshes
spread over steps as for composite + cache). The paper's selection of relevant LoRAs from a larger
pool is not implemented: every given LoRA takes part.
"""

from __future__ import annotations

from ..errors import OptionError
from ..patch_mix import UNCOND_POLICIES, PatchMix
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

BASE_KEY = "base"


class LoRAtorio(Method):
    """N + 1 calls per step (the base model and each LoRA), mixed per patch."""

    name = "loratorio"

    def __init__(
        self,
        comp: Composition,
        patch: int = 2,
        temperature: float = 0.05,
        uncond: str = "base",
        text_encoder: str = "all",
        cache_interval: int = 1,
        cache_layer: int | None = None,
        cache_block: int | None = None,
    ):
        super().__init__(comp)
        if BASE_KEY in comp.names:
            raise OptionError(f"loratorio names the base model's call {BASE_KEY!r}: rename that LoRA")
        if uncond not in UNCOND_POLICIES:
            raise OptionError(f"uncond must be one of {UNCOND_POLICIES}, got {uncond!r}")
        mix_weights(list(comp.names), comp.weights, None, 1.0)  # all user weights 0: refuse now (one rule)
        self.mix = PatchMix(
            base=0,
            patch=check_int("patch", patch, 1, 1024),
            temperature=check_float("temperature", temperature, 0.0, low_open=True),
            uncond=uncond,
        )
        self.text_encoder = check_text_encoder(text_encoder)
        self.cache_interval = check_int("cache_interval", cache_interval, 1, 10_000)
        self.uses_cache = self.cache_interval > 1
        self.cache_point = cache_point_option(self.name, self.uses_cache, cache_layer, cache_block)
        keys = [BASE_KEY, *comp.names]
        self.refresh = {
            key: refresh_steps(comp.num_steps, self.cache_interval, k) for k, key in enumerate(keys)
        }
        self.priors = (0.0, *(comp.weights[n] for n in comp.names))

    def options(self) -> dict:
        opts = {
            **super().options(),
            "patch": self.mix.patch,
            "temperature": self.mix.temperature,
            "uncond": self.mix.uncond,
            "cache_interval": self.cache_interval,
        }
        if self.uses_cache:
            opts["cache_point"] = list(self.cache_point)
        return opts

    def embedding_keys(self) -> list[str]:
        return ["none", *(k for k in super().embedding_keys() if k != "none")]

    def _mode(self, key: str, step: int) -> str:
        if not self.uses_cache:
            return "plain"
        return "full" if step in self.refresh[key] else "cached"

    def plan(self, step: int, state: StepState | None = None) -> StepPlan:
        base = UNetCall((), self._mode(BASE_KEY, step), cache_key=BASE_KEY, embedding="none")
        loras = tuple(
            UNetCall(
                ((n, self.comp.lora_scale),),
                self._mode(n, step),
                cache_key=n,
                embedding=self.embedding_for(n),
            )
            for n in self.comp.names
        )
        return StepPlan(step, (base, *loras), self.priors, mix=self.mix)

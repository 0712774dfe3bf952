"""CMLoRA (Zou et al., ICLR 2025): composite + a rotating dominant LoRA + per-LoRA feature caches.

Variants share one class; they differ only in *when* dominance changes and which LoRAs refresh:
- offline: dominance changes every c steps, rotating through H early and (H minus its first) + L
  late, the phase switch at a fixed fraction of the trajectory;
- online: same, but the phase switch happens when the latent's high-frequency statistic drops
  below g (evaluated at dominance boundaries, recorded every step);
- async: dominance on its own cadence, with decaying w_dom (d = 0.5);
- reference: the published offline pipeline's schedule (one LoRA refreshed per refresh step,
  becoming dominant; constant w; with a background LoRA, its absolute step-120 phase switch after
  which nothing refreshes), for comparison with published numbers.
"""

from __future__ import annotations

from ..errors import OptionError
from ..plans import StepPlan, UNetCall, decayed_w, mix_weights, refresh_steps
from .base import (
    Composition,
    Method,
    StepState,
    cache_point_option,
    check_float,
    check_int,
    check_text_encoder,
)

VARIANTS = ("offline", "online", "async", "reference")
PUBLISHED_PHASE_FRACTION = 120 / 220
PUBLISHED_ASYNC_FRACTION = 20 / 220
#: The published offline pipeline's phase test is ``i <= 120`` on the absolute step index, whatever T.
PUBLISHED_LAST_EARLY_STEP = 120
HIGH_FREQUENCY_CATEGORIES = ("character", "clothing", "style", "object")


def default_partition(comp: Composition) -> tuple[list[str], list[str]]:
    """The published ComposLoRA order: character, clothing, style, object high; background low.

    LoRAs without a category stay high-frequency, in user order, after the categorised ones; a
    composition of backgrounds only is all one group.
    """
    high = [n for cat in HIGH_FREQUENCY_CATEGORIES for n in comp.names if comp.categories.get(n) == cat]
    high += [n for n in comp.names if comp.categories.get(n) is None]
    low = [n for n in comp.names if comp.categories.get(n) == "background"]
    if not high:  # backgrounds only: they rotate as one group (dominance needs a high group)
        return low, []
    return high, low


def resolve_partition(
    comp: Composition,
    order: list[str] | None = None,
    high: list[str] | None = None,
    low: list[str] | None = None,
    scores: dict[str, float] | None = None,
) -> tuple[list[str], list[str]]:
    """(H, L) from, in priority: an explicit partition, an explicit order, profile scores, categories."""
    names = list(comp.names)
    if high is not None or low is not None:
        high, low = list(high or []), list(low or [])
        if sorted(high + low) != sorted(names) or not high:
            raise OptionError(
                f"partition high={high} low={low} must split the composition's LoRAs {names} "
                "exactly, with at least one high-frequency LoRA"
            )
        return high, low
    if order is not None:
        if sorted(order) != sorted(names):
            raise OptionError(f"order {list(order)} must list each of the composition's LoRAs {names} once")
        low = [n for n in order if comp.categories.get(n) == "background"]
        high = [n for n in order if n not in low] or list(order)
        return high, [n for n in low if n not in high]
    if scores is not None:
        missing = [n for n in names if n not in scores]
        if missing:
            raise OptionError(f"frequency scores missing for {missing}: profile these LoRAs first")
        from ..frequency import order_and_partition

        _, high, low = order_and_partition({n: scores[n] for n in names})
        return list(high), list(low)
    return default_partition(comp)


class CMLoRA(Method):
    name = "cmlora"

    def __init__(
        self,
        comp: Composition,
        variant: str = "offline",
        w_dom: float | None = None,
        decay: float | None = None,
        cache_interval: int = 3,
        intervals: dict[str, int] | None = None,
        low_interval_factor: int = 2,
        spread: bool = True,
        phase_fraction: float = PUBLISHED_PHASE_FRACTION,
        threshold: float = 0.40,
        async_interval: int | None = None,
        cache_layer: int | None = None,
        cache_block: int | None = None,
        text_encoder: str = "all",
        order: list[str] | None = None,
        high: list[str] | None = None,
        low: list[str] | None = None,
        scores: dict[str, float] | None = None,
    ):
        super().__init__(comp)
        if variant not in VARIANTS:
            raise OptionError(f"unknown cmlora variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        n, steps = comp.n, comp.num_steps
        self.w0 = check_float("w_dom", n - 0.5 if w_dom is None else w_dom, 1.0) if n > 1 else 1.0
        default_decay = 0.5 if variant == "async" else 1.0
        self.decay = check_float("decay", default_decay if decay is None else decay, 0.0, 1.0, low_open=True)
        if variant == "reference" and self.decay != 1.0:
            raise OptionError(
                "the reference variant keeps w constant (published behaviour): do not set decay"
            )
        self.c = check_int("cache_interval", cache_interval, 1, 10_000)
        if variant == "reference" and self.c < 2:
            raise OptionError(f"the reference variant needs cache_interval >= 2, got {self.c}")
        self.phase_fraction = check_float("phase_fraction", phase_fraction, 0.0, 1.0)
        self.threshold = check_float("threshold", threshold, 0.0, 1.0)
        self.async_interval = check_int(
            "async_interval",
            async_interval if async_interval is not None else max(1, round(PUBLISHED_ASYNC_FRACTION * steps)),
            1,
            10_000,
        )
        self.text_encoder = check_text_encoder(text_encoder)
        self.high, self.low = resolve_partition(comp, order, high, low, scores)
        self.order = self.high + self.low
        mix_weights(self.order, comp.weights, None, 1.0)  # all user weights 0: refuse now, not mid-run
        factor = check_int("low_interval_factor", low_interval_factor, 1, 1000)
        # cache_interval 1 means no caching at all: low-frequency LoRAs refresh every step too
        low_interval = self.c * factor if self.c > 1 else 1
        self.intervals = {name: self.c for name in self.high} | {name: low_interval for name in self.low}
        for name, value in (intervals or {}).items():
            if name not in self.intervals:
                raise OptionError(
                    f"intervals names {name!r}, which is not in the composition {list(comp.names)}"
                )
            self.intervals[name] = check_int(f"intervals[{name!r}]", value, 1, 10_000)
        self.spread = bool(spread)
        self.refresh = {
            name: refresh_steps(steps, self.intervals[name], k if self.spread else 0)
            for k, name in enumerate(self.order)
        }
        self.uses_cache = self.variant == "reference" or any(v > 1 for v in self.intervals.values())
        self.cache_point = cache_point_option(self.name, self.uses_cache, cache_layer, cache_block)
        self.needs_high_frequency = variant == "online"
        self._late_from_slot: int | None = None
        self._last_dominant: str | None = None
        self._changes = 0
        self._last_step = -1

    def options(self) -> dict:
        opts = {
            **super().options(),
            "variant": self.variant,
            "w_dom": self.w0,
            "decay": self.decay,
            "cache_interval": self.c,
            "intervals": dict(self.intervals),
            "spread": self.spread,
            "cache_point": list(self.cache_point),
            "order": list(self.order),
            "high": list(self.high),
            "low": list(self.low),
        }
        if self.variant in ("offline", "async"):
            opts["phase_fraction"] = self.phase_fraction
        if self.variant == "online":
            opts["threshold"] = self.threshold
        if self.variant == "async":
            opts["async_interval"] = self.async_interval
        return opts

    # ------------------------------------------------------------------ dominance

    def _slot_length(self) -> int:
        return self.async_interval if self.variant == "async" else self.c

    def _dominant(self, step: int, state: StepState) -> str:
        length = self._slot_length()
        slot = step // length
        late_list = self.high[1:] + self.low or self.high
        if self.variant == "online":
            at_boundary = step % length == 0
            hf = state.high_frequency
            if (
                self._late_from_slot is None
                and at_boundary
                and step > 0
                and hf is not None
                and hf < self.threshold
            ):
                self._late_from_slot = slot
        else:
            phase_step = round(self.phase_fraction * self.comp.num_steps)
            first_late = -(-phase_step // length)  # first slot starting at or after the switch
            self._late_from_slot = first_late if slot >= first_late else None
        if self._late_from_slot is None or slot < self._late_from_slot:
            return self.high[slot % len(self.high)]
        return late_list[(slot - self._late_from_slot) % len(late_list)]

    def plan(self, step: int, state: StepState | None = None) -> StepPlan:
        if step != self._last_step + 1:
            raise RuntimeError(
                f"cmlora plans must be asked in step order: got {step} after {self._last_step}"
            )
        self._last_step = step
        state = state or StepState()
        if self.variant == "reference":
            return self._reference_plan(step)
        dominant = self._dominant(step, state)
        if self._last_dominant is not None and dominant != self._last_dominant:
            self._changes += 1
        self._last_dominant = dominant
        w = decayed_w(self.w0, self.decay, self._changes)
        return self._build(step, dominant, w, {n: step in self.refresh[n] for n in self.order}, state)

    def _reference_plan(self, step: int) -> StepPlan:
        """The published offline pipeline. k counts the refresh steps (every c, from step 0)
        reached so far. Without a low-frequency LoRA: LoRA order[(k-1) mod N] is dominant and
        refreshed at each refresh step. With one (R = |H|, A = H + L): up to the absolute step
        ``PUBLISHED_LAST_EARLY_STEP`` H[(k-1) mod R] is dominant and refreshed (L only at step 0);
        after it A[(k-1) mod R + 1] is dominant and nothing is refreshed again."""
        k = step // self.c + 1
        refresh = step % self.c == 0
        if not self.low:
            dominant = self.order[(k - 1) % len(self.order)]
        elif step <= PUBLISHED_LAST_EARLY_STEP:
            dominant = self.high[(k - 1) % len(self.high)]
        else:
            dominant = self.order[(k - 1) % len(self.high) + 1]
            refresh = False
        if step == 0:
            full = {name: True for name in self.order}
        else:
            full = {name: refresh and name == dominant for name in self.order}
        return self._build(step, dominant, self.w0, full, StepState())

    def _build(self, step: int, dominant: str, w: float, full: dict[str, bool], state: StepState) -> StepPlan:
        names = list(self.order)
        weights = mix_weights(names, self.comp.weights, dominant if len(names) > 1 else None, w)
        calls = tuple(
            UNetCall(
                ((name, self.comp.lora_scale),),
                ("full" if full[name] else "cached") if self.uses_cache else "plain",
                cache_key=name,
                embedding=self.embedding_for(name),
            )
            for name in names
        )
        info = {"w_dom": round(w, 6)}
        if state.high_frequency is not None:
            info["high_frequency"] = round(state.high_frequency, 6)
        if self._late_from_slot is not None:
            info["phase"] = "late"
        elif self.variant != "reference":
            info["phase"] = "early"
        return StepPlan(step, calls, weights, dominant=dominant, info=info)

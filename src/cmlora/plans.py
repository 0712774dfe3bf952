"""Per-step plans: what a method wants the sampler to do at step i.

Methods are data producers: they never touch a model. The sampler executes a ``StepPlan``: one
UNet call per ``UNetCall`` (with the listed adapters active, full or cached), then mixes the
calls' predictions with ``weights``. This keeps every method testable without a model and keeps
one denoising loop for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import OptionError
from .patch_mix import PatchMix

CallMode = Literal["plain", "full", "cached"]
"""plain: the UNet's own forward; full: split forward storing the LoRA's cache entry;
cached: shallow part only, deep feature from the LoRA's entry."""


@dataclass(frozen=True)
class UNetCall:
    adapters: tuple[tuple[str, float], ...]
    mode: CallMode = "plain"
    cache_key: str | None = None
    embedding: str = "all"
    """Which prompt embedding the call uses: "all", "none", or an adapter name (per-LoRA policy)."""


@dataclass(frozen=True)
class StepPlan:
    step: int
    calls: tuple[UNetCall, ...]
    weights: tuple[float, ...]
    dominant: str | None = None
    info: dict = field(default_factory=dict, compare=False)
    mix: PatchMix | None = None
    """Set: the calls are mixed per patch (``weights`` are then the calls' priors), see patch_mix."""

    def __post_init__(self) -> None:
        if len(self.calls) != len(self.weights) or not self.calls:
            raise ValueError(f"step {self.step}: {len(self.calls)} calls but {len(self.weights)} weights")

    @property
    def full(self) -> tuple[str, ...]:
        return tuple(c.cache_key or _label(c) for c in self.calls if c.mode != "cached")

    @property
    def cached(self) -> tuple[str, ...]:
        return tuple(c.cache_key or _label(c) for c in self.calls if c.mode == "cached")

    def trace(self) -> dict:
        """The record's per-step entry: JSON-able and small."""
        entry = {
            "step": self.step,
            "dominant": self.dominant,
            "full": list(self.full),
            "cached": list(self.cached),
            "weights": {
                (c.cache_key or _label(c)): round(w, 6) for c, w in zip(self.calls, self.weights, strict=True)
            },
        }
        entry.update(self.info)
        return entry


def _label(call: UNetCall) -> str:
    return "+".join(name for name, _ in call.adapters) or "base"


def dominance_weights(n: int, w: float) -> tuple[float, float]:
    """(dominant, other) mixing weights before user weights: w/(w+N-1) and 1/(w+N-1)."""
    total = w + n - 1
    return w / total, 1.0 / total


def decayed_w(w0: float, decay: float, changes: int) -> float:
    """w_k = 1 + (w0 - 1) d^k: the dominant LoRA's edge shrinks but never below the others'."""
    return 1.0 + (w0 - 1.0) * decay**changes


def mix_weights(
    names: list[str], user_weights: dict[str, float], dominant: str | None, w: float
) -> tuple[float, ...]:
    dom, other = dominance_weights(len(names), w) if dominant is not None else (1.0, 1.0)
    raw = [(dom if name == dominant else other) * user_weights[name] for name in names]
    total = sum(raw)
    if total <= 0:
        raise OptionError("user weights of the composition sum to 0: give at least one LoRA a weight > 0")
    return tuple(r / total for r in raw)


def refresh_steps(num_steps: int, interval: int, offset: int) -> set[int]:
    """Steps at which a LoRA with this interval gets a full call: step 0, then every interval
    steps counted from its offset (offsets spread different LoRAs' refreshes over steps)."""
    steps = {0}
    if interval <= 1:
        return set(range(num_steps))
    start = offset % interval or interval
    steps.update(range(start, num_steps, interval))
    return steps

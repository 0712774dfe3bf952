"""Per-patch mixing of LoRA predictions (LoRAtorio-style, Foteinopoulou et al. 2025).

Each LoRA's conditional noise prediction is compared with the base model's, patch by patch: the
cosine similarity of the two over a patch's pixels and channels. A SoftMin over LoRAs (temperature
tau) turns the similarities into per-patch weights, so the LoRA that departs most from the base in a
patch gets the most weight there; user weights a_i act as priors (w_i ∝ a_i exp(-cos_i / tau)).
Limits: tau -> 0 gives each patch to the most-departing LoRA (ties split equally); tau -> infinity
gives every patch the user-weight average (composite's mix).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNCOND_POLICIES = ("base", "mixed")


def patch_cosine(pred: torch.Tensor, base: torch.Tensor, patch: int) -> torch.Tensor:
    """Cosine similarity of ``pred`` and ``base`` (B, C, H, W) per patch x patch window, as a
    (B, 1, ceil(H / patch), ceil(W / patch)) map; windows cut by the border use their pixels."""

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, patch, stride=patch, ceil_mode=True, count_include_pad=False)

    dot = pool((pred * base).sum(1, keepdim=True))
    norms = pool(pred.square().sum(1, keepdim=True)) * pool(base.square().sum(1, keepdim=True))
    return dot / norms.sqrt().clamp_min(1e-12)


def patch_weights(
    preds: Sequence[torch.Tensor],
    base: torch.Tensor,
    patch: int,
    temperature: float,
    priors: Sequence[float],
) -> torch.Tensor:
    """SoftMin weights (N, B, 1, H, W) over the N predictions, constant within each patch."""
    height, width = base.shape[-2:]
    cos = torch.stack([patch_cosine(p.float(), base.float(), patch) for p in preds])
    log_prior = torch.tensor([math.log(a) if a > 0 else -math.inf for a in priors], dtype=cos.dtype)
    logits = -cos / temperature + log_prior.to(cos.device).view(-1, 1, 1, 1, 1)
    weights = torch.softmax(logits, dim=0)
    weights = weights.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)
    return weights[..., :height, :width]


@dataclass(frozen=True)
class PatchMix:
    """How a step's calls combine when they are mixed per patch: call ``base`` is the base model,
    the others are LoRAs. ``uncond``: "base" guides against the base model's unconditional
    prediction (LoRAtorio's modified guidance), "mixed" against the LoRAs' unconditional
    predictions mixed with the same weights."""

    base: int = 0
    patch: int = 2
    temperature: float = 0.05
    uncond: str = "base"

    def guided(
        self, preds: list[torch.Tensor], priors: Sequence[float], guidance_scale: float | None
    ) -> tuple[torch.Tensor, dict[int, float]]:
        """The guided prediction from the calls' predictions (each a CFG batch [uncond; cond], or
        cond only when ``guidance_scale`` is None), and each LoRA call's mean weight (the trace's)."""
        loras = [k for k in range(len(preds)) if k != self.base]
        halves = [p.chunk(2) if guidance_scale is not None else (None, p) for p in preds]
        conds = [halves[k][1] for k in loras]
        weights = patch_weights(
            conds, halves[self.base][1], self.patch, self.temperature, [priors[k] for k in loras]
        )
        cond = sum(w * c for w, c in zip(weights, conds, strict=True))
        means = {k: float(w.mean()) for k, w in zip(loras, weights, strict=True)}
        if guidance_scale is None:
            return cond, means
        if self.uncond == "base":
            uncond = halves[self.base][0]
        else:
            uncond = sum(w * halves[k][0] for w, k in zip(weights, loras, strict=True))
        return uncond + guidance_scale * (cond - uncond), means

"""Execution of a plan's UNet calls: adapters switched through the router, full or cached calls
through the UNet split, calls of one mode batched into one invocation, their costs counted."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .adapters import AdapterSet, RowGroup
from .macs import MacCounter
from .plans import UNetCall
from .unet_cache import CachePoint, UNetSplit


@dataclass
class Conditioning:
    """Prompt embeddings for one text-encoder activation, CFG batch order [uncond; cond]."""

    embeds: torch.Tensor
    added: dict | None = None


@dataclass
class Counters:
    full_calls: int = 0
    cached_calls: int = 0
    macs: int = 0
    unet_seconds: float = 0.0
    loop_seconds: float = 0.0
    invocations: int = 0
    trace: list[dict] = field(default_factory=list)


class CallExecutor:
    """Runs a plan's UNet calls and keeps the per-LoRA cache entries of one image.

    Calls of the same mode can run as one batched UNet invocation: each call's CFG rows get their
    own adapters through the router's row groups (PEFT-style mixed-adapter batches). Sequential
    execution is the same code with groups of one.
    """

    def __init__(
        self, pipe, adapters: AdapterSet, macs: MacCounter, point: CachePoint | None, research: bool
    ):
        self.unet = pipe.unet
        self.adapters = adapters
        self.macs = macs
        self.split = UNetSplit(self.unet, point) if point is not None else None
        self.cache: dict[str, torch.Tensor] = {}
        self.research = research

    def run(
        self,
        calls: list[UNetCall],
        x: torch.Tensor,
        t,
        conds: list[Conditioning],
        counters: Counters,
        fuse: bool = False,
    ) -> list:
        """Execute calls (all of one mode) in one UNet invocation; returns (eps, similarity) per call.
        ``fuse``: the caller found this a step's only call; its adapters run fused (see ``Router``)."""
        mode = calls[0].mode
        rows = x.shape[0]
        router = self.adapters.unet
        if len(calls) == 1:
            router.set(calls[0].adapters, fuse=fuse)
            xb, embeds, added = x, conds[0].embeds, conds[0].added
        else:
            router.set_rows(
                [RowGroup(slice(k * rows, (k + 1) * rows), c.adapters) for k, c in enumerate(calls)]
            )
            xb = torch.cat([x] * len(calls))
            embeds = torch.cat([c.embeds for c in conds])
            added = (
                None
                if conds[0].added is None
                else {key: torch.cat([c.added[key] for c in conds]) for key in conds[0].added}
            )
        signature = (mode, tuple(xb.shape), tuple(embeds.shape), tuple(c.adapters for c in calls), fuse)
        keys = [c.cache_key or "+".join(n for n, _ in c.adapters) for c in calls]
        similarities: list[float | None] = [None] * len(calls)
        _wait_for_device(x)
        start = time.perf_counter()
        try:
            if mode == "plain":
                out, macs = self.macs.count(
                    signature,
                    lambda: self.unet(
                        xb, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False
                    )[0],
                )
            else:
                if self.split is None:
                    raise RuntimeError(
                        "plan asks for a cached/full split call but the method has no cache point"
                    )
                entry = None
                if mode == "cached":
                    missing = [k for k in keys if k not in self.cache]
                    if missing:
                        raise RuntimeError(
                            f"plan asks for cached calls of {missing} before any full call stored them"
                        )
                    entry = torch.cat([self.cache[k] for k in keys]) if len(keys) > 1 else self.cache[keys[0]]
                (out, new_entry), macs = self.macs.count(
                    signature, lambda: self.split(xb, t, embeds, added, entry=entry)
                )
                if mode == "full":
                    for k, key in enumerate(keys):
                        fresh = new_entry[k * rows : (k + 1) * rows]
                        if self.research and key in self.cache:
                            similarities[k] = float(
                                torch.nn.functional.cosine_similarity(
                                    self.cache[key].flatten().float(), fresh.flatten().float(), dim=0
                                )
                            )
                        self.cache[key] = fresh
        finally:
            router.clear()
        _wait_for_device(x)
        counters.unet_seconds += time.perf_counter() - start
        counters.macs += macs
        if mode == "cached":
            counters.cached_calls += len(calls)
        else:
            counters.full_calls += len(calls)
        counters.invocations += 1
        return list(zip(out.split(rows), similarities, strict=True))


def _wait_for_device(x: torch.Tensor) -> None:
    """CUDA kernels run asynchronously: without a barrier around each UNet call, its seconds would be
    launch time only and the time outside UNet calls would absorb the GPU's work. One barrier per call
    costs the overlap of a few kernel launches, far under a UNet call."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def call_groups(calls: tuple[UNetCall, ...], batch: bool) -> list[list[int]]:
    """Indices of calls executed together: one per call, or one per mode when batching."""
    if not batch:
        return [[k] for k in range(len(calls))]
    by_mode: dict[str, list[int]] = {}
    for k, call in enumerate(calls):
        by_mode.setdefault(call.mode, []).append(k)
    return list(by_mode.values())

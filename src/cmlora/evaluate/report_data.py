"""The numbers of a run's evaluation report, computed from the files on disk only.

The report is computed only from files on disk (manifest + ``eval/*.jsonl``) so it can be rebuilt at
any time, including while a judge run is still going.  Judge verdicts are counted the way the papers
count them: win / tie / loss per dimension, each presentation order counted as one comparison, so
position bias averages out.  That only holds when both orders are counted, so an item judged in one
order only (the other failed or is not judged yet) is left out and reported as *half-judged*.
CLIPScore means get percentile-bootstrap 95 % intervals with a fixed seed, so re-running the report
gives byte-identical numbers.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .judge import DIMENSIONS
from .runs import (
    CLIPSCORE_FILENAME,
    CONCEPTS_FILENAME,
    EVAL_DIRNAME,
    JUDGE_FILENAME,
    ManifestEntry,
    read_jsonl,
    read_manifest,
)

ALL = "all"
NKey = int | str  # an N, or "all" for pooled rows


def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval; ``(nan, nan, nan)`` for no values."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(arr.mean())
    if arr.size == 1 or n_resamples < 1:
        return (mean, mean, mean)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    means = arr[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    # Rounding in quantile interpolation must not put the mean outside its own interval.
    return (mean, float(min(lo, mean)), float(max(hi, mean)))


@dataclass
class MethodRow:
    """Per (method, N): quality and cost of the images of one method."""

    method: str
    n: NKey
    images: int
    clipscore: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)
    full_calls: float = math.nan
    cached_calls: float = math.nan
    macs: float = math.nan
    seconds: float = math.nan
    recall: float | None = None
    all_present: float | None = None
    recall_count: int = 0


@dataclass
class JudgeRow:
    """Per (judge model, N, pair A-vs-B, dimension): A's win / tie / loss against B.

    Wins, ties, losses and the means count only items judged in *both* presentation orders (each
    order once), because a lone order carries the judge's position bias uncancelled.  ``failures``
    counts order verdicts without valid scores; ``half_judged`` counts items (composition, seed)
    with a valid verdict in exactly one order, which are left out.
    """

    model: str
    n: NKey
    a: str
    b: str
    dimension: str
    wins: int = 0
    ties: int = 0
    losses: int = 0
    failures: int = 0
    half_judged: int = 0
    mean_a: float = math.nan
    mean_b: float = math.nan

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    def rate(self, count: int) -> float:
        return count / self.judged if self.judged else math.nan


@dataclass
class ReportData:
    """Everything the report shows, as numbers; tests check this rather than the Markdown."""

    run_dir: str
    methods: list[MethodRow]
    judge: list[JudgeRow]
    clip_models: list[str]
    has_concepts: bool
    bootstrap_resamples: int
    seed: int


def n_sort_key(n: NKey) -> tuple[int, int]:
    return (1, 0) if n == ALL else (0, int(n))


def _mean(values: Iterable[float | int | None]) -> float:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else math.nan


def _by_image(records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {os.path.normpath(str(r["image"])): r for r in records if "image" in r}


def _method_rows(
    entries: Sequence[ManifestEntry],
    clip_records: Sequence[Mapping[str, Any]],
    concept_records: Sequence[Mapping[str, Any]] | None,
    n_resamples: int,
    seed: int,
) -> tuple[list[MethodRow], list[str]]:
    clip_by_model: dict[str, dict[str, float]] = defaultdict(dict)
    for rec in clip_records:
        if "image" in rec and isinstance(rec.get("clipscore"), (int, float)):
            clip_by_model[str(rec.get("clip_model"))][os.path.normpath(str(rec["image"]))] = float(
                rec["clipscore"]
            )
    concepts = _by_image(concept_records) if concept_records is not None else None
    groups: dict[tuple[str, NKey], list[ManifestEntry]] = defaultdict(list)
    for e in entries:
        groups[(e.method, e.n)].append(e)
        groups[(e.method, ALL)].append(e)
    rows = []
    for (method, n), group in sorted(groups.items(), key=lambda kv: (kv[0][0], n_sort_key(kv[0][1]))):
        row = MethodRow(
            method=method,
            n=n,
            images=len(group),
            full_calls=_mean(e.full_calls for e in group),
            cached_calls=_mean(e.cached_calls for e in group),
            macs=_mean(e.macs for e in group),
            seconds=_mean(e.seconds for e in group),
        )
        for model, scores in sorted(clip_by_model.items()):
            vals = [scores[k] for k in (os.path.normpath(e.image) for e in group) if k in scores]
            if vals:
                mean, lo, hi = bootstrap_ci(vals, n_resamples=n_resamples, seed=seed)
                row.clipscore[model] = (mean, lo, hi, len(vals))
        if concepts is not None:
            recs = [concepts[k] for k in (os.path.normpath(e.image) for e in group) if k in concepts]
            row.recall_count = len(recs)
            if recs:
                row.recall = _mean(r.get("recall") for r in recs)
                row.all_present = _mean(
                    None if r.get("all_present") is None else float(bool(r["all_present"])) for r in recs
                )
        rows.append(row)
    return rows, sorted(clip_by_model)


ItemKey = tuple[str, str, Any, str, str]  # (model, composition, seed_index, A, B)


def _latest_verdicts(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per (composition, seed, order, model): a re-judged item's last line is its verdict."""
    latest: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for rec in records:
        methods = tuple(rec.get("methods") or ())
        if len(methods) != 2:
            continue
        key = (str(rec.get("composition_id")), rec.get("seed_index", 0), methods, str(rec.get("model")))
        latest[key] = rec
    return list(latest.values())


def _items(records: Iterable[Mapping[str, Any]]) -> dict[ItemKey, list[Mapping[str, Any]]]:
    """Group order verdicts into items: both presentation orders of one pair on one composition and seed."""
    items: dict[ItemKey, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in _latest_verdicts(records):
        methods = list(rec["methods"])
        pair = rec.get("pair")
        a, b = (pair[0], pair[1]) if isinstance(pair, list) and len(pair) == 2 else tuple(sorted(methods))
        key = (str(rec.get("model")), str(rec.get("composition_id")), rec.get("seed_index", 0), a, b)
        items[key].append(rec)
    return items


def _valid_scores(rec: Mapping[str, Any], a: str, b: str) -> Mapping[str, Any] | None:
    scores = rec.get("scores")
    return scores if isinstance(scores, dict) and a in scores and b in scores else None


def _judge_rows(records: Sequence[Mapping[str, Any]], n_of: Mapping[str, int]) -> list[JudgeRow]:
    rows: dict[tuple[str, NKey, str, str, str], JudgeRow] = {}
    scores_a: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    scores_b: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for (model, comp, _seed, a, b), orders in _items(records).items():
        n_raw = orders[0].get("n", n_of.get(comp))
        n: NKey = int(n_raw) if n_raw is not None else ALL
        valid = [v for v in (_valid_scores(r, a, b) for r in orders) if v is not None]
        for nk in dict.fromkeys((n, ALL)):
            for dim in DIMENSIONS:
                key = (model, nk, a, b, dim)
                row = rows.setdefault(key, JudgeRow(model=model, n=nk, a=a, b=b, dimension=dim))
                row.failures += len(orders) - len(valid)
                row.half_judged += int(len(valid) == 1)
                if len(valid) != 2:
                    continue  # a lone order would let the judge's position bias in
                for scores in valid:
                    sa, sb = float(scores[a][dim]), float(scores[b][dim])
                    if sa > sb:
                        row.wins += 1
                    elif sa < sb:
                        row.losses += 1
                    else:
                        row.ties += 1
                    scores_a[key].append(sa)
                    scores_b[key].append(sb)
    for key, row in rows.items():
        row.mean_a = _mean(scores_a.get(key, []))
        row.mean_b = _mean(scores_b.get(key, []))
    return sorted(rows.values(), key=lambda r: (r.model, r.a, r.b, n_sort_key(r.n), r.dimension))


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    judge_model: str | None = None,
) -> ReportData:
    """Compute every number of the report from the run's files (missing eval files just mean no columns)."""
    entries = read_manifest(run_dir)
    ev = Path(run_dir) / EVAL_DIRNAME
    clip_records = read_jsonl(ev / CLIPSCORE_FILENAME)
    concepts_path = ev / CONCEPTS_FILENAME
    concept_records = read_jsonl(concepts_path) if concepts_path.exists() else None
    judge_records = read_jsonl(ev / JUDGE_FILENAME)
    if judge_model is not None:
        judge_records = [r for r in judge_records if r.get("model") == judge_model]
    method_rows, clip_models = _method_rows(entries, clip_records, concept_records, n_resamples, seed)
    n_of = {e.composition_id: e.n for e in entries}
    return ReportData(
        run_dir=str(run_dir),
        methods=method_rows,
        judge=_judge_rows(judge_records, n_of),
        clip_models=clip_models,
        has_concepts=concept_records is not None,
        bootstrap_resamples=n_resamples,
        seed=seed,
    )

"""Summarise a run's evaluation into ``report.md`` and a few plots.

The report is computed only from files on disk (manifest + ``eval/*.jsonl``) so it can be rebuilt at
any time, including while a judge run is still going.  Judge verdicts are counted the way the papers
count them: win / tie / loss per dimension, each presentation order counted as one comparison, so
position bias averages out.  CLIPScore means get percentile-bootstrap 95 % intervals with a fixed
seed, so re-running the report gives byte-identical numbers.
"""

from __future__ import annotations

import io
import logging
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
    atomic_write_bytes,
    atomic_write_text,
    read_jsonl,
    read_manifest,
)

__all__ = [
    "CONCEPTS_FILENAME",
    "JudgeRow",
    "MethodRow",
    "ReportData",
    "bootstrap_ci",
    "build_report",
    "render_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)

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
    """Per (judge model, N, pair A-vs-B, dimension): A's win / tie / loss against B."""

    model: str
    n: NKey
    a: str
    b: str
    dimension: str
    wins: int = 0
    ties: int = 0
    losses: int = 0
    failures: int = 0
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


def _n_sort_key(n: NKey) -> tuple[int, int]:
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
    for (method, n), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _n_sort_key(kv[0][1]))):
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


def _judge_rows(records: Sequence[Mapping[str, Any]], n_of: Mapping[str, int]) -> list[JudgeRow]:
    # A re-judged item (e.g. --retry-failures) appears twice: the last line is the current verdict.
    latest: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for rec in records:
        methods = tuple(rec.get("methods") or ())
        if len(methods) != 2:
            continue
        key = (str(rec.get("composition_id")), rec.get("seed_index", 0), methods, str(rec.get("model")))
        latest[key] = rec
    rows: dict[tuple[str, NKey, str, str, str], JudgeRow] = {}
    scores_a: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    scores_b: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for rec in latest.values():
        methods = list(rec["methods"])
        pair = rec.get("pair")
        a, b = (pair[0], pair[1]) if isinstance(pair, list) and len(pair) == 2 else tuple(sorted(methods))
        model = str(rec.get("model"))
        n_raw = rec.get("n", n_of.get(str(rec.get("composition_id"))))
        n: NKey = int(n_raw) if n_raw is not None else ALL
        for nk in dict.fromkeys((n, ALL)):
            for dim in DIMENSIONS:
                key = (model, nk, a, b, dim)
                row = rows.setdefault(key, JudgeRow(model=model, n=nk, a=a, b=b, dimension=dim))
                scores = rec.get("scores")
                if not isinstance(scores, dict) or a not in scores or b not in scores:
                    row.failures += 1
                    continue
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
    return sorted(rows.values(), key=lambda r: (r.model, r.a, r.b, _n_sort_key(r.n), r.dimension))


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


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _pct(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}% ({count})" if total else "–"


def render_markdown(data: ReportData) -> str:
    """The Markdown report; pure so it can be tested and diffed."""
    out = [f"# Evaluation report: `{Path(data.run_dir).name}`", ""]
    out.append("## Per method and N")
    out.append("")
    head = ["N", "method", "images"]
    for model in data.clip_models:
        head.append(f"CLIPScore [{model}] (95% CI)")
    if data.has_concepts:
        head += ["concept recall", "all present"]
    head += ["UNet calls/img", "cached calls/img", "GMACs/img", "s/img"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for row in sorted(data.methods, key=lambda r: (_n_sort_key(r.n), r.method)):
        cells = [str(row.n), row.method, str(row.images)]
        for model in data.clip_models:
            if model in row.clipscore:
                mean, lo, hi, count = row.clipscore[model]
                cells.append(f"{mean:.2f} [{lo:.2f}, {hi:.2f}] (n={count})")
            else:
                cells.append("–")
        if data.has_concepts:
            cells += [_fmt(row.recall, 3), _fmt(row.all_present, 3)]
        gmacs = row.macs / 1e9 if not math.isnan(row.macs) else math.nan
        cells += [_fmt(row.full_calls, 1), _fmt(row.cached_calls, 1), _fmt(gmacs, 1), _fmt(row.seconds, 2)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if data.clip_models:
        out.append(
            f"CLIPScore = 100 * max(cos, 0) against the trigger words; intervals: percentile bootstrap, "
            f"{data.bootstrap_resamples} resamples, seed {data.seed}."
        )
        out.append("")
    models = sorted({r.model for r in data.judge})
    for model in models:
        out.append(f"## Pairwise judge: `{model}`")
        out.append("")
        out.append(
            "Win / tie / loss of A against B, each presentation order counted once "
            "(pooled over both orders); failures (items without a valid verdict) are listed but not counted."
        )
        out.append("")
        head = ["N", "A vs B", "dimension", "win", "tie", "loss", "judged", "failures", "mean A", "mean B"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        rows = [r for r in data.judge if r.model == model]
        for r in sorted(rows, key=lambda r: (r.a, r.b, _n_sort_key(r.n), r.dimension)):
            out.append(
                "| "
                + " | ".join(
                    [
                        str(r.n),
                        f"{r.a} vs {r.b}",
                        r.dimension,
                        _pct(r.wins, r.judged),
                        _pct(r.ties, r.judged),
                        _pct(r.losses, r.judged),
                        str(r.judged),
                        str(r.failures),
                        _fmt(r.mean_a),
                        _fmt(r.mean_b),
                    ]
                )
                + " |"
            )
        out.append("")
    return "\n".join(out)


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def write_plots(data: ReportData, plots_dir: Path) -> list[Path]:
    """Win rate, CLIPScore and cost against N; only plots that have data are drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written: list[Path] = []
    per_n = [r for r in data.methods if r.n != ALL]
    ns = sorted({int(r.n) for r in per_n} | {int(r.n) for r in data.judge if r.n != ALL})
    methods = sorted({r.method for r in per_n})

    judge_rows = [r for r in data.judge if r.n != ALL and r.judged]
    if judge_rows:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        series: dict[tuple[str, str, str, str], list[JudgeRow]] = defaultdict(list)
        for r in judge_rows:
            series[(r.model, r.a, r.b, r.dimension)].append(r)
        for (model, a, b, dim), rows in sorted(series.items()):
            rows.sort(key=lambda r: int(r.n))
            label = f"{a} vs {b} ({dim})" + (f" [{model}]" if len({r.model for r in judge_rows}) > 1 else "")
            style = "-" if dim == "composition" else "--"
            ax.plot(
                [int(r.n) for r in rows], [100 * r.rate(r.wins) for r in rows], style, marker="o", label=label
            )
        ax.set_xlabel("N (LoRAs in the composition)")
        ax.set_xticks(ns)
        ax.set_ylabel("win rate of A (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = plots_dir / "winrate_vs_n.png"
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)

    if data.clip_models:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for model in data.clip_models:
            for method in methods:
                rows = sorted(
                    (r for r in per_n if r.method == method and model in r.clipscore), key=lambda r: int(r.n)
                )
                if not rows:
                    continue
                xs = [int(r.n) for r in rows]
                means = np.array([r.clipscore[model][0] for r in rows])
                lo = means - np.array([r.clipscore[model][1] for r in rows])
                hi = np.array([r.clipscore[model][2] for r in rows]) - means
                label = method if len(data.clip_models) == 1 else f"{method} [{model}]"
                ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xlabel("N (LoRAs in the composition)")
        ax.set_xticks(ns)
        ax.set_ylabel("CLIPScore (95% bootstrap CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = plots_dir / "clipscore_vs_n.png"
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)

    cost_fields = [("full_calls", "UNet calls / image"), ("seconds", "seconds / image")]
    cost_fields = [(f, lbl) for f, lbl in cost_fields if any(not math.isnan(getattr(r, f)) for r in per_n)]
    if cost_fields:
        fig, axes = plt.subplots(1, len(cost_fields), figsize=(5.5 * len(cost_fields), 4), squeeze=False)
        for ax, (attr, label) in zip(axes[0], cost_fields, strict=True):
            for method in methods:
                rows = sorted((r for r in per_n if r.method == method), key=lambda r: int(r.n))
                pts = [(int(r.n), getattr(r, attr)) for r in rows if not math.isnan(getattr(r, attr))]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_xlabel("N (LoRAs in the composition)")
            ax.set_xticks(ns)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        path = plots_dir / "cost_vs_n.png"
        _save_fig(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    run_dir: str | os.PathLike[str],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    judge_model: str | None = None,
    plots: bool = True,
) -> tuple[Path, ReportData]:
    """Build the report and write ``RUN_DIR/report.md`` (+ ``RUN_DIR/plots/*.png``) atomically."""
    data = build_report(run_dir, n_resamples=n_resamples, seed=seed, judge_model=judge_model)
    text = render_markdown(data)
    if plots:
        written = write_plots(data, Path(run_dir) / "plots")
        if written:
            text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in written) + "\n"
    path = Path(run_dir) / "report.md"
    atomic_write_text(path, text)
    return path, data

"""Summarise a run's evaluation into ``report.md`` and a few plots.

The report is computed only from files on disk (manifest + ``eval/*.jsonl``) so it can be rebuilt at
any time, including while a judge run is still going.  Judge verdicts are counted the way the papers
count them: win / tie / loss per dimension, each presentation order counted as one comparison, so
position bias averages out.  That only holds when both orders are counted, so an item judged in one
order only (the other failed or is not judged yet) is left out and reported as *half-judged*.
CLIPScore means get percentile-bootstrap 95 % intervals with a fixed seed, so re-running the report
gives byte-identical numbers.
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
    "WinTieLoss",
    "bootstrap_ci",
    "build_report",
    "cost_series",
    "render_markdown",
    "winrate_series",
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


def _half_judged_items(rows: Iterable[JudgeRow], model: str) -> int:
    """Half-judged items of one judge model over all pairs (each item once, not once per dimension)."""
    return sum(
        r.half_judged for r in rows if r.model == model and r.n == ALL and r.dimension == DIMENSIONS[0]
    )


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
    head += ["full UNet calls/img", "cached UNet calls/img", "GMACs/img", "s/img"]
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
            "Win / tie / loss of A against B over the items (composition, seed) judged in both presentation "
            "orders, each order counted once, so the judge's position bias cancels. *failures*: order "
            "verdicts without valid scores; *half-judged*: items with a valid verdict in one order only "
            "(the other failed or is not judged yet), left out of win / tie / loss and the means."
        )
        out.append("")
        half = _half_judged_items(data.judge, model)
        if half:
            out.append(
                f"**{half} half-judged item(s)** not counted: re-run `cmlora eval judge` (transport failures "
                "and items not judged yet), with `--retry-failures` for malformed replies."
            )
            out.append("")
        head = [
            "N",
            "A vs B",
            "dimension",
            "win",
            "tie",
            "loss",
            "judged",
            "failures",
            "half-judged",
            "mean A",
            "mean B",
        ]
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
                        str(r.half_judged),
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


SeriesKey = tuple[str, str, str, str]  # (judge model, A, B, dimension)


@dataclass(frozen=True)
class WinTieLoss:
    """A's win / tie / loss counts against B at one N: one stacked bar of ``winrate_vs_n.png``."""

    n: int
    wins: int
    ties: int
    losses: int

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    def percent(self) -> tuple[float, float, float]:
        """Win, tie and loss as percentages of the judged comparisons (they add up to 100)."""
        total = self.judged
        return (100 * self.wins / total, 100 * self.ties / total, 100 * self.losses / total)


def winrate_series(rows: Iterable[JudgeRow]) -> dict[SeriesKey, list[WinTieLoss]]:
    """What the win-rate plot draws: per (model, A, B, dimension), win / tie / loss at each N.

    Ties are kept as their own band: drawing wins alone shows an all-tie criterion at 0 %, which
    reads as "lost every time".  Pooled rows and Ns without a counted comparison are left out.
    """
    series: dict[SeriesKey, list[WinTieLoss]] = defaultdict(list)
    for r in rows:
        if r.n != ALL and r.judged:
            series[(r.model, r.a, r.b, r.dimension)].append(WinTieLoss(int(r.n), r.wins, r.ties, r.losses))
    return {key: sorted(points, key=lambda p: p.n) for key, points in sorted(series.items())}


COST_PANELS = (
    ("full_calls", "full UNet calls / image"),
    ("cached_calls", "cached UNet calls / image (shallow blocks only)"),
    ("seconds", "seconds / image"),
)


def cost_series(rows: Iterable[MethodRow]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What the cost plot draws: per panel label and method, (N, mean per image) points.

    Full and cached calls get a panel each, labelled as such, because a cached call (shallow blocks
    only) costs a fraction of a full one and the two must not be read as one number.
    """
    per_n = sorted((r for r in rows if r.n != ALL), key=lambda r: (r.method, int(r.n)))
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for attr, label in COST_PANELS:
        lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in per_n:
            value = getattr(r, attr)
            if not math.isnan(value):
                lines[r.method].append((int(r.n), float(value)))
        if lines:
            panels[label] = dict(lines)
    return panels


_WTL_COLOURS = (("win", "#4daf4a"), ("tie", "#bdbdbd"), ("loss", "#e41a1c"))


def _draw_winrate(plt: Any, series: Mapping[SeriesKey, Sequence[WinTieLoss]], path: Path) -> None:
    """Stacked win / tie / loss bars per N, one panel per (model, pair, dimension), counts written in."""
    keys = list(series)
    many_models = len({k[0] for k in keys}) > 1
    cols = min(len(keys), len(DIMENSIONS))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        model, a, b, dim = key
        points = series[key]
        xs = np.arange(len(points))
        bottom = np.zeros(len(points))
        for band, (name, colour) in enumerate(_WTL_COLOURS):
            counts = [(p.wins, p.ties, p.losses)[band] for p in points]
            heights = np.array([p.percent()[band] for p in points])
            ax.bar(xs, heights, bottom=bottom, color=colour, label=name, width=0.6)
            for x, y0, h, c in zip(xs, bottom, heights, counts, strict=True):
                if c:
                    ax.text(x, y0 + h / 2, str(c), ha="center", va="center", fontsize=7)
            bottom += heights
        ax.set_xticks(xs, [f"N={p.n}\n({p.judged})" for p in points], fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"% of judged ({a} vs {b})", fontsize=8)
        ax.set_title(f"{a} vs {b}: {dim}" + (f" [{model}]" if many_models else ""), fontsize=9)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, [f"{lbl} of A" for lbl in labels], loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    _save_fig(fig, path)
    plt.close(fig)


def _draw_cost(
    plt: Any, panels: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], ns: list[int], path: Path
) -> None:
    """One panel per cost (full calls, cached calls, seconds), each titled with what it counts."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4), squeeze=False)
    for ax, (label, lines) in zip(axes[0], panels.items(), strict=True):
        for method, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xlabel("N (LoRAs in the composition)")
        ax.set_xticks(ns)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("per image (mean)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_fig(fig, path)
    plt.close(fig)


def write_plots(data: ReportData, plots_dir: Path) -> list[Path]:
    """Win / tie / loss, CLIPScore and cost against N; only plots that have data are drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written: list[Path] = []
    per_n = [r for r in data.methods if r.n != ALL]
    ns = sorted({int(r.n) for r in per_n} | {int(r.n) for r in data.judge if r.n != ALL})
    methods = sorted({r.method for r in per_n})

    series = winrate_series(data.judge)
    if series:
        path = plots_dir / "winrate_vs_n.png"
        _draw_winrate(plt, series, path)
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

    panels = cost_series(data.methods)
    if panels:
        path = plots_dir / "cost_vs_n.png"
        _draw_cost(plt, panels, ns, path)
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

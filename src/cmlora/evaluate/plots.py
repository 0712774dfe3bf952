"""The report's plots: win / tie / loss, CLIPScore and cost against N.

What each plot draws is computed by a pure function (:func:`winrate_series`, :func:`cost_series`) so
that tests check the data rather than pixels; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_bytes
from .judge import DIMENSIONS
from .report_data import ALL, JudgeRow, MethodRow, ReportData


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

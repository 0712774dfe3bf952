"""Summarise a run's evaluation into ``report.md`` and a few plots.

The numbers come from :mod:`.report_data` and the plots from :mod:`.plots`; this module renders the
Markdown and writes the files, each atomically, so a report being rebuilt is never seen half-written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from ..files import atomic_write_text
from .judge import DIMENSIONS
from .plots import WinTieLoss, cost_series, winrate_series, write_plots
from .report_data import ALL, JudgeRow, MethodRow, ReportData, bootstrap_ci, build_report, n_sort_key
from .runs import CONCEPTS_FILENAME

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
    "write_plots",
    "write_report",
]


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
    for row in sorted(data.methods, key=lambda r: (n_sort_key(r.n), r.method)):
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
        for r in sorted(rows, key=lambda r: (r.a, r.b, n_sort_key(r.n), r.dimension)):
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

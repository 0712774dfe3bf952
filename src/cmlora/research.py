"""Research instrumentation: one figure of what a composition did at every denoising step.

A record's ``trace`` (written by ``sampler.denoise``; richer with ``research=True``) says per step
which LoRA dominated, which ones got a full UNet call and which a cached one, the mixing weights,
and with ``--research`` the latent's high-frequency statistic and the cosine similarity between a
LoRA's fresh deep feature and the cached one it replaces. Those are the quantities behind CMLoRA's
design choices (when to end the early phase, how stale a cache may get), so seeing them per step
is how the defaults are checked. Records without research data still plot: the panels that lack
data say so instead of failing, because a plain record is what a user usually has at hand.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import RecordError

#: The online variant's published threshold g, used when the record does not state one.
DEFAULT_THRESHOLD = 0.40

NOT_RECORDED = "not recorded (generate with --research)"


def _pyplot() -> Any:
    """pyplot on the Agg backend, imported only here: matplotlib is slow to load and needs no display."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _number(value: Any) -> float | None:
    """A finite float, or None (records read from JSON may hold None or "nan" strings)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _trace(record: Any) -> list[dict]:
    if not isinstance(record, Mapping):  # a record read from a file, or the core's GenerationRecord
        raise RecordError(f"plot_trace expects a record (a mapping), got {type(record).__name__}")
    trace = record.get("trace")
    if not isinstance(trace, list) or not trace:
        raise RecordError(
            "the record has no per-step trace (no 'trace' list, or an empty one): it was not written by "
            "cmlora generate, or by a version that did not record traces; generate the image again "
            "(with --research for the full set of panels)"
        )
    bad = [k for k, entry in enumerate(trace) if not isinstance(entry, dict)]
    if bad:
        raise RecordError(f"trace entries must be objects; entries {bad[:5]} are not")
    return trace


def _names(record: dict, trace: Sequence[dict]) -> list[str]:
    """Row labels of the grid: the composition's LoRAs in the user's order, then any other call label
    the trace uses (merge calls are labelled "a+b", the base-only call "base")."""
    names: list[str] = []
    for lora in record.get("loras") or []:
        if isinstance(lora, dict) and isinstance(lora.get("name"), str):
            names.append(lora["name"])
    used: list[str] = []
    for entry in trace:
        for key in (*(entry.get("full") or []), *(entry.get("cached") or []), *(entry.get("weights") or {})):
            if isinstance(key, str) and key not in used:
                used.append(key)
    ordered = [n for n in names if n in used] + [n for n in used if n not in names]
    return ordered or names


def _empty(ax: Any, title: str, message: str = NOT_RECORDED) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="grey")
    ax.set_yticks([])


def _phase_switch(steps: list[int], trace: Sequence[dict]) -> int | None:
    """First step recorded as late phase, if the method has phases."""
    for step, entry in zip(steps, trace, strict=True):
        if entry.get("phase") == "late":
            return step
    return None


def _panel_high_frequency(ax: Any, record: dict, steps: list[int], trace: Sequence[dict]) -> None:
    from matplotlib.patches import Patch

    title = "(a) latent high-frequency statistic (before each step)"
    values = [_number(entry.get("high_frequency")) for entry in trace]
    if all(v is None for v in values):
        _empty(ax, title)
        return
    options = record.get("options") if isinstance(record.get("options"), dict) else {}
    threshold = _number(options.get("threshold", DEFAULT_THRESHOLD))
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    for step, entry in zip(steps, trace, strict=True):
        phase = entry.get("phase")
        if phase in ("early", "late"):
            colour = "tab:orange" if phase == "early" else "tab:blue"
            ax.axvspan(step - 0.5, step + 0.5, color=colour, alpha=0.12, lw=0)
    xs = [s for s, v in zip(steps, values, strict=True) if v is not None]
    ys = [v for v in values if v is not None]
    ax.plot(xs, ys, marker="o", ms=3, color="black", label="statistic")
    ax.axhline(threshold, color="red", ls="--", lw=1, label=f"online threshold g = {threshold:g}")
    handles, _ = ax.get_legend_handles_labels()
    for phase, colour in (("early", "tab:orange"), ("late", "tab:blue")):
        if any(entry.get("phase") == phase for entry in trace):
            handles.append(Patch(color=colour, alpha=0.12, label=f"{phase} phase"))
    ax.set_ylim(0, max(1.05, max(ys) * 1.05))
    ax.set_ylabel("high-band mean")
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _panel_calls(ax: Any, names: list[str], steps: list[int], trace: Sequence[dict]) -> None:
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    title = "(b) UNet calls per LoRA: full, cached; * = dominant"
    if not names:
        _empty(ax, title, "no calls recorded")
        return
    grid = np.zeros((len(names), len(steps)))
    for col, entry in enumerate(trace):
        for row, name in enumerate(names):
            if name in (entry.get("full") or []):
                grid[row, col] = 2
            elif name in (entry.get("cached") or []):
                grid[row, col] = 1
    cmap = ListedColormap(["#f2f2f2", "#9ecae1", "#08519c"])
    ax.imshow(
        grid,
        cmap=cmap,
        vmin=0,
        vmax=2,
        aspect="auto",
        interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5),
    )
    dom_x, dom_y = [], []
    for step, entry in zip(steps, trace, strict=True):
        dominant = entry.get("dominant")
        if isinstance(dominant, str) and dominant in names:
            dom_x.append(step)
            dom_y.append(names.index(dominant))
    if dom_x:
        ax.scatter(dom_x, dom_y, marker="*", s=60, color="gold", edgecolors="black", linewidths=0.5, zorder=3)
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    handles = [
        Patch(color="#08519c", label="full call"),
        Patch(color="#9ecae1", label="cached call"),
        Patch(color="#f2f2f2", label="no call"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=10, loc="left")


def _panel_weights(ax: Any, names: list[str], steps: list[int], trace: Sequence[dict]) -> None:
    title = "(c) mixing weights per LoRA"
    if not any(isinstance(entry.get("weights"), dict) and entry["weights"] for entry in trace):
        _empty(ax, title)
        return
    # Equal weights (composite) draw on top of each other: earlier lines are wider so all show.
    for k, name in enumerate(names):
        ys = [_number((entry.get("weights") or {}).get(name)) for entry in trace]
        if all(y is None for y in ys):
            continue
        width = 1.2 + 2.0 * (len(names) - 1 - k) / max(1, len(names) - 1)
        ys_plot = [math.nan if y is None else y for y in ys]
        ax.step(steps, ys_plot, where="mid", color=f"C{k % 10}", lw=width, label=name)
    handles, _ = ax.get_legend_handles_labels()
    w_dom = [_number(entry.get("w_dom")) for entry in trace]
    known = [w for w in w_dom if w is not None]
    if known:
        twin = ax.twinx()
        twin.plot(steps, [math.nan if w is None else w for w in w_dom], color="black", ls=":", lw=1.2)
        twin.set_ylim(0, max(known) * 1.15)
        twin.set_ylabel("w_dom", fontsize=8)
        handles += twin.get_lines()[:1]
        handles[-1].set_label("w_dom (right axis)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("weight")
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.06, 1.0))


def _panel_similarity(ax: Any, names: list[str], steps: list[int], trace: Sequence[dict]) -> None:
    title = "(d) cosine similarity of fresh vs cached deep feature, at full calls"
    if not any("cache_similarity" in entry for entry in trace):
        _empty(ax, title)
        return
    plotted = False
    keys = list(names)
    for entry in trace:
        for key in entry.get("cache_similarity") or {}:
            if key not in keys:
                keys.append(key)
    for k, name in enumerate(keys):
        points = [
            (step, _number((entry.get("cache_similarity") or {}).get(name)))
            for step, entry in zip(steps, trace, strict=True)
        ]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", ms=4, color=f"C{k % 10}", label=name)
            plotted = True
    if not plotted:
        _empty(ax, title, "no full call replaced a cached feature (the method does not cache)")
        return
    ax.set_ylabel("cosine")
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_trace(record: dict, out_png: str | os.PathLike[str]) -> None:
    """Write one PNG with four panels from ``record["trace"]``; raise RecordError (a ValueError) if there is none.

    (a) the latent statistic with the online threshold and the early/late phases, (b) a LoRA x step
    grid of full and cached calls with the dominant LoRA starred, (c) the mixing weights (and
    w_dom), (d) the cache similarity at full calls. A dashed vertical line marks the phase switch
    on every panel, so cause (a) and effect (b)-(d) line up.
    """
    trace = _trace(record)
    steps = [
        int(entry["step"]) if _number(entry.get("step")) is not None else k for k, entry in enumerate(trace)
    ]
    names = _names(record, trace)
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    try:
        _panel_high_frequency(axes[0], record, steps, trace)
        _panel_calls(axes[1], names, steps, trace)
        _panel_weights(axes[2], names, steps, trace)
        _panel_similarity(axes[3], names, steps, trace)
        switch = _phase_switch(steps, trace)
        for ax in axes:
            if switch is not None:
                ax.axvline(switch - 0.5, color="grey", ls="--", lw=1)
            ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
        axes[-1].set_xlabel("denoising step")
        label = record.get("method_label") or record.get("method") or "?"
        fig.suptitle(
            f"{label}: seed {record.get('seed', '?')}, {len(trace)} steps, "
            f"{record.get('full_calls', '?')} full + {record.get('cached_calls', '?')} cached UNet calls",
            fontsize=11,
        )
        fig.tight_layout()
        folder = os.path.dirname(os.path.abspath(out_png))
        os.makedirs(folder, exist_ok=True)
        fig.savefig(out_png, format="png", dpi=90)
    finally:
        plt.close(fig)

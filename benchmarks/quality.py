"""Composition quality on the mini world: every composition (N = 2..5, 240 in all) x method x seed,
scored by the world's judge: concept recall (share of the composition's concepts detected), the
all-concepts-present rate, the graded score (share of each concept's parts shown) and the artifact
score (distance to the world's renders), per method and N. Every method runs on the same
compositions and seeds, so each is compared with composite by paired differences and their
standard errors. Plots: recall and artifact score vs N.

    python benchmarks/quality.py --out runs/quality              # every method, >= 200 images per N
    python benchmarks/quality.py --out runs/front --front        # cmlora cache settings vs cost

--front adds cmlora offline with cache interval c in 1, 2, 3, 5, 8 at two cache points beside merge,
switch and composite, and plots recall against UNet MACs per image (the speed/quality front). The mini
UNet has one block per level, so its two cache points are (level 0, block 0) and (level 1, block 0).
The run folder is a sweep folder: interrupting and re-running resumes; `cmlora report` reads it too.
Two CPU processes halve the wall time: run the same command with RANK=0 WORLD_SIZE=2 and RANK=1
WORLD_SIZE=2 (or under `accelerate launch`); the last one to finish scores and writes the table.
A run of one N at a time (`--n 2 --out runs/q2`, ...) renders the same images (a seed is a function of
the composition and the seed index), each finished run is a table of its own, and

    python benchmarks/quality.py --combine runs/q2 runs/q3 runs/q4 runs/q5 --out runs/quality

writes the table of all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from cmlora.methods import METHOD_LABELS, split_label

#: Every method and variant of the registry (a method added there is benchmarked too).
MAIN_METHODS = {label: (*split_label(label), {}) for label in METHOD_LABELS}
#: The paired comparisons are against this method.
REFERENCE_METHOD = "composite"
#: Metrics of concepts.jsonl summarised per method and N (mean, SE, paired difference and its SE).
METRICS = ("recall", "graded", "artifact")


#: Cache points of the front, as (layer, block). The mini UNet has one resnet/attention pair per
#: level, so its "block 1" does not exist; the next deeper point is block 0 of level 1.
FRONT_POINTS = ((0, 0), (1, 0))


def front_methods() -> dict:
    methods = {k: MAIN_METHODS[k] for k in ("merge", "switch", "composite")}
    methods["cmlora-c1"] = ("cmlora", "offline", {"cache_interval": 1})
    for c in (2, 3, 5, 8):
        for layer, block in FRONT_POINTS:
            methods[f"cmlora-c{c}-L{layer}b{block}"] = (
                "cmlora",
                "offline",
                {"cache_interval": c, "cache_layer": layer, "cache_block": block},
            )
    return methods


def run(args) -> dict:
    import torch

    from cmlora.evaluate.concepts import score_run
    from cmlora.models import load_base
    from cmlora.testbed.compositions import image_seed
    from cmlora.testbed.generator import CompositionGenerator, mini_compositions
    from cmlora.testbed.presets import MINI_DEFAULTS
    from cmlora.testbed.sweep import SweepJob, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base("mini", "cpu", "fp32")
    comps = mini_compositions(tuple(int(n) for n in args.n.split(",")))
    comps = comps[:: args.every]  # every k-th: a subsample that keeps the mix of N and categories
    if args.limit:
        comps = comps[: args.limit]
    methods = front_methods() if args.front else MAIN_METHODS
    defaults = dict(MINI_DEFAULTS, steps=args.steps)
    seeds = seeds_per_n(comps, args.seeds, args.images_per_n)
    images = image_keys(comps, seeds, 0 if args.seeds else args.images_per_n)
    jobs = [
        SweepJob(comp, label, spec[2], k, image_seed(defaults["base_seed"], comp.id, k))
        for comp in comps
        for k in range(seeds[comp.n])
        if (comp.id, k) in images
        for label, spec in methods.items()
    ]
    settings = {
        "benchmark": "quality",
        "front": args.front,
        "sizes": args.n,
        "seeds": {str(n): k for n, k in sorted(seeds.items())},
        "images_per_n": 0 if args.seeds else args.images_per_n,
        "limit": args.limit,
        "every": args.every,
        "methods": {k: [v[0], v[1], v[2]] for k, v in methods.items()},
        **defaults,
    }
    generate = CompositionGenerator(
        base,
        {k: (v[0], v[1]) for k, v in methods.items()},
        defaults,
        lambda entry: Path(base.lora_ids[entry.id]["file"]),
    )
    try:
        summary = run_sweep(
            args.out, settings, jobs, generate, progress=not args.quiet, batch_size=args.batch_size
        )
    finally:
        generate.close()
    if not summary.complete:  # a shard (RANK/WORLD_SIZE) done before the others: the last one scores
        return None
    import fcntl

    # two shards finishing together both see a complete run: score one after the other (the
    # second finds every image scored, since scoring resumes)
    with open(Path(args.out) / ".score.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        score_run(args.out, progress=not args.quiet)
    return aggregate(read_scored(Path(args.out)), list(methods))


def seeds_per_n(comps, seeds: int, images_per_n: int) -> dict[int, int]:
    """Seeds per composition for each N: ``seeds`` when given, else enough for ``images_per_n``
    images per method at that N (the number of compositions differs between N)."""
    counts = defaultdict(int)
    for comp in comps:
        counts[comp.n] += 1
    return {n: seeds or max(1, math.ceil(images_per_n / count)) for n, count in counts.items()}


def image_keys(comps, seeds: dict[int, int], images_per_n: int) -> set[tuple[str, int]]:
    """The (composition, seed index) pairs to render: every seed of ``seeds``, cut to exactly
    ``images_per_n`` per N when it is not 0. The cut takes seed 0 of every composition, then seed 1,
    and so on, so the seed counts of one N differ by at most one; rounding the seeds up instead
    renders more than asked for (3 seeds of 96 compositions for 200 at N = 4)."""
    by_n: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    for index, comp in enumerate(comps):
        by_n[comp.n] += [(k, index, comp.id) for k in range(seeds[comp.n])]
    keys = set()
    for items in by_n.values():
        items.sort()
        keys.update((cid, k) for k, _, cid in (items[:images_per_n] if images_per_n else items))
    return keys


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def read_scored(out: Path) -> list[tuple[dict, dict]]:
    """(score, manifest record) of every scored image of one run folder."""
    manifest = {json.loads(line)["image"]: json.loads(line) for line in (out / "manifest.jsonl").open()}
    return [
        (score, manifest[score["image"]])
        for score in map(json.loads, (out / "eval" / "concepts.jsonl").open())
    ]


def aggregate(scored: list[tuple[dict, dict]], labels: list[str]) -> dict:
    """One table from the (score, record) items of one or more scored run folders (e.g. one per N,
    run one after the other)."""
    groups: dict[tuple[str, int], list] = defaultdict(list)
    # (composition, seed) -> metric values of the reference method, for paired differences
    reference: dict[tuple, dict] = {}
    for score, record in scored:
        groups[(record["method"], record["n"])].append((score, record))
        groups[(record["method"], 0)].append((score, record))
        if record["method"] == REFERENCE_METHOD:
            reference[(record["composition_id"], record["seed"])] = score
    rows = []
    for label in labels:
        for n in sorted({n for (m, n) in groups if m == label}):
            items = groups[(label, n)]
            row = {"method": label, "n": n if n else "all", "images": len(items)}
            for metric in METRICS:
                values = [s[metric] for s, _ in items if metric in s]
                if not values:
                    continue
                row[metric] = statistics.mean(values)
                row[f"{metric}_se"] = _se(values)  # standard error of the mean, over images
                paired = [
                    s[metric] - reference[key][metric]
                    for s, r in items
                    if (key := (r["composition_id"], r["seed"])) in reference and metric in s
                ]
                if paired and label != REFERENCE_METHOD:
                    row[f"{metric}_vs_{REFERENCE_METHOD}"] = statistics.mean(paired)
                    row[f"{metric}_vs_{REFERENCE_METHOD}_se"] = _se(paired)
            rows.append(
                {
                    **row,
                    "all_present": statistics.mean(1.0 if s["all_present"] else 0.0 for s, _ in items),
                    "gmacs": statistics.mean(r["macs"] for _, r in items) / 1e9,
                    "seconds": statistics.mean(r["seconds"] for _, r in items),
                    "full_calls": statistics.mean(r["full_calls"] for _, r in items),
                    "cached_calls": statistics.mean(r["cached_calls"] for _, r in items),
                }
            )
    return {"rows": rows}


#: Settings that may differ between run folders combined into one table.
PER_RUN_SETTINGS = ("sizes", "seeds", "limit", "every")


def combine(outs: list[Path]) -> tuple[dict, bool]:
    """The table of several finished, scored run folders made with the same methods and sampling
    settings, each N from one folder only (a composition in two folders would be counted twice)."""
    first: dict | None = None
    sizes: dict[int, Path] = {}
    items: list[tuple[dict, dict]] = []
    judges: dict[str, Path] = {}  # judge id -> the first folder scored by it
    for out in outs:
        try:
            info = json.loads((out / "run.json").read_text())
            settings, planned = info["settings"], info["jobs"]["count"]
            scored = read_scored(out)
            items += scored
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{out} is not a finished quality run ({type(exc).__name__}: {exc})") from exc
        if settings.get("benchmark") != "quality":
            raise ValueError(f"{out} is not a quality run (its run.json says {settings.get('benchmark')!r})")
        if len(scored) != planned:
            raise ValueError(
                f"{out} has {len(scored)} scored images of {planned}: finish it by running its command again"
            )
        for score, _ in scored:
            judges.setdefault(str(score.get("judge", "unrecorded")), out)
        if len(judges) > 1:
            seen = ", ".join(f"{j} (first in {p})" for j, p in judges.items())
            raise ValueError(
                f"the images were scored by different judges: {seen}; score every folder with the same "
                "judge (`cmlora eval concepts RUN_DIR --overwrite`) before combining them"
            )
        for n in (int(x) for x in str(settings["sizes"]).split(",")):
            if n in sizes:
                raise ValueError(f"N = {n} is in both {sizes[n]} and {out}: combine each N once")
            sizes[n] = out
        if first is None:
            first = settings
            continue
        for key in sorted(set(first) | set(settings)):
            if key not in PER_RUN_SETTINGS and first.get(key) != settings.get(key):
                raise ValueError(
                    f"{outs[0]} and {out} differ in {key!r} ({first.get(key)!r} vs {settings.get(key)!r}): "
                    "only runs with the same methods and sampling settings make one table"
                )
    assert first is not None  # argparse's nargs="+"
    return aggregate(items, list(first["methods"])), bool(first["front"])


def _paired(r: dict, metric: str) -> str:
    key = f"{metric}_vs_{REFERENCE_METHOD}"
    return f"{r[key]:+.3f} +- {r[key + '_se']:.3f}" if key in r else "–"


def markdown(result: dict) -> str:
    lines = [
        f"| method | N | images | concept recall | vs {REFERENCE_METHOD} (paired) | graded | vs {REFERENCE_METHOD} "
        f"| artifact | vs {REFERENCE_METHOD} | all present | UNet calls (full+cached) | GMAC/image | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        metric = {m: (f"{r[m]:.3f}" if m in r else "–") for m in METRICS}
        lines.append(
            f"| {r['method']} | {r['n']} | {r['images']} | {metric['recall']} | {_paired(r, 'recall')} | "
            f"{metric['graded']} | {_paired(r, 'graded')} | {metric['artifact']} | {_paired(r, 'artifact')} | "
            f"{r['all_present']:.3f} | {r['full_calls']:.1f}+{r['cached_calls']:.1f} | {r['gmacs']:.2f} | "
            f"{r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def plots(result: dict, out: Path, front: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["n"] != "all"]
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, title in (
        (axes[0], "recall", "concept recall (higher is better)"),
        (axes[1], "artifact", "artifact score (lower is better)"),
    ):
        for label in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == label and metric in r]
            if mine:
                ax.errorbar(
                    [r["n"] for r in mine],
                    [r[metric] for r in mine],
                    yerr=[r[f"{metric}_se"] for r in mine],
                    marker="o",
                    capsize=2,
                    label=label,
                )
        ax.set_xlabel("N (LoRAs in the composition)")
        ax.set_ylabel(f"{metric}, +- 1 standard error")
        ax.set_title(f"Mini world: {title}")
        ax.set_xticks(sorted({r["n"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "recall_vs_n.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    if front:
        written.append(_front_plot(plt, [r for r in result["rows"] if r["n"] == "all"], out / "front.png"))
    return written


def _front_plot(plt, overall: list[dict], path: Path) -> Path:
    """Recall (with its standard error) against UNet MACs: the baselines as squares, each cache point's
    settings as one line through c = 1, 2, 3, 5, 8, labelled by c so that nothing overlaps."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lines: dict[str, list[dict]] = defaultdict(list)
    for r in overall:
        if r["method"].startswith("cmlora-c"):
            setting = r["method"].removeprefix("cmlora-c")
            interval, _, point = setting.partition("-")
            # c = 1 runs at the default cache point, which on the mini UNet (no block 1) is L0 b0
            lines[point or "L0b0"].append({**r, "c": int(interval)})
        else:
            ax.errorbar(
                r["gmacs"],
                r["recall"],
                yerr=r.get("recall_se", 0.0),
                marker="s",
                capsize=3,
                ls="none",
                label=r["method"],
            )
    names = {"L0b0": "cmlora, cache at level 0 block 0", "L1b0": "cmlora, cache at level 1 block 0"}
    for point, items in sorted(lines.items()):
        items.sort(key=lambda r: r["c"])
        ax.errorbar(
            [r["gmacs"] for r in items],
            [r["recall"] for r in items],
            yerr=[r.get("recall_se", 0.0) for r in items],
            marker="^" if point != "L1b0" else "o",
            capsize=3,
            label=names[point],
        )
        for r in items:
            ax.annotate(
                f"c={r['c']}",
                (r["gmacs"], r["recall"]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
    ax.set_xlabel("UNet GMAC per image")
    ax.set_ylabel("concept recall (all N), +- 1 standard error")
    ax.set_title("Mini world: quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--n", default="2,3,4,5")
    parser.add_argument(
        "--seeds", type=int, default=0, help="seeds per composition (default 0: enough for --images-per-n)"
    )
    parser.add_argument(
        "--images-per-n",
        type=int,
        default=200,
        help="images per method and N when --seeds is 0 (default 200: paired standard errors near 0.02)",
    )
    parser.add_argument("--steps", type=int, default=MINI_STEPS)
    parser.add_argument("--limit", type=int, default=0, help="only the first LIMIT compositions (0: all)")
    parser.add_argument(
        "--every", type=int, default=1, help="only every EVERY-th composition (a stratified subsample)"
    )
    parser.add_argument(
        "--front", action="store_true", help="cache-setting front instead of the method table"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=9,
        help="seeds of one composition and method denoised together (default 9: on this CPU a mini UNet "
        "call costs about the same at 2 and 4 rows)",
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="RUN",
        help="write one table and its plots to --out from finished run folders (e.g. --n 2, --n 3... run "
        "one after the other); generates nothing",
    )
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    if args.combine:
        try:
            result, front = combine([Path(d) for d in args.combine])
        except ValueError as exc:
            parser.error(str(exc))
    else:
        result, front = run(args), args.front
    if result is None:
        print("this shard is done; the last shard to finish scores the run and writes the table")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "quality.md").write_text(table + "\n")
    print(table)
    for path in plots(result, out, front):
        print(f"wrote {path}")
    return 0


MINI_STEPS = 20

if __name__ == "__main__":
    sys.exit(main())

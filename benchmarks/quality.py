"""Composition quality on the mini world: every composition (N = 2..5, 240 in all) x method x seed,
scored by the world's concept detectors as concept recall (share of the composition's concepts
detected) and all-concepts-present rate, per method and N, with a plot of recall vs N.

    python benchmarks/quality.py --out runs/quality              # methods of the papers, 2 seeds
    python benchmarks/quality.py --out runs/front --front        # cmlora cache settings vs cost

--front adds cmlora offline with cache interval c in 1, 2, 3, 5, 8 at two cache points beside merge,
switch and composite, and plots recall against UNet MACs per image (the speed/quality front). The mini
UNet has one block per level, so its two cache points are (level 0, block 0) and (level 1, block 0).
The run folder is a sweep folder: interrupting and re-running resumes; `cmlora report` reads it too.
Two CPU processes halve the wall time: run the same command with RANK=0 WORLD_SIZE=2 and RANK=1
WORLD_SIZE=2 (or under `accelerate launch`); the last one to finish scores and writes the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

MAIN_METHODS = {
    "none": ("none", None, {}),
    "merge": ("merge", None, {}),
    "switch": ("switch", None, {}),
    "composite": ("composite", None, {}),
    "cmlora-offline": ("cmlora", "offline", {}),
    "cmlora-online": ("cmlora", "online", {}),
    "cmlora-async": ("cmlora", "async", {}),
}


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
    from cmlora.sweep_cli import MINI_DEFAULTS, CompositionGenerator, mini_compositions
    from cmlora.testbed.compositions import image_seed
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
    jobs = [
        SweepJob(comp, label, spec[2], k, image_seed(defaults["base_seed"], comp.id, k))
        for comp in comps
        for k in range(args.seeds)
        for label, spec in methods.items()
    ]
    settings = {
        "benchmark": "quality",
        "front": args.front,
        "sizes": args.n,
        "seeds": args.seeds,
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
    return aggregate(Path(args.out), list(methods))


def aggregate(out: Path, labels: list[str]) -> dict:
    manifest = {json.loads(line)["image"]: json.loads(line) for line in (out / "manifest.jsonl").open()}
    scores = [json.loads(line) for line in (out / "eval" / "concepts.jsonl").open()]
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for score in scores:
        record = manifest[score["image"]]
        groups[(record["method"], record["n"])].append((score, record))
        groups[(record["method"], 0)].append((score, record))
    rows = []
    for label in labels:
        for n in sorted({n for (m, n) in groups if m == label}):
            items = groups[(label, n)]
            rows.append(
                {
                    "method": label,
                    "n": n if n else "all",
                    "images": len(items),
                    "recall": statistics.mean(s["recall"] for s, _ in items),
                    # standard error of the mean recall, over images
                    "recall_se": (
                        statistics.stdev(s["recall"] for s, _ in items) / len(items) ** 0.5
                        if len(items) > 1
                        else 0.0
                    ),
                    "all_present": statistics.mean(1.0 if s["all_present"] else 0.0 for s, _ in items),
                    "gmacs": statistics.mean(r["macs"] for _, r in items) / 1e9,
                    "seconds": statistics.mean(r["seconds"] for _, r in items),
                    "full_calls": statistics.mean(r["full_calls"] for _, r in items),
                    "cached_calls": statistics.mean(r["cached_calls"] for _, r in items),
                }
            )
    return {"rows": rows}


def markdown(result: dict) -> str:
    lines = [
        "| method | N | images | concept recall | all present | UNet calls (full+cached) | GMAC/image | s/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['n']} | {r['images']} | {r['recall']:.3f} | {r['all_present']:.3f} | "
            f"{r['full_calls']:.1f}+{r['cached_calls']:.1f} | {r['gmacs']:.2f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def plots(result: dict, out: Path, front: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["n"] != "all"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        ax.plot([r["n"] for r in mine], [r["recall"] for r in mine], marker="o", label=label)
    ax.set_xlabel("N (LoRAs in the composition)")
    ax.set_ylabel("concept recall")
    ax.set_title("Mini world: concept recall vs N")
    ax.set_xticks(sorted({r["n"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    parser.add_argument("--seeds", type=int, default=2)
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
        default=2,
        help="seeds of one composition and method denoised together (default 2: on this CPU a mini UNet "
        "call costs the same at 2 and 4 rows)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    result = run(args)
    if result is None:
        print("this shard is done; the last shard to finish scores the run and writes the table")
        return 0
    out = Path(args.out)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "quality.md").write_text(table + "\n")
    print(table)
    for path in plots(result, out, args.front):
        print(f"wrote {path}")
    return 0


MINI_STEPS = 20

if __name__ == "__main__":
    sys.exit(main())

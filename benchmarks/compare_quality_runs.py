"""Two quality runs of the same compositions, seeds and methods, compared image by image: what a
change of the world (a retrained LoRA, another base) did to each method's recall, and to each concept.

    python benchmarks/compare_quality_runs.py runs/quality_try16 runs/quality_try17
    python benchmarks/compare_quality_runs.py runs/q_before-n2 runs/q_after-n2 --json runs/diff.json
    python benchmarks/compare_quality_runs.py --save-scores runs/quality_try26 scores.jsonl.gz

A RUN is a scored run folder of `benchmarks/quality.py`, the OUT of `quality_by_n.sh` (its
``OUT-n<N>`` folders are read), or a file of per-image scores written by ``--save-scores``. Run
folders live in the gitignored ``runs/`` and do not outlive a checkout; the shipped world's scores,
saved beside its results, let a later world be compared with it without running its benchmark again.
Only images present in both runs are compared, and the runs must share their keys exactly: a
comparison of different image sets would not be paired. The change of the methods that apply LoRAs
("pooled") is averaged over those methods per composition and seed first, so that its standard
error counts each (composition, seed) once, not once per method.
Different judges are allowed (a world with a new judge) but reported, since their scores differ by
the judge too.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from cmlora.files import atomic_write_bytes

#: Methods that apply no LoRA: left out of the pooled change (a world's LoRAs cannot move them).
NO_LORA_METHODS = ("none",)


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality", Path(__file__).with_name("quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: benchmarks/quality.py: how a run folder is read and a standard error taken.
QUALITY = _quality_module()


def run_folders(run: Path) -> list[Path]:
    """The scored folders of RUN: itself, or the ``RUN-n<N>`` folders `quality_by_n.sh` wrote."""
    if (run / "manifest.jsonl").exists():
        return [run]
    folders = sorted(p for p in run.parent.glob(f"{run.name}-n*") if (p / "manifest.jsonl").exists())
    if not folders:
        raise ValueError(
            f"{run} is neither a quality run folder (no manifest.jsonl) nor the OUT of quality_by_n.sh "
            f"(no {run.name}-n<N> folders beside it)"
        )
    return folders


Key = tuple[str, int, str]  # composition, seed index, method


#: What a comparison reads of an image's score; ``--save-scores`` keeps these alone.
SCORE_FIELDS = ("recall", "graded", "artifact", "expected", "detected", "judge")


def read_run(run: Path) -> dict[Key, dict]:
    """Per image key: recall, graded, artifact, the expected and detected concepts, the judge id."""
    if run.is_file():
        return read_scores(run)
    out: dict[Key, dict] = {}
    for folder in run_folders(run):
        for score, record in QUALITY.read_scored(folder):
            out[(record["composition_id"], record["seed_index"], record["method"])] = score
    return out


def save_scores(scores: dict[Key, dict], path: Path) -> None:
    """One JSON line per image, sorted, gzip without a timestamp: the same run saves the same bytes."""
    lines = [
        json.dumps({"key": list(key), **{f: scores[key][f] for f in SCORE_FIELDS}}, sort_keys=True)
        for key in sorted(scores)
    ]
    atomic_write_bytes(path, gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))


def read_scores(path: Path) -> dict[Key, dict]:
    """The scores ``save_scores`` wrote."""
    try:
        with gzip.open(path, "rt") as f:
            records = [json.loads(line) for line in f]
        return {tuple(r.pop("key")): r for r in records}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a scores file of --save-scores ({exc})") from exc


def _summary(diffs: list[float], before: list[float], after: list[float]) -> dict:
    mean = statistics.mean(diffs)
    se = QUALITY._se(diffs)
    return {
        "images": len(diffs),
        "before": statistics.mean(before),
        "after": statistics.mean(after),
        "change": mean,
        "change_se": se,
        "z": mean / se if se else 0.0,
    }


def compare(before: dict[Key, dict], after: dict[Key, dict], metric: str = "recall") -> dict:
    """Per method, pooled over the methods that apply LoRAs, and per concept (pooled likewise: the
    share of the images asking for a concept in which the judge found it)."""
    if set(before) != set(after):
        only_b, only_a = sorted(set(before) - set(after)), sorted(set(after) - set(before))
        raise ValueError(
            f"the runs differ in their images ({len(only_b)} only in the first, e.g. {only_b[:2]}; "
            f"{len(only_a)} only in the second, e.g. {only_a[:2]}): compare runs of the same "
            "compositions, seeds and methods (the same quality.py settings)"
        )
    methods = sorted({m for _, _, m in before})
    per_method = {}
    for method in methods:
        keys = [k for k in sorted(before) if k[2] == method]
        b = [before[k][metric] for k in keys]
        a = [after[k][metric] for k in keys]
        per_method[method] = _summary([y - x for x, y in zip(b, a, strict=True)], b, a)
    lora_methods = [m for m in methods if m not in NO_LORA_METHODS]
    by_item: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for (comp, seed, method), score in sorted(before.items()):
        if method in lora_methods:
            by_item[(comp, seed)].append((score[metric], after[(comp, seed, method)][metric]))
    item_b = [statistics.mean(x for x, _ in v) for v in by_item.values()]
    item_a = [statistics.mean(y for _, y in v) for v in by_item.values()]
    pooled = _summary([y - x for x, y in zip(item_b, item_a, strict=True)], item_b, item_a)
    pooled["methods"] = lora_methods
    per_concept: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, score in sorted(before.items()):
        if key[2] not in lora_methods:
            continue
        new = after[key]
        for category, concept in score["expected"].items():
            found_b = score["detected"].get(category) == concept
            found_a = new["detected"].get(category) == concept
            per_concept[concept].append((float(found_b), float(found_a)))
    concepts = {
        c: _summary([y - x for x, y in v], [x for x, _ in v], [y for _, y in v])
        for c, v in sorted(per_concept.items())
    }
    judges = sorted({str(s.get("judge")) for run in (before, after) for s in run.values()})
    return {"metric": metric, "methods": per_method, "pooled": pooled, "concepts": concepts, "judges": judges}


def markdown(result: dict, names: tuple[str, str]) -> str:
    metric = result["metric"]
    lines = [
        f"{metric}: {names[0]} -> {names[1]}, image by image (change +- paired SE, z = change / SE)",
        "",
        "| method | images | before | after | change | z |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [*result["methods"].items(), ("pooled (LoRA methods)", result["pooled"])]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['images']} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{r['change']:+.3f} +- {r['change_se']:.3f} | {r['z']:+.1f} |"
        )
    lines += [
        "",
        "concepts found, over the images asking for them (LoRA methods pooled; SE over those images)",
        "",
        "| concept | images | before | after | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in result["concepts"].items():
        lines.append(
            f"| {name} | {r['images']} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{r['change']:+.3f} +- {r['change_se']:.3f} |"
        )
    if len(result["judges"]) > 1:
        lines += ["", f"scored by different judges: {', '.join(result['judges'])}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, nargs="?")
    parser.add_argument("after", type=Path, nargs="?")
    parser.add_argument("--metric", default="recall", choices=("recall", "graded", "artifact"))
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    parser.add_argument(
        "--save-scores",
        nargs=2,
        type=Path,
        metavar=("RUN", "FILE"),
        help="save RUN's per-image scores to FILE (.jsonl.gz), a RUN for later comparisons, and exit",
    )
    args = parser.parse_args(argv)
    if args.save_scores:
        if args.before or args.after:
            parser.error("--save-scores takes its RUN and FILE alone, without BEFORE and AFTER")
        run, path = args.save_scores
        try:
            scores = read_run(run)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        save_scores(scores, path)
        print(f"saved the scores of {len(scores)} images of {run} to {path}")
        return 0
    if not (args.before and args.after):
        parser.error("give BEFORE and AFTER (two runs to compare), or --save-scores RUN FILE")
    try:
        result = compare(read_run(args.before), read_run(args.after), args.metric)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result, (str(args.before), str(args.after))))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

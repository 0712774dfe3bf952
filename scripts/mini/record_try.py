"""Record a rebuild try of the mini world: its check, stage times and retrained files, kept beside the
tries page (docs/mini_world_tries.md), so that a try's figures outlive the run folder.

    python scripts/mini/record_try.py --try 31 --check runs/try31/check --check-log runs/try31/check.log \
        --times runs/try31/work/times.txt --assets runs/try31/assets \
        --files loras/character_2.safetensors mini_profile.json \
        --rule "docs/mini_world_tries.md, 'Rebuild try 31' (commit abc1234, before the run)" \
        --change "..." --command "python -m cmlora.mini.train loras ..." --command "..."

Writes ``benchmarks/results/mini_world_try<N>_{check.txt,check.json,times.txt}`` and the entry ``try_<N>``
of ``benchmarks/results/mini_world_details_rebuild.json`` (recall at 0.5 / 1.0 / 1.5 with the clipped
percentage at 1.5, cond/uncond, the criteria's counts, SHA-256 of the listed files). Refuses to replace
an entry that exists, so a try's record is written once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cmlora import files

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")
DETAILS = "mini_world_details_rebuild.json"
LORA_CRITERIA = ("strength_0.5", "strength_1.0", "strength_1.5", "no_trigger", "cond_uncond")


def read_times(path: str) -> dict[str, str]:
    """``name N s`` lines, as train_all.sh writes them."""
    with open(path) as f:
        return dict(line.strip().split(" ", 1) for line in f if line.strip())


def entry(check: dict, times: dict[str, str], hashes: dict[str, str], rule: str, change: str, commands):
    loras = check["loras"]
    counts = {c: len(loras["passing"][c]) for c in LORA_CRITERIA}
    merge = check["merge"]
    return {
        "rule": rule,
        "change": change,
        "commands": list(commands),
        "times": times,
        "counts": counts,
        "lora_count": sum(counts[c] for c in LORA_CRITERIA[:3]) + counts["cond_uncond"],
        "recall": {
            cid: [r["recall_0.5"], r["recall_1.0"], r["recall_1.5"], round(100 * r["clipped_1.5"], 2)]
            for cid, r in loras["rows"].items()
        },
        "cond_uncond": {
            cid: round(r["cond_change"] / r["uncond_change"], 3) for cid, r in loras["rows"].items()
        },
        "partial_knowledge": len(check["partial_knowledge"]["passing"]),
        "cross_talk_share": check["cross_talk"]["share"],
        "merge_interference": {
            "diff": round(merge["diff"], 4),
            "diff_se": round(merge["diff_se"], 4),
            "pairs": len(merge["strong_pairs"]),
            "ok": merge["ok"],
        },
        "judge_ok": check["judge"]["ok"],
        "sha256": hashes,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--try", dest="number", type=int, required=True)
    ap.add_argument("--check", required=True, help="the check's --out folder (its check.json)")
    ap.add_argument(
        "--check-log", required=True, help="what the check printed (its report lines kept as check.txt)"
    )
    ap.add_argument("--times", required=True, help="the stage times file (name N s per line)")
    ap.add_argument("--assets", required=True, help="the try's assets folder")
    ap.add_argument("--files", nargs="+", required=True, help="retrained files, relative to --assets")
    ap.add_argument("--rule", required=True)
    ap.add_argument("--change", required=True)
    ap.add_argument("--command", action="append", required=True, help="one per command the try ran")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args(argv)
    details_path = os.path.join(a.results, DETAILS)
    with open(details_path) as f:
        details = json.load(f)
    key = f"try_{a.number}"
    if key in details:
        sys.exit(f"{details_path} already holds {key}; a try is recorded once (pick its own number)")
    paths = {
        "check.json": os.path.join(a.check, "check.json"),
        "check.txt": a.check_log,
        "times.txt": a.times,
    }
    paths |= {f: os.path.join(a.assets, f) for f in a.files}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        sys.exit(
            f"not found: {', '.join(missing)}; give the try's check folder and log, times file and assets"
        )
    with open(paths["check.json"]) as f:
        check = json.load(f)
    record = entry(
        check,
        read_times(a.times),
        {f: files.sha256_file(paths[f]) for f in a.files},
        a.rule,
        a.change,
        a.command,
    )
    for name in ("check.json", "times.txt"):
        with open(paths[name], "rb") as f:
            files.atomic_write_bytes(os.path.join(a.results, f"mini_world_try{a.number}_{name}"), f.read())
    with open(paths["check.txt"]) as f:  # the report's lines, without library warnings and progress bars
        report = "".join(line for line in f if line.startswith(("==", "  ")))
    files.atomic_write_text(os.path.join(a.results, f"mini_world_try{a.number}_check.txt"), report)
    details[key] = record
    files.atomic_write_text(details_path, json.dumps(details, indent=1) + "\n")
    print(f"{key}: LoRA count {record['lora_count']}, counts {record['counts']}")


if __name__ == "__main__":
    main()

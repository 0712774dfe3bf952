"""The mini world's quality benchmark, at smoke size as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

from cmlora.methods import METHOD_LABELS

ROOT = Path(__file__).resolve().parents[1]


def run_quality(out: Path, *extra: str, steps: int = 2) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out", str(out), "--n", "2"]
        + ["--limit", "1", "--seeds", "2", "--steps", str(steps), "--threads", "1", "--quiet", *extra],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.stdout


def test_quality_benchmark_scores_every_method_and_plots(tmp_path):
    out = tmp_path / "q"
    printed = run_quality(out)
    rows = json.loads((out / "quality.json").read_text())["rows"]
    methods = list(METHOD_LABELS)  # every method and variant of the registry
    assert "switch-profiled" in methods and "cmlora-reference" in methods
    assert [(r["method"], r["n"]) for r in rows] == [(m, n) for m in methods for n in ("all", 2)]
    for r in rows:
        assert r["images"] == 2 and 0.0 <= r["recall"] <= 1.0 and r["recall_se"] >= 0.0
        assert 0.0 <= r["graded"] <= 1.0 and r["artifact"] >= 0.0
        # paired against composite: every method but composite itself
        assert ("recall_vs_composite" in r) == (r["method"] != "composite")
    by = {r["method"]: r for r in rows if r["n"] == "all"}
    assert by["composite"]["full_calls"] == 2 * 2 and by["merge"]["full_calls"] == 2
    assert by["merge"]["gmacs"] == by["none"]["gmacs"]  # fused: the base model's MACs
    assert (out / "recall_vs_n.png").stat().st_size > 0 and "| cmlora-async | all | 2 |" in printed
    manifest = (out / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == len(methods) * 2
    run_quality(out)  # resumes: nothing left to generate, same table
    assert (out / "manifest.jsonl").read_text().splitlines() == manifest


def test_quality_front_plots_cache_settings_against_cost(tmp_path):
    out = tmp_path / "f"
    run_quality(out, "--front", steps=4)  # c = 2 refreshes twice in 4 steps, c = 8 once
    rows = {r["method"]: r for r in json.loads((out / "quality.json").read_text())["rows"] if r["n"] == "all"}
    assert len(rows) == 3 + 1 + 4 * 2
    assert rows["cmlora-c8-L0b0"]["cached_calls"] > rows["cmlora-c2-L0b0"]["cached_calls"]
    assert rows["cmlora-c8-L0b0"]["gmacs"] < rows["composite"]["gmacs"]
    assert (out / "front.png").stat().st_size > 0


def test_seeds_per_n_reach_the_image_target():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)

    class Comp:
        def __init__(self, n):
            self.n = n

    comps = [Comp(2)] * 24 + [Comp(3)] * 72 + [Comp(4)] * 96 + [Comp(5)] * 48
    assert quality.seeds_per_n(comps, 0, 200) == {2: 9, 3: 3, 4: 3, 5: 5}
    assert quality.seeds_per_n(comps, 2, 200) == {2: 2, 3: 2, 4: 2, 5: 2}

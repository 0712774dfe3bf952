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


def load_quality():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


class Comp:
    def __init__(self, n, index):
        self.n, self.id = n, f"n{n}-{index}"


def test_seeds_per_n_reach_the_image_target_exactly():
    quality = load_quality()
    comps = [Comp(n, i) for n, count in ((2, 24), (3, 72), (4, 96), (5, 48)) for i in range(count)]
    seeds = quality.seeds_per_n(comps, 0, 200)
    assert seeds == {2: 9, 3: 3, 4: 3, 5: 5}
    assert quality.seeds_per_n(comps, 2, 200) == {2: 2, 3: 2, 4: 2, 5: 2}
    keys = quality.image_keys(comps, seeds, 200)
    for n in (2, 3, 4, 5):
        per_comp = [sum((c.id, k) in keys for k in range(seeds[n])) for c in comps if c.n == n]
        assert sum(per_comp) == 200 and max(per_comp) - min(per_comp) <= 1
        # the cut keeps the lowest seed indices: a composition's seeds are 0..k-1
        assert all((c.id, k) in keys for c in comps if c.n == n for k in range(min(per_comp)))
    assert len(quality.image_keys(comps, {2: 2, 3: 2, 4: 2, 5: 2}, 0)) == 2 * 240  # --seeds: all of them


def write_run(
    out: Path,
    sizes: str,
    rows: list[tuple],
    steps: int = 20,
    scored: int | None = None,
    judge: str | None = None,
):
    """A finished quality run folder: rows of (method, n, composition, seed, recall)."""
    (out / "eval").mkdir(parents=True)
    settings = {"benchmark": "quality", "front": False, "sizes": sizes, "steps": steps}
    settings["methods"] = {"merge": ["merge", None, {}], "composite": ["composite", None, {}]}
    info = {"settings": settings, "jobs": {"count": len(rows)}}
    (out / "run.json").write_text(json.dumps(info))
    records, scores = [], []
    for i, (method, n, comp, seed, recall) in enumerate(rows):
        records.append({"image": f"{i}.png", "method": method, "n": n, "composition_id": comp, "seed": seed})
        records[-1].update(macs=1e9, seconds=1.0, full_calls=20, cached_calls=0)
        scores.append({"image": f"{i}.png", "recall": recall, "graded": recall, "artifact": 1.0})
        scores[-1]["all_present"] = recall == 1.0
        if judge is not None:
            scores[-1]["judge"] = judge
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    scores = scores[:scored] if scored is not None else scores
    (out / "eval" / "concepts.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))


def test_combine_makes_one_paired_table_from_runs_of_each_n(tmp_path):
    quality = load_quality()
    write_run(tmp_path / "n2", "2", [("merge", 2, "a", 1, 1.0), ("composite", 2, "a", 1, 0.5)])
    write_run(tmp_path / "n3", "3", [("merge", 3, "b", 7, 1 / 3), ("composite", 3, "b", 7, 1.0)])
    result, front = quality.combine([tmp_path / "n2", tmp_path / "n3"])
    rows = {(r["method"], r["n"]): r for r in result["rows"]}
    assert list(rows) == [("merge", "all"), ("merge", 2), ("merge", 3)] + [
        ("composite", "all"),
        ("composite", 2),
        ("composite", 3),
    ]
    assert not front and rows[("merge", "all")]["images"] == 2
    assert rows[("merge", 2)]["recall_vs_composite"] == 0.5
    assert abs(rows[("merge", "all")]["recall_vs_composite"] - (0.5 - 2 / 3) / 2) < 1e-12
    assert "recall_vs_composite" not in rows[("composite", "all")]


def test_combine_refuses_overlapping_unfinished_or_unlike_runs(tmp_path):
    import pytest

    quality = load_quality()
    write_run(tmp_path / "a", "2", [("merge", 2, "a", 1, 1.0)])
    write_run(tmp_path / "b", "2,3", [("merge", 3, "b", 1, 1.0)])
    write_run(tmp_path / "c", "3", [("merge", 3, "b", 1, 1.0)], steps=4)
    write_run(tmp_path / "d", "4", [("merge", 4, "d", 1, 1.0), ("composite", 4, "d", 1, 1.0)], scored=1)
    with pytest.raises(ValueError, match=r"N = 2 is in both .*a and .*b: combine each N once"):
        quality.combine([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match=r"differ in 'steps' \(20 vs 4\)"):
        quality.combine([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(ValueError, match=r"has 1 scored images of 2: finish it"):
        quality.combine([tmp_path / "d"])
    with pytest.raises(ValueError, match=r"is not a finished quality run \(FileNotFoundError"):
        quality.combine([tmp_path / "missing"])
    write_run(tmp_path / "e", "2", [("merge", 2, "a", 1, 1.0)], judge="aaaa")
    write_run(tmp_path / "f", "3", [("merge", 3, "b", 1, 1.0)], judge="bbbb")
    write_run(tmp_path / "g", "3", [("merge", 3, "b", 1, 1.0)], judge="aaaa")
    with pytest.raises(ValueError, match=r"different judges: aaaa \(first in .*e\), bbbb \(first in .*f\)"):
        quality.combine([tmp_path / "e", tmp_path / "f"])
    with pytest.raises(ValueError, match=r"different judges: unrecorded .*, aaaa"):
        quality.combine([tmp_path / "c", tmp_path / "e"])  # scored before judges were recorded
    assert quality.combine([tmp_path / "e", tmp_path / "g"])[0]["rows"]


def test_combine_on_the_command_line_writes_table_and_plots(tmp_path, capsys):
    import pytest

    quality = load_quality()
    write_run(tmp_path / "n2", "2", [("merge", 2, "a", 1, 1.0), ("composite", 2, "a", 1, 0.5)])
    write_run(tmp_path / "n3", "3", [("merge", 3, "b", 7, 0.0), ("composite", 3, "b", 7, 1.0)])
    out = tmp_path / "all"
    assert quality.main(["--combine", str(tmp_path / "n2"), str(tmp_path / "n3"), "--out", str(out)]) == 0
    assert "| merge | 2 | 1 | 1.000 | +0.500 +- 0.000 |" in (out / "quality.md").read_text()
    assert (out / "recall_vs_n.png").stat().st_size > 0 and json.loads((out / "quality.json").read_text())
    with pytest.raises(SystemExit) as exc:
        quality.main(["--combine", str(tmp_path / "n2"), str(tmp_path / "n2"), "--out", str(out)])
    assert exc.value.code == 2 and "N = 2 is in both" in capsys.readouterr().err

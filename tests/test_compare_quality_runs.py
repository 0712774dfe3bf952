"""benchmarks/compare_quality_runs.py: the paired comparison of two quality runs of one image set."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "compare_quality_runs", ROOT / "benchmarks" / "compare_quality_runs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(folder: Path, recalls: dict[tuple[str, int, str], float], judge: str = "j1") -> None:
    """A scored run folder: one image per key, with a 2-concept composition found by its recall."""
    (folder / "eval").mkdir(parents=True)
    with (
        (folder / "manifest.jsonl").open("w") as manifest,
        (folder / "eval" / "concepts.jsonl").open("w") as ev,
    ):
        for (comp, seed, method), recall in recalls.items():
            image = f"images/{comp}--{method}--s{seed}.png"
            manifest.write(
                json.dumps({"image": image, "composition_id": comp, "seed_index": seed, "method": method})
                + "\n"
            )
            detected = {"character": "c1" if recall >= 0.5 else None, "object": "o1" if recall == 1 else None}
            ev.write(
                json.dumps(
                    {
                        "image": image,
                        "recall": recall,
                        "graded": recall,
                        "artifact": 1.0,
                        "all_present": recall == 1,
                        "expected": {"character": "c1", "object": "o1"},
                        "detected": detected,
                        "judge": judge,
                    }
                )
                + "\n"
            )


def test_pooled_change_counts_each_composition_and_seed_once(tmp_path):
    cmp = _module()
    keys = [(c, s) for c in ("a", "b") for s in (0, 1)]
    before = {(c, s, m): 0.5 for c, s in keys for m in ("merge", "composite", "none")}
    after = dict(before)
    after[("a", 0, "merge")] = 1.0  # +0.5 on one item of one method
    after[("b", 1, "composite")] = 0.0  # -0.5 on another
    after[("a", 1, "none")] = 1.0  # a method without LoRAs: not pooled
    _write_run(tmp_path / "q1-n2", before)
    _write_run(tmp_path / "q2-n2", after)
    result = cmp.compare(cmp.read_run(tmp_path / "q1"), cmp.read_run(tmp_path / "q2"))
    assert result["pooled"]["methods"] == ["composite", "merge"]
    assert result["pooled"]["images"] == 4
    # per (composition, seed), the mean over merge and composite: +0.25, 0, 0, -0.25
    assert result["pooled"]["change"] == pytest.approx(0.0)
    assert result["pooled"]["change_se"] == pytest.approx((0.25**2 * 2 / 3) ** 0.5 / 2)
    assert result["methods"]["merge"]["change"] == pytest.approx(0.125)
    assert result["methods"]["none"]["after"] == pytest.approx(0.625)
    # c1 is found at recall >= 0.5: lost only where composite fell to 0; o1 found only at recall 1
    assert result["concepts"]["c1"]["change"] == pytest.approx(-1 / 8)
    assert result["concepts"]["o1"]["change"] == pytest.approx(1 / 8)
    assert result["judges"] == ["j1"]


def test_runs_of_different_images_are_refused_with_the_difference(tmp_path, capsys):
    cmp = _module()
    _write_run(tmp_path / "one", {("a", 0, "merge"): 1.0, ("a", 1, "merge"): 1.0})
    _write_run(tmp_path / "two", {("a", 0, "merge"): 1.0, ("b", 0, "merge"): 0.0}, judge="j2")
    assert cmp.main([str(tmp_path / "one"), str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert "1 only in the first, e.g. [('a', 1, 'merge')]" in err
    assert "1 only in the second, e.g. [('b', 0, 'merge')]" in err


def test_a_folder_that_is_no_run_is_named(tmp_path, capsys):
    cmp = _module()
    assert cmp.main([str(tmp_path / "missing"), str(tmp_path / "missing")]) == 2
    assert "missing is neither a quality run folder" in capsys.readouterr().err


def test_markdown_and_json_name_the_judges_when_they_differ(tmp_path, capsys):
    cmp = _module()
    _write_run(tmp_path / "one", {("a", 0, "merge"): 0.5, ("a", 1, "merge"): 1.0})
    _write_run(tmp_path / "two", {("a", 0, "merge"): 1.0, ("a", 1, "merge"): 1.0}, judge="j2")
    out = tmp_path / "diff.json"
    assert cmp.main([str(tmp_path / "one"), str(tmp_path / "two"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| merge | 2 | 0.750 | 1.000 | +0.250 +- 0.250 | +1.0 |" in text
    assert "scored by different judges: j1, j2" in text
    assert json.loads(out.read_text())["methods"]["merge"]["change"] == 0.25


def test_saved_scores_compare_as_their_run_and_save_the_same_bytes(tmp_path, capsys):
    cmp = _module()
    _write_run(tmp_path / "one-n2", {("a", 0, "merge"): 0.5, ("a", 1, "merge"): 1.0})
    _write_run(tmp_path / "two-n2", {("a", 0, "merge"): 1.0, ("a", 1, "merge"): 1.0})
    saved, again = tmp_path / "one.jsonl.gz", tmp_path / "again.jsonl.gz"
    assert cmp.main(["--save-scores", str(tmp_path / "one"), str(saved)]) == 0
    assert "saved the scores of 2 images" in capsys.readouterr().out
    assert cmp.main(["--save-scores", str(tmp_path / "one"), str(again)]) == 0
    assert saved.read_bytes() == again.read_bytes()
    assert not list(tmp_path.glob("*.part"))
    from_file = cmp.compare(cmp.read_run(saved), cmp.read_run(tmp_path / "two"))
    from_run = cmp.compare(cmp.read_run(tmp_path / "one"), cmp.read_run(tmp_path / "two"))
    assert from_file == from_run
    assert from_file["methods"]["merge"]["change"] == 0.25


def test_a_file_that_is_no_scores_file_is_named(tmp_path, capsys):
    cmp = _module()
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    _write_run(tmp_path / "two", {("a", 0, "merge"): 1.0})
    assert cmp.main([str(bad), str(tmp_path / "two")]) == 2
    assert "notes.txt is not a scores file of --save-scores" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cmp.main(["--save-scores", str(tmp_path / "two"), str(bad), str(tmp_path / "two")])

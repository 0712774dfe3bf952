"""The mini world's acceptance check (scripts/mini/check_world.py) at smoke size, as a user runs it."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_check_world_measures_every_section(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mini" / "check_world.py"), "--out", str(out)]
        + ["--seeds", "2", "--steps", "2", "--n-detector", "24", "--cross-seeds", "1"]
        + ["--merge-compositions", "1", "--blend-images", "2", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads((out / "check.json").read_text())
    assert set(result) >= {"judge", "base_quality", "partial_knowledge", "loras", "cross_talk", "merge"}
    assert set(result["loras"]["rows"]) == {f"character_{k}" for k in (1, 2, 3)} | {
        "clothing_1",
        "clothing_2",
        "style_1",
        "style_2",
        "background_1",
        "background_2",
        "object_1",
        "object_2",
    }
    row_ids = set(result["loras"]["rows"])
    row = result["loras"]["rows"]["character_2"]
    assert {"recall_0.5", "recall_1.0", "recall_1.5", "clipped_1.5", "cond_change", "uncond_change"} <= set(
        row
    )
    assert len(result["cross_talk"]["graded_of_a"]) == 96  # ordered pairs of different categories
    assert all(len(curve) == 5 for curve in result["judge"]["blend"].values())
    near = result["judge"]["near_miss_detected"]
    assert set(near) == {"clean", "roundtrip"} and all(set(v) == set(row_ids) for v in near.values())
    assert "criteria" in done.stdout and (out / "base_generic.png").stat().st_size > 0


def _check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_world", ROOT / "scripts" / "mini" / "check_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lora_row(**changes):
    row = {
        "recall_0.5": 0.5,
        "recall_1.0": 0.9,
        "recall_1.5": 0.8,
        "clipped_1.5": 0.049,
        "recall_no_trigger": 0.45,
        "cond_change": 2.0,
        "uncond_change": 1.0,
    }
    return dict(row, **changes)


def test_per_concept_counts_use_the_criteria_at_their_boundaries(tmp_path):
    check = _check_module()
    partial = {
        "a": {"graded_tags": 0.3, "recall_trigger": 0.2},  # both exactly at the thresholds: passes
        "b": {"graded_tags": 0.29, "recall_trigger": 0.0},
        "c": {"graded_tags": 0.9, "recall_trigger": 0.25},
    }
    assert check.partial_passing(partial) == ["a"]
    loras = {
        "ok": _lora_row(),
        "weak": _lora_row(**{"recall_0.5": 0.45, "recall_1.0": 0.85}),
        "clipped": _lora_row(**{"clipped_1.5": 0.05}),
        "agnostic": _lora_row(recall_no_trigger=0.46, cond_change=1.9),
    }
    assert check.lora_passing(loras) == {
        "strength_0.5": ["ok", "clipped", "agnostic"],
        "strength_1.0": ["ok", "clipped", "agnostic"],
        "strength_1.5": ["ok", "weak", "agnostic"],
        "no_trigger": ["ok", "clipped"],  # weak: 0.45 > 0.5 x its own recall 0.85
        "cond_uncond": ["ok", "weak", "clipped"],
    }
    saved = tmp_path / "check.json"
    saved.write_text(json.dumps({"partial_knowledge": {"rows": partial}, "loras": {"rows": loras}}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mini" / "check_world.py"), "--summarize", str(saved)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "partial knowledge (both halves): 1 of 3 ['a']" in done.stdout
    assert "cond_uncond: 3 of 4 ['ok', 'weak', 'clipped']" in done.stdout
    assert not (tmp_path / "check").exists()  # summarizing generates nothing


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--factors", "0.8"], "--factors 0.8: give positive pairs UNET:TE"),
        (["--factors", "a:b"], "--factors a:b: give positive pairs UNET:TE"),
        (["--loras", "flower"], "--loras flower: no such LoRA"),
    ],
)
def test_overdrive_diagnosis_refuses_bad_options_before_writing(tmp_path, extra, message):
    out = tmp_path / "o.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mini" / "diagnose_overdrive.py"), "--out", str(out), *extra],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not out.exists()


def test_record_try_reproduces_the_recorded_tries_and_writes_once(tmp_path):
    """Tries 29 and 30 were recorded by hand from their checks; the script gives the same figures from
    the same check files, copies the files beside them, and refuses to record a try number twice."""
    results = ROOT / "benchmarks" / "results"
    details = json.loads((results / "mini_world_details_rebuild.json").read_text())
    out = tmp_path / "results"
    out.mkdir()
    kept = {k: v for k, v in details.items() if k not in ("try_29", "try_30")}
    (out / "mini_world_details_rebuild.json").write_text(json.dumps(kept))
    assets = tmp_path / "assets"
    (assets / "loras").mkdir(parents=True)
    (assets / "loras" / "object_1.safetensors").write_bytes(b"weights")
    for n in (29, 30):
        check = tmp_path / f"check{n}"
        check.mkdir()
        (check / "check.json").write_bytes((results / f"mini_world_try{n}_check.json").read_bytes())
        log = tmp_path / f"check{n}.log"
        report = (results / f"mini_world_try{n}_check.txt").read_text()
        log.write_text("[transformers] a warning\nLoading pipeline components: 100%\n" + report)
        times = results / f"mini_world_try{n}_times.txt"
        cmd = [
            sys.executable,
            str(ROOT / "scripts" / "mini" / "record_try.py"),
            "--try",
            str(n),
            "--check",
            str(check),
            "--check-log",
            str(log),
            "--times",
            str(times),
            "--assets",
            str(assets),
            "--files",
            "loras/object_1.safetensors",
            "--rule",
            "r",
            "--change",
            "c",
            "--command",
            "x",
            "--results",
            str(out),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        got = json.loads((out / "mini_world_details_rebuild.json").read_text())[f"try_{n}"]
        for key in ("counts", "lora_count", "recall", "cond_uncond", "partial_knowledge", "times"):
            assert got[key] == details[f"try_{n}"][key], key
        assert got["merge_interference"] == details[f"try_{n}"]["merge_interference"]
        assert got["sha256"] == {"loras/object_1.safetensors": hashlib.sha256(b"weights").hexdigest()}
        assert (out / f"mini_world_try{n}_check.txt").read_text() == report
        again = subprocess.run(cmd, capture_output=True, text=True)
        assert again.returncode == 1 and f"already holds try_{n}" in again.stderr


@pytest.mark.parametrize("item", ["flower:1.5", "style_1:-0.5", "style_1:strong", "style_1"])
def test_clipping_diagnosis_refuses_bad_generated_pairs_before_writing(tmp_path, item):
    out = tmp_path / "c.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "mini" / "diagnose_clipping.py"),
            "--out",
            str(out),
            "--generated",
            item,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and f"--generated {item}: give LORA:STRENGTH" in r.stderr, r.stderr
    assert not out.exists()

"""The mini world's acceptance check (scripts/mini/check_world.py) at smoke size, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

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

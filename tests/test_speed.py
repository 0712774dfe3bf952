"""Speed machinery: the benchmark runs (tiny smoke), and adapter activation never walks modules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmlora import LoRA, compose

ROOT = Path(__file__).resolve().parents[1]


def test_activation_never_calls_set_adapters(sd15, sd15_loras, monkeypatch):
    """Switching LoRAs per UNet call is one router write, not diffusers/PEFT's module walk."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.loaders.peft import PeftAdapterMixin

    def forbidden(*args, **kwargs):
        raise AssertionError("set_adapters called during composition")

    monkeypatch.setattr(PeftAdapterMixin, "set_adapters", forbidden)
    monkeypatch.setattr(LoraBaseMixin, "set_adapters", forbidden, raising=False)
    for method in ("switch", "composite", "cmlora"):
        r = compose(
            sd15,
            [LoRA(p) for p in sd15_loras],
            method=method,
            prompt="red",
            num_inference_steps=3,
            guidance_scale=3.0,
            height=16,
            width=16,
            progress=False,
        )
        assert r.records[0]["full_calls"] >= 3


def test_router_activation_is_constant_time(sd15, sd15_loras):
    import time

    from cmlora.api import Composer

    with Composer(sd15, [LoRA(p) for p in sd15_loras]) as c:
        router = c.adapters.unet
        start = time.perf_counter()
        for _ in range(10_000):
            router.set(((c.loras[0].adapter, 1.0),))
            router.clear()
        per_switch = (time.perf_counter() - start) / 10_000
    assert per_switch < 20e-6  # a UNet call of even the tiny model takes milliseconds


def run_speed(tmp_path, *extra: str) -> tuple[dict, str]:
    """The benchmark at tiny size as a user runs it: (its JSON, its printed table). Its temporary
    folder (TMPDIR) holds none of its folders afterwards: the LoRA files and tokenizers it wrote are
    gone (torch may leave its own compile cache there)."""
    out = tmp_path / "speed.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--arch", "tiny", "--n", "2", "--steps", "3"]
        + ["--repeats", "1", "--threads", "1", "--rank", "4", "--out", str(out), *extra],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert [p.name for p in scratch.iterdir() if p.name.startswith("cmlora-")] == []
    return json.loads(out.read_text()), done.stdout


def test_speed_benchmark_smoke(tmp_path):
    result, printed = run_speed(tmp_path)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) >= {
        "diffusers-plain",
        "peft-merge",
        "peft-fused",
        "peft-switch",
        "merge",
        "switch",
        "switch-profiled",
        "composite",
        "cmlora-offline",
        "cmlora-reference-c3",
    }
    assert rows["switch-profiled"]["full_calls"] == 3 and rows["switch-profiled"]["cached_calls"] == 0
    assert rows["loratorio"]["full_calls"] == 3 * 3 and rows["loratorio-c3"]["cached_calls"] > 0
    assert rows["composite"]["full_calls"] == 2 * 3 and rows["composite"]["cached_calls"] == 0
    assert rows["cmlora-reference-c3"]["full_calls"] == 2 + (3 - 1) // 3
    assert rows["composite"]["x_composite"] == 1.0
    assert rows["merge"]["peer"] == "peft-fused"  # fused by default
    assert rows["switch"]["peer"] == "peft-switch" and "x_peer" in rows["switch"]
    assert all("x_floor" in r for r in rows.values())
    assert "| x floor | x peer |" in printed
    assert all(0.0 <= r["outside_unet_share"] < 1.0 for r in rows.values())


def test_speed_benchmark_peer_rows(tmp_path):
    """Plain diffusers and diffusers + PEFT on the same pipeline and files (in the defaults): their rows,
    the same calls and MACs as their cmlora counterparts, and each cmlora row's ratio to its peer and
    to the floor. N = 2 then 3: the peers run after a Composer has detached, and leave no PEFT layer."""
    result, printed = run_speed(
        tmp_path,
        "--n",
        "2,3",
        "--methods",
        "diffusers-plain,peft-merge,peft-fused,peft-switch,merge,switch",
        "--fuse",
        "both",
    )
    rows = {(r["n"], r["method"]): r for r in result["rows"]}
    peers = ("diffusers-plain", "peft-merge", "peft-fused", "peft-switch")
    assert [m for n, m in rows if n == 3] == [*peers, "merge", "merge fused", "switch", "switch fused"]
    for n in (2, 3):
        plain = rows[(n, "diffusers-plain")]
        assert plain["full_calls"] == 3 and plain["loras"] == 0 and plain["x_floor"] == 1.0
        assert all(rows[(n, p)]["loras"] == n for p in peers[1:])
        assert rows[(n, "peft-fused")]["fuse_seconds"] > 0 and rows[(n, "peft-fused")]["fused"]
        for mine, peer in (("merge", "peft-merge"), ("merge fused", "peft-fused"), ("switch", "peft-switch")):
            row = rows[(n, mine)]
            assert row["peer"] == peer and row["x_peer"] == row["seconds"] / rows[(n, peer)]["seconds"]
            assert row["gmacs"] == pytest.approx(rows[(n, peer)]["gmacs"])  # the same compute
            assert row["x_floor"] == row["seconds"] / plain["seconds"]
        assert rows[(n, "peft-fused")]["gmacs"] == pytest.approx(plain["gmacs"])
        assert plain["gmacs"] < rows[(n, "peft-switch")]["gmacs"] < rows[(n, "peft-merge")]["gmacs"]
    assert "| x floor | x peer |" in printed and "(peft-fused) |" in printed


def test_speed_benchmark_times_both_batching_paths(tmp_path):
    """--batch both: each multi-call method sequential then batched, same calls, and the comparison."""
    result, printed = run_speed(tmp_path, "--methods", "merge,composite,cmlora-offline", "--batch", "both")
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == [
        "merge",
        "composite",
        "composite batched",
        "cmlora-offline",
        "cmlora-offline batched",
    ]
    assert [r["batched"] for r in rows.values()] == [False, False, True, False, True]
    for label in ("composite", "cmlora-offline"):
        seq, bat = rows[label], rows[f"{label} batched"]
        assert (seq["full_calls"], seq["cached_calls"]) == (bat["full_calls"], bat["cached_calls"])
    assert "| 2 | composite | " in printed and "batched / sequential" in printed


def test_speed_benchmark_times_both_fusing_paths(tmp_path):
    """--fuse both: merge and switch un-fused then fused (fewer MACs: a fused layer is one matmul);
    multi-call methods, which never fuse, once."""
    result, printed = run_speed(tmp_path, "--methods", "merge,switch,composite", "--fuse", "both")
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["merge", "merge fused", "switch", "switch fused", "composite"]
    assert [r["fused"] for r in rows.values()] == [False, True, False, True, False]
    for label in ("merge", "switch"):
        assert rows[f"{label} fused"]["gmacs"] < rows[label]["gmacs"]
        assert rows[f"{label} fused"]["full_calls"] == rows[label]["full_calls"] == 3
    assert "fused / un-fused" in printed and "| 2 | merge | " in printed


def test_speed_benchmark_names_unknown_methods(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_bench", ROOT / "benchmarks" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--methods", "merge,none", "--out", str(tmp_path / "s.json")])
    assert exit_info.value.code == 2
    assert "unknown methods ['none']" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()

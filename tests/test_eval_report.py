"""Report numbers on a hand-made run with known answers; manifest validation; CLI registration."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cmlora.app.evaluate import add_eval_subcommands, add_report_subcommand
from cmlora.evaluate.report import (
    WinTieLoss,
    bootstrap_ci,
    build_report,
    cost_series,
    render_markdown,
    winrate_series,
    write_plots,
    write_report,
)
from cmlora.evaluate.runs import JsonlAppender, ManifestError, read_jsonl, read_manifest, resolve_image

# (composition, n, method, clipscore, full_calls, seconds)
IMAGES = [
    ("c1", 2, "cmlora", 20.0, 100, 2.0),
    ("c1", 2, "switch", 18.0, 50, 1.0),
    ("c2", 2, "cmlora", 30.0, 100, 4.0),
    ("c2", 2, "switch", 22.0, 50, 1.0),
    ("c3", 3, "cmlora", 25.0, 120, 3.0),
    ("c3", 3, "switch", 21.0, 50, 1.5),
]


def _entry(comp: str, n: int, method: str, full_calls: int, seconds: float) -> dict[str, Any]:
    loras = [
        {"name": f"L{k}", "category": "character" if k == 0 else "object", "triggers": [f"t{k}"]}
        for k in range(n)
    ]
    return {
        "image": f"images/{method}-{comp}.png",
        "job_id": f"{method}-{comp}",
        "composition_id": comp,
        "n": n,
        "method": method,
        "seed": 111,
        "seed_index": 0,
        "prompt": "p",
        "loras": loras,
        "full_calls": full_calls,
        "cached_calls": 0,
        "macs": 2_000_000_000,
        "seconds": seconds,
    }


def _verdict(
    comp: str, n: int, shown: list[str], cm: tuple[float, float], sw: tuple[float, float] | None
) -> dict:
    rec: dict[str, Any] = {
        "composition_id": comp,
        "seed_index": 0,
        "n": n,
        "methods": shown,
        "pair": ["cmlora", "switch"],
    }
    rec["model"] = "judge-x"
    if sw is None:
        rec.update(failure="malformed reply after 3 attempt(s)", failure_kind="malformed", raw_reply_sha=None)
    else:
        rec["scores"] = {
            "cmlora": {"composition": cm[0], "image": cm[1]},
            "switch": {"composition": sw[0], "image": sw[1]},
        }
        rec["raw_reply_sha"] = "0" * 64
    return rec


AB, BA = ["cmlora", "switch"], ["switch", "cmlora"]
VERDICTS = [
    _verdict("c1", 2, AB, (8, 7), (6, 7)),  # comp win, image tie
    _verdict("c1", 2, BA, (7, 5), (7, 6)),  # comp tie, image loss
    _verdict("c2", 2, AB, (9, 8), (3, 6)),  # comp win, image win
    _verdict("c2", 2, BA, (0, 0), None),  # failure
    _verdict("c3", 3, AB, (2, 5), (4, 5)),  # comp loss, image tie
    _verdict("c3", 3, BA, (0, 0), None),  # failure, superseded by the next line
    _verdict("c3", 3, BA, (6, 4), (5, 4)),  # comp win, image tie
]


def _make_run(root: Path, concepts: bool) -> Path:
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    manifest = [_entry(c, n, m, fc, s) for c, n, m, _, fc, s in IMAGES]
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    clip = [
        {"image": f"images/{m}-{c}.png", "clipscore": cs, "clip_model": "clip-b16"}
        for c, _, m, cs, _, _ in IMAGES
    ]
    (run / "eval" / "clipscore.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clip))
    (run / "eval" / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in VERDICTS))
    if concepts:
        rows = [
            {
                "image": f"images/{m}-{c}.png",
                "recall": 1.0 if m == "cmlora" else 0.5,
                "all_present": m == "cmlora",
            }
            for c, _, m, _, _, _ in IMAGES
        ]
        (run / "eval" / "concepts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _row(data: Any, n: Any, dim: str) -> Any:
    (row,) = [r for r in data.judge if r.n == n and r.dimension == dim]
    return row


def test_win_tie_loss_pooled_over_orders(tmp_path: Path) -> None:
    data = build_report(_make_run(tmp_path, concepts=False))
    assert {(r.a, r.b, r.model) for r in data.judge} == {("cmlora", "switch", "judge-x")}
    # c2 is judged in one order only (its other order failed): it counts as half-judged, not as a win.
    expect = {
        (2, "composition"): (1, 1, 0, 1, 1),
        (2, "image"): (0, 1, 1, 1, 1),
        (3, "composition"): (1, 0, 1, 0, 0),
        (3, "image"): (0, 2, 0, 0, 0),
        ("all", "composition"): (2, 1, 1, 1, 1),
        ("all", "image"): (0, 3, 1, 1, 1),
    }
    for (n, dim), (w, t, lo, f, half) in expect.items():
        row = _row(data, n, dim)
        assert (row.wins, row.ties, row.losses, row.failures, row.half_judged) == (w, t, lo, f, half), (
            n,
            dim,
        )
    row = _row(data, 2, "composition")
    assert row.mean_a == pytest.approx(7.5) and row.mean_b == pytest.approx(6.5)
    assert row.rate(row.wins) == pytest.approx(1 / 2)


def _write_verdicts(run: Path, verdicts: list[dict[str, Any]]) -> None:
    (run / "eval" / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in verdicts))


def test_half_judged_items_left_out_and_counted(tmp_path: Path) -> None:
    run = _make_run(tmp_path, concepts=False)
    _write_verdicts(
        run,
        [
            _verdict("c1", 2, AB, (8, 7), (6, 7)),  # judged in both orders: counted
            _verdict("c1", 2, BA, (9, 7), (5, 7)),
            _verdict("c2", 2, AB, (9, 8), (3, 6)),  # the other order failed after its retries
            _verdict("c2", 2, BA, (0, 0), None),
            _verdict("c3", 3, AB, (1, 1), (9, 9)),  # the other order is not judged yet
        ],
    )
    data = build_report(run)
    two = _row(data, 2, "composition")
    assert (two.wins, two.ties, two.losses, two.judged, two.failures, two.half_judged) == (2, 0, 0, 2, 1, 1)
    assert two.mean_a == pytest.approx(8.5) and two.mean_b == pytest.approx(5.5)
    three = _row(data, 3, "composition")
    assert (three.judged, three.failures, three.half_judged) == (0, 0, 1)
    assert math.isnan(three.mean_a) and math.isnan(three.rate(three.wins))
    pooled = _row(data, "all", "image")
    assert (pooled.judged, pooled.failures, pooled.half_judged) == (2, 1, 2)
    text = render_markdown(data)
    assert "**2 half-judged item(s)** not counted" in text
    assert "| 2 | cmlora vs switch | composition | 100.0% (2) | 0.0% (0) | 0.0% (0) | 2 | 1 | 1 |" in text
    assert "| 3 | cmlora vs switch | composition | – | – | – | 0 | 0 | 1 |" in text
    # Once every item is judged in both orders, the warning goes away.
    _write_verdicts(run, [_verdict("c1", 2, AB, (8, 7), (6, 7)), _verdict("c1", 2, BA, (9, 7), (5, 7))])
    assert "half-judged item(s)" not in render_markdown(build_report(run))


def test_winrate_plot_data_keeps_ties(tmp_path: Path) -> None:
    run = _make_run(tmp_path, concepts=False)
    data = build_report(run)
    series = winrate_series(data.judge)
    assert set(series) == {("judge-x", "cmlora", "switch", d) for d in ("composition", "image")}
    # N = 3, image quality: every comparison a tie.  It must be drawn as 100 % ties, not as 0 % wins.
    assert series[("judge-x", "cmlora", "switch", "image")] == [
        WinTieLoss(n=2, wins=0, ties=1, losses=1),
        WinTieLoss(n=3, wins=0, ties=2, losses=0),
    ]
    assert series[("judge-x", "cmlora", "switch", "image")][1].percent() == (0.0, 100.0, 0.0)
    assert series[("judge-x", "cmlora", "switch", "composition")][0].percent() == (50.0, 50.0, 0.0)
    assert write_plots(data, run / "plots")[0] == run / "plots" / "winrate_vs_n.png"
    assert (run / "plots" / "winrate_vs_n.png").read_bytes().startswith(b"\x89PNG")


def test_cost_plot_data_full_and_cached_calls(tmp_path: Path) -> None:
    run = _make_run(tmp_path, concepts=False)
    manifest = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    for rec in manifest:
        rec["cached_calls"] = 40 * rec["n"] if rec["method"] == "cmlora" else 0
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    panels = cost_series(build_report(run).methods)
    assert list(panels) == [
        "full UNet calls / image",
        "cached UNet calls / image (shallow blocks only)",
        "seconds / image",
    ]
    assert panels["full UNet calls / image"]["cmlora"] == [(2, 100.0), (3, 120.0)]
    assert panels["cached UNet calls / image (shallow blocks only)"]["cmlora"] == [(2, 80.0), (3, 120.0)]
    assert panels["cached UNet calls / image (shallow blocks only)"]["switch"] == [(2, 0.0), (3, 0.0)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_umask(tmp_path: Path) -> None:
    from PIL import Image

    from cmlora.evaluate.judge import ResponseCache
    from cmlora.profiles import ProfileFile
    from cmlora.records import save_image

    run = _make_run(tmp_path, concepts=False)
    old = os.umask(0o022)
    try:
        report, _ = write_report(run, n_resamples=50)
        ResponseCache(run / "eval" / "judge_cache").put("ab" + "0" * 62, "judge-x", "reply")
        png, sidecar = save_image(Image.new("RGB", (4, 4)), {"seed": 1}, tmp_path / "out" / "img.png")
        ProfileFile(entries=[]).save(tmp_path / "profiles.json")
        written = [report, *sorted((run / "plots").iterdir()), png, sidecar, tmp_path / "profiles.json"]
        written += list((run / "eval" / "judge_cache").rglob("*.json"))
        assert len(written) == 8
        assert {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in written} == {
            str(p.relative_to(tmp_path)): "0o644" for p in written
        }
        os.umask(0o077)
        report, _ = write_report(run, n_resamples=50, plots=False)
        assert _mode(report) == 0o600
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_method_rows_clipscore_ci_and_cost(tmp_path: Path) -> None:
    run = _make_run(tmp_path, concepts=False)
    data = build_report(run, n_resamples=500, seed=3)
    assert data.clip_models == ["clip-b16"] and not data.has_concepts
    rows = {(r.method, r.n): r for r in data.methods}
    mean, lo, hi, count = rows[("cmlora", 2)].clipscore["clip-b16"]
    assert (mean, count) == (25.0, 2)
    assert 20.0 <= lo <= mean <= hi <= 30.0
    assert rows[("cmlora", 3)].clipscore["clip-b16"] == (25.0, 25.0, 25.0, 1)
    mean_all, lo_all, hi_all, count_all = rows[("cmlora", "all")].clipscore["clip-b16"]
    assert (mean_all, count_all) == (25.0, 3) and lo_all <= 25.0 <= hi_all
    assert rows[("cmlora", 2)].full_calls == 100 and rows[("cmlora", 2)].seconds == 3.0
    assert rows[("switch", "all")].seconds == pytest.approx(3.5 / 3)
    # Fixed seed: identical numbers on a second build.
    assert build_report(run, n_resamples=500, seed=3).methods == data.methods


def test_bootstrap_ci() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0, 0.5, 7.0]
    mean, lo, hi = bootstrap_ci(values, n_resamples=1000, seed=0)
    assert mean == pytest.approx(sum(values) / len(values))
    assert lo < mean < hi
    assert bootstrap_ci(values, n_resamples=1000, seed=0) == (mean, lo, hi)
    assert bootstrap_ci([4.0, 4.0, 4.0]) == (4.0, 4.0, 4.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_write_report_markdown_plots_and_concept_hook(tmp_path: Path) -> None:
    run = _make_run(tmp_path, concepts=True)
    path, data = write_report(run, n_resamples=200)
    text = path.read_text()
    assert path == run / "report.md"
    assert "concept recall" in text and data.has_concepts
    rows = {(r.method, r.n): r for r in data.methods}
    assert rows[("cmlora", 2)].recall == 1.0 and rows[("switch", 2)].all_present == 0.0
    assert "| 2 | cmlora vs switch | composition | 50.0% (1) | 50.0% (1) | 0.0% (0) | 2 | 1 | 1 |" in text
    for name in ("winrate_vs_n.png", "clipscore_vs_n.png", "cost_vs_n.png"):
        png = run / "plots" / name
        assert png.read_bytes().startswith(b"\x89PNG"), name
        assert f"plots/{name}" in text
    (run / "eval" / "concepts.jsonl").unlink()
    path, data = write_report(run, plots=False)
    assert "concept recall" not in path.read_text() and not data.has_concepts


def test_report_without_eval_files(tmp_path: Path) -> None:
    run = _make_run(tmp_path, concepts=False)
    for f in (run / "eval").iterdir():
        f.unlink()
    path, data = write_report(run)
    assert data.judge == [] and data.clip_models == []
    assert "cost_vs_n.png" in path.read_text() and "winrate" not in path.read_text()


# -- manifest validation --------------------------------------------------------------------------


def _write_manifest(run: Path, records: list[Any], tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_manifest_errors_name_the_line(tmp_path: Path) -> None:
    good = _entry("c1", 2, "cmlora", 1, 1.0)
    run = tmp_path / "r1"
    bad = dict(_entry("c2", 2, "cmlora", 1, 1.0))
    del bad["method"]
    _write_manifest(run, [good, bad])
    with pytest.raises(ManifestError, match=r"line 2: missing required field 'method'"):
        read_manifest(run)
    escaping = dict(_entry("c2", 2, "cmlora", 1, 1.0), image="../../etc/passwd")
    _write_manifest(run, [good, escaping])
    with pytest.raises(ManifestError, match=r"line 2: .*escapes the run directory"):
        read_manifest(run)
    _write_manifest(run, [good, dict(_entry("c2", 2, "x", 1, 1.0), image="/abs/x.png")])
    with pytest.raises(ManifestError, match=r"line 2: .*relative"):
        read_manifest(run)
    _write_manifest(run, [good, dict(_entry("c2", 2, "x", 1, 1.0), n="2")])
    with pytest.raises(ManifestError, match=r"line 2: field 'n' must be int"):
        read_manifest(run)
    _write_manifest(run, [good, dict(good, job_id="other")])
    with pytest.raises(ManifestError, match=r"line 2: image .* already listed on line 1"):
        read_manifest(run)
    run.joinpath("manifest.jsonl").write_text(json.dumps(good) + "\n{oops\n" + json.dumps(good) + "\n")
    with pytest.raises(ManifestError, match=r"line 2: invalid JSON"):
        read_manifest(run)
    with pytest.raises(ManifestError, match="no manifest.jsonl"):
        read_manifest(tmp_path / "nowhere")


def test_manifest_trigger_prompt_fallback_and_partial_tail(tmp_path: Path) -> None:
    run = tmp_path / "r2"
    _write_manifest(run, [_entry("c1", 3, "cmlora", 1, 1.0)])
    (entry,) = read_manifest(run)  # a cut manifest is refused (test_a_manifest_cut_short_...)
    assert entry.trigger_prompt == "t0, t1, t2"
    assert [lo.category for lo in entry.loras] == ["character", "object", "object"]
    assert resolve_image(run, "images/a/../b.png") == run / "images" / "b.png"
    # Appending after an interrupted write drops the partial line instead of gluing onto it.
    log = run / "log.jsonl"
    log.write_text('{"a": 1}\n{"a": 2')
    with JsonlAppender(log) as sink:
        sink.write({"a": 3})
    assert read_jsonl(log) == [{"a": 1}, {"a": 3}]


# -- CLI glue -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmlora")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_subcommands(sub)
    add_report_subcommand(sub)
    return parser


def test_cli_registration_and_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    args = parser.parse_args(
        [
            "eval",
            "judge",
            "RUN",
            "--methods",
            "a,b",
            "--endpoint",
            "http://x/v1",
            "--model",
            "m",
            "--api-key-env",
            "K",
        ]
    )
    assert args.methods == ["a", "b"] and args.api_key_env == "K" and callable(args.func)
    args = parser.parse_args(
        ["eval", "clipscore", "RUN", "--clip", "openai/clip-vit-base-patch16", "--batch-size", "4"]
    )
    assert args.clip == "openai/clip-vit-base-patch16" and args.batch_size == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "judge", "RUN", "--methods", "a", "--endpoint", "u", "--model", "m"])
    helps = {
        ("eval", "judge", "--help"): ["OPENAI_API_KEY", "--retry-failures", "each presentation order"],
        ("eval", "clipscore", "--help"): ["--clip", "100 * max"],
        ("report", "--help"): ["bootstrap", "concepts.jsonl"],
    }
    for argv, needles in helps.items():
        with pytest.raises(SystemExit):
            parser.parse_args(list(argv))
        out = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in out, (argv, needle)
    run = _make_run(tmp_path, concepts=False)
    args = parser.parse_args(["report", str(run), "--bootstrap", "100", "--no-plots"])
    assert args.func(args) == 0
    assert (run / "report.md").exists() and not (run / "plots").exists()
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    assert args.func(args) == 2


def test_a_manifest_cut_short_is_refused_not_silently_shortened(tmp_path: Path) -> None:
    from cmlora.evaluate.runs import partial_tail

    run = tmp_path / "run"
    run.mkdir()
    good = '{"image": "images/a.png"}\n'
    (run / "manifest.jsonl").write_text(good + '{"image": "images/b.p')
    assert partial_tail(run / "manifest.jsonl")
    with pytest.raises(ManifestError, match="cut short"):
        read_manifest(run)
    (run / "manifest.jsonl").write_text(good)
    assert not partial_tail(run / "manifest.jsonl")


def test_scorers_name_a_truncated_image(tmp_path: Path) -> None:
    from PIL import Image

    from cmlora.evaluate.runs import open_run_image

    path = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "red").save(path)
    assert open_run_image(path).size == (32, 32)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ManifestError, match="truncated or corrupt"):
        open_run_image(path)

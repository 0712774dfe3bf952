"""The sweep runner: files on disk, resume after kill, refusal of changed settings, sharding."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cmlora.errors import CmloraError
from cmlora.testbed.sweep import (
    _RANK_VARS,
    MANIFEST_FILE,
    PNG_TEXT_KEY,
    SweepError,
    SweepJob,
    SweepSettingsError,
    comparison_sheet,
    distributed_env,
    run_sweep,
)

# The same code builds the jobs in this process and in the subprocesses that get killed or sharded,
# so their output can be compared byte for byte with an in-process run.
HELPER = textwrap.dedent(
    """
    import sys
    import time

    from PIL import Image

    from cmlora.testbed.compositions import enumerate_compositions, image_seed
    from cmlora.testbed.info import load_testbed_info, load_testbed_prompts
    from cmlora.testbed.sweep import SweepJob, run_sweep

    METHODS = ("merge", "switch", "cmlora-offline")


    def build(n_comps=4, seeds=2, base_seed=111, methods=METHODS):
        prompts = load_testbed_prompts("anime")
        comps = enumerate_compositions(
            load_testbed_info("anime"),
            sizes=(2,),
            style="anime",
            base_prompt=prompts.prompt,
            negative_prompt=prompts.negative_prompt,
        )[:n_comps]
        settings = {
            "testbed": "composlora",
            "style": "anime",
            "sizes": [2],
            "methods": list(methods),
            "seeds": seeds,
            "base_seed": base_seed,
            "limit": n_comps,
            "steps": 10,
        }
        jobs = [
            SweepJob(c, m, {"steps": 10}, k, image_seed(base_seed, c.id, k))
            for c in comps
            for k in range(seeds)
            for m in methods
        ]
        return settings, jobs


    def make_generate(sleep=0.0):
        def generate(job):
            if sleep:
                time.sleep(sleep)
            s = job.seed
            colour = (s % 256, (s >> 8) % 256, (len(job.method) * 40) % 256)
            record = {
                "seconds": 0.5 + len(job.method) / 100,
                "full_calls": 10 * len(job.method),
                "cached_calls": job.seed_index,
            }
            return Image.new("RGB", (24, 16), colour), record

        return generate


    def main():
        out, sleep = sys.argv[1], float(sys.argv[2])
        settings, jobs = build()
        try:
            run_sweep(out, settings, jobs, make_generate(sleep), progress=False)
        except KeyboardInterrupt:
            sys.exit(130)
    """
)
_ns: dict[str, Any] = {}
exec(compile(HELPER, "<sweep-helper>", "exec"), _ns)
build = _ns["build"]
make_generate = _ns["make_generate"]
METHODS: tuple[str, ...] = _ns["METHODS"]
N_JOBS = 4 * 2 * 3


# The subprocesses skip cmlora/__init__.py (which imports torch and diffusers): the sweep needs
# neither, and a slow start-up would only make the kill tests slower, not stronger.
_PRELUDE = textwrap.dedent(
    """
    import importlib.util
    import sys
    import types

    _spec = importlib.util.find_spec("cmlora")
    _pkg = types.ModuleType("cmlora")
    _pkg.__path__ = list(_spec.submodule_search_locations)
    sys.modules["cmlora"] = _pkg
    """
)


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "sweep_script.py"
    path.write_text(_PRELUDE + HELPER + "\n\nif __name__ == '__main__':\n    main()\n", encoding="utf-8")
    return path


def _spawn(tmp_path: Path, out: Path, sleep: float, **env: str) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONHASHSEED": "random", **env}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, str(_script(tmp_path)), str(out), str(sleep)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_pngs(out: Path, count: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        images = out / "images"
        if images.is_dir() and len([p for p in images.glob("*.png")]) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"subprocess ended early: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError("subprocess made no images in time")


def _tmp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def _check_consistent(out: Path) -> list[dict[str, Any]]:
    """Every manifest line (part files and merged) names files that exist; returns part records."""
    records = []
    for part in sorted(out.glob("manifest*.jsonl")):
        lines = part.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                # only a SIGKILL in the middle of an append can cut the very last line
                assert i == len(lines) - 1 and part.name != MANIFEST_FILE
                continue
            assert (out / rec["image"]).is_file()
            assert (out / "images" / f"{rec['job_id']}.json").is_file()
            if part.name != MANIFEST_FILE:
                records.append(rec)
    ids = [r["job_id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate manifest lines"
    return records


def _snapshot(out: Path) -> dict[str, bytes]:
    """Bytes of everything a run produces except per-rank parts, locks and run.json's timestamp."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not path.name.startswith(".") and not rel.startswith("manifest.rank"):
            if rel != "run.json":
                files[rel] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference")
    settings, jobs = build()
    run_sweep(out, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    return _snapshot(out)


def test_single_run_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings, jobs = build()
    summary = run_sweep(tmp_path, settings, jobs, make_generate(), progress=True, rank=0, world_size=1)

    pngs = sorted(p.stem for p in (tmp_path / "images").glob("*.png"))
    assert pngs == sorted(j.job_id for j in jobs)
    assert len(list((tmp_path / "images").glob("*.json"))) == N_JOBS

    lines = (tmp_path / MANIFEST_FILE).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["job_id"] for r in records] == [j.job_id for j in jobs]  # job order
    assert (tmp_path / "manifest.rank0.jsonl").read_text(encoding="utf-8").splitlines() == lines
    first, job = records[0], jobs[0]
    assert first["image"] == f"images/{job.job_id}.png"
    assert job.job_id == "anime-n2-character_1+clothing_1--merge--s0"
    assert first["prompt"] == job.composition.prompt and first["seed"] == job.seed
    assert [x["name"] for x in first["loras"]] == ["character_1", "clothing_1"] and first[
        "method_options"
    ] == {"steps": 10}
    assert first["full_calls"] == 50 and first["seconds"] == 0.55

    # record in the sidecar and in the png text chunk
    sidecar = json.loads((tmp_path / "images" / f"{job.job_id}.json").read_text(encoding="utf-8"))
    assert sidecar == first
    with Image.open(tmp_path / first["image"]) as img:
        assert json.loads(img.text[PNG_TEXT_KEY]) == first
        assert img.size == (24, 16)

    run = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert run["settings"] == settings and run["jobs"]["count"] == N_JOBS

    sheets = sorted(p.stem for p in (tmp_path / "sheets").glob("*.png"))
    assert sheets == sorted({j.composition.id for j in jobs})
    with Image.open(tmp_path / "sheets" / f"{job.composition.id}.png") as sheet:
        assert sheet.width > 3 * 24 and sheet.height > 2 * 16

    assert summary.complete and summary.total == summary.done == summary.generated == N_JOBS
    assert summary.skipped == 0
    stats = {m.method: m for m in summary.methods}
    assert list(stats) == list(METHODS)
    assert stats["merge"].images == 8 and stats["merge"].seconds_per_image == pytest.approx(0.55)
    assert stats["cmlora-offline"].full_calls_per_image == 140
    assert stats["switch"].cached_calls == 4 and stats["switch"].cached_calls_per_image == 0.5
    captured = capsys.readouterr()
    table = captured.out
    assert "24/24 images (complete)" in table
    # progress bar: images done / total, then elapsed<remaining
    bar = captured.err.replace("\r", "\n").strip().splitlines()
    assert bar[0].startswith("sweep:   0%") and "0/24 [00:00<?" in bar[0]
    assert bar[-1].startswith("sweep: 100%") and re.search(r" 24/24 \[\d\d:\d\d<\d\d:\d\d, ", bar[-1])
    assert all(m in table for m in METHODS) and "full calls/image" in table
    assert not _tmp_files(tmp_path)


def test_matches_reference_and_rerun_is_noop(tmp_path: Path, reference: dict[str, bytes]) -> None:
    settings, jobs = build()
    run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    assert _snapshot(tmp_path) == reference

    def fail(job: SweepJob) -> tuple[Image.Image, dict[str, Any]]:
        raise AssertionError(f"{job.job_id} regenerated")

    summary = run_sweep(tmp_path, settings, jobs, fail, progress=False, rank=0, world_size=1)
    assert summary.generated == 0 and summary.skipped == N_JOBS and summary.complete
    assert _snapshot(tmp_path) == reference


def test_resume_repairs_damaged_state(tmp_path: Path, reference: dict[str, bytes]) -> None:
    settings, jobs = build()
    run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    images = tmp_path / "images"
    lost = jobs[5].job_id
    (images / f"{lost}.json").unlink()  # png without record: a kill between the two writes
    (images / f".tmp-r0-{jobs[6].job_id}.png").write_bytes(b"half")  # a kill inside a write
    (tmp_path / "sheets" / f"{jobs[5].composition.id}.png").unlink()
    (tmp_path / MANIFEST_FILE).unlink()
    with open(tmp_path / "manifest.rank0.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"job_id": "cut in the mid')  # a kill inside an append

    made: list[str] = []
    generate = make_generate()

    def tracking(job: SweepJob) -> tuple[Image.Image, dict[str, Any]]:
        made.append(job.job_id)
        return generate(job)

    summary = run_sweep(tmp_path, settings, jobs, tracking, progress=False, rank=0, world_size=1)
    assert made == [lost] and summary.skipped == N_JOBS - 1
    assert _snapshot(tmp_path) == reference
    assert len(_check_consistent(tmp_path)) == N_JOBS
    assert not _tmp_files(tmp_path)


def test_changed_settings_refused(tmp_path: Path, reference: dict[str, bytes]) -> None:
    settings, jobs = build()
    run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    other_settings, other_jobs = build(base_seed=112)
    with pytest.raises(SweepSettingsError) as err:
        run_sweep(tmp_path, other_settings, other_jobs, make_generate(), progress=False, rank=0, world_size=1)
    message = str(err.value)
    assert "different settings" in message and "base_seed: 111 -> 112" in message
    assert "another output folder" in message and "--new-run" in message
    # same settings, different job list (a bug in the caller): refused as well
    with pytest.raises(SweepSettingsError, match="list of jobs differs"):
        run_sweep(tmp_path, settings, jobs[:-1], make_generate(), progress=False, rank=0, world_size=1)
    assert _snapshot(tmp_path) == reference  # nothing touched


def test_new_run_discards_previous(tmp_path: Path) -> None:
    settings, jobs = build()
    run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    # evaluation of the old images: keyed by image path, so it would describe the new images wrongly
    (tmp_path / "eval" / "judge_cache").mkdir(parents=True)
    for name in ("clipscore.jsonl", "judge.jsonl", "concepts.jsonl", "judge_cache/ab.json"):
        (tmp_path / "eval" / name).write_text('{"image": "images/x.png"}\n', encoding="utf-8")
    (tmp_path / "report.md").write_text("# old\n", encoding="utf-8")
    small_settings, small_jobs = build(n_comps=2, base_seed=5)
    summary = run_sweep(
        tmp_path,
        small_settings,
        small_jobs,
        make_generate(),
        new_run=True,
        progress=False,
        rank=0,
        world_size=1,
    )
    assert summary.generated == len(small_jobs) == 12 and summary.skipped == 0
    assert sorted(p.stem for p in (tmp_path / "images").glob("*.png")) == sorted(j.job_id for j in small_jobs)
    assert len(list((tmp_path / "images").glob("*.json"))) == 12
    assert len(list((tmp_path / "sheets").glob("*.png"))) == 2
    records = [json.loads(x) for x in (tmp_path / MANIFEST_FILE).read_text(encoding="utf-8").splitlines()]
    assert [r["seed"] for r in records] == [j.seed for j in small_jobs]
    assert json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))["settings"]["base_seed"] == 5
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"  # only our files are removed
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "eval").rglob("*")) == [
        "eval/judge_cache",
        "eval/judge_cache/ab.json",  # keyed by image bytes: kept, it cannot answer for another image
    ]
    assert not (tmp_path / "report.md").exists()


def test_refuses_folder_that_is_not_a_sweep(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "holiday.png").write_bytes(b"x")
    settings, jobs = build()
    for new_run in (False, True):
        with pytest.raises(SweepSettingsError, match="not a sweep folder"):
            run_sweep(
                tmp_path,
                settings,
                jobs,
                make_generate(),
                new_run=new_run,
                progress=False,
                rank=0,
                world_size=1,
            )
    assert (tmp_path / "images" / "holiday.png").exists()


def test_keyboard_interrupt_leaves_consistent_state(
    tmp_path: Path, reference: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, jobs = build()
    generate = make_generate()
    calls = 0

    def interrupted(job: SweepJob) -> tuple[Image.Image, dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return generate(job)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path, settings, jobs, interrupted, progress=False, rank=0, world_size=1)
    assert len(_check_consistent(tmp_path)) == 4
    assert not _tmp_files(tmp_path)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    capsys.readouterr()
    summary = run_sweep(tmp_path, settings, jobs, generate, progress=True, rank=0, world_size=1)
    assert summary.generated == N_JOBS - 4
    captured = capsys.readouterr()
    assert " 4/24 [" in captured.err.replace("\r", "\n").strip().splitlines()[0]  # resumed count shown
    assert "this process generated 20, found 4 already done" in captured.out
    assert _snapshot(tmp_path) == reference


def test_bad_jobs_and_records_refused(tmp_path: Path) -> None:
    settings, jobs = build(n_comps=1, seeds=1)
    with pytest.raises(SweepError, match="share the id"):
        run_sweep(
            tmp_path / "a", settings, jobs + jobs[:1], make_generate(), progress=False, rank=0, world_size=1
        )
    bad = SweepJob(jobs[0].composition, "../evil", {}, 0, 1)
    with pytest.raises(SweepError, match="method label"):
        run_sweep(tmp_path / "b", settings, [bad], make_generate(), progress=False, rank=0, world_size=1)
    with pytest.raises(SweepError, match="plain JSON"):
        run_sweep(
            tmp_path / "c", {"x": object()}, jobs, make_generate(), progress=False, rank=0, world_size=1
        )
    with pytest.raises(SweepError, match="rank"):
        run_sweep(tmp_path / "d", settings, jobs, make_generate(), progress=False, rank=2, world_size=2)

    def lying(job: SweepJob) -> tuple[Image.Image, dict[str, Any]]:
        return Image.new("RGB", (4, 4)), {"seed": job.seed + 1}

    with pytest.raises(SweepError, match="says seed="):
        run_sweep(tmp_path / "e", settings, jobs, lying, progress=False, rank=0, world_size=1)
    assert not list((tmp_path / "e" / "images").iterdir())


def test_resume_after_sigkill(tmp_path: Path, reference: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    proc = _spawn(tmp_path, out, sleep=0.03)
    try:
        _wait_for_pngs(out, 6, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = _check_consistent(out)
    assert 5 <= len(done_before) < N_JOBS
    assert not (out / MANIFEST_FILE).exists()

    settings, jobs = build()
    summary = run_sweep(out, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    assert summary.complete and summary.generated + summary.skipped == N_JOBS
    assert summary.skipped >= len(done_before)
    records = [json.loads(x) for x in (out / MANIFEST_FILE).read_text(encoding="utf-8").splitlines()]
    assert [r["job_id"] for r in records] == [j.job_id for j in jobs]  # complete, ordered, no duplicates
    assert len(_check_consistent(out)) == N_JOBS
    assert not _tmp_files(out)
    assert _snapshot(out) == reference


def test_sigterm_exits_130_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _spawn(tmp_path, out, sleep=0.03)
    _wait_for_pngs(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130, stderr.decode()
    records = _check_consistent(out)
    assert 3 <= len(records) < N_JOBS
    assert not _tmp_files(out)
    # nothing cut: the part file ends with a complete line
    assert (out / "manifest.rank0.jsonl").read_bytes().endswith(b"\n")


def test_two_process_shards_equal_single_process(tmp_path: Path, reference: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    procs = [_spawn(tmp_path, out, 0.005, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)) for r in (0, 1)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.decode()
    assert _snapshot(out) == reference
    _, jobs = build()
    for rank in (0, 1):
        part = (out / f"manifest.rank{rank}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(x)["job_id"] for x in part] == [j.job_id for j in jobs[rank::2]]
    assert not _tmp_files(out)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_accelerate_launch_two_processes_equal_single_process(
    tmp_path: Path, reference: dict[str, bytes]
) -> None:
    """The real launcher: `accelerate launch` starts 2 CPU processes, which shard by its RANK/WORLD_SIZE."""
    pytest.importorskip("accelerate")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONHASHSEED": "random", "HF_HOME": str(tmp_path / "hf")}  # no user config
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), str(_script(tmp_path)), str(out), "0.005"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _snapshot(out) == reference
    _, jobs = build()
    for rank in (0, 1):  # each process made exactly its own shard, so the launcher's ranks were seen
        part = (out / f"manifest.rank{rank}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(x)["job_id"] for x in part] == [j.job_id for j in jobs[rank::2]]
    assert not _tmp_files(out)


def test_resume_with_another_world_size(tmp_path: Path, reference: dict[str, bytes]) -> None:
    settings, jobs = build()
    half = run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=1, world_size=2)
    assert half.generated == N_JOBS // 2 and not half.complete and half.done == N_JOBS // 2
    merged = (tmp_path / MANIFEST_FILE).read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["job_id"] for x in merged] == [j.job_id for j in jobs[1::2]]  # partial, consistent
    summary = run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    assert summary.generated == N_JOBS // 2 and summary.complete
    assert not (tmp_path / "manifest.rank1.jsonl").exists()  # stale part of a rank that no longer exists
    assert _snapshot(tmp_path) == reference


def test_same_rank_twice_refused(tmp_path: Path) -> None:
    settings, jobs = build(n_comps=1, seeds=1)
    started = False

    def nested(job: SweepJob) -> tuple[Image.Image, dict[str, Any]]:
        nonlocal started
        if not started:
            started = True
            with pytest.raises(SweepError, match="already running rank 0"):
                run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
        return make_generate()(job)

    run_sweep(tmp_path, settings, jobs, nested, progress=False, rank=0, world_size=1)
    assert started


def test_comparison_sheet_layout() -> None:
    red, blue = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (40, 30), "blue")
    sheet = comparison_sheet([[red, blue], [None, red]], ["merge", "cmlora"], ["seed 1", "seed 2"])
    assert sheet.width > 80 and sheet.height > 60
    colours = {colour for _, colour in sheet.getcolors(maxcolors=100000)}
    assert (255, 0, 0) in colours and (0, 0, 255) in colours
    assert (200, 200, 200) in colours  # the missing cell
    assert any(sum(c) < 200 for c in colours)  # label text
    big = comparison_sheet([[Image.new("RGB", (1024, 768))]], ["m"], ["s"], max_cell=128)
    assert big.width < 300


def test_distributed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for names in _RANK_VARS:
        for name in names:
            monkeypatch.delenv(name, raising=False)
    assert distributed_env() == (0, 1, 0)
    # mpirun (accelerate's multi-CPU launch) sets only its own names; RANK etc. take precedence
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert distributed_env() == (1, 2, 1)
    monkeypatch.setenv("PMI_RANK", "5")
    monkeypatch.setenv("PMI_SIZE", "6")
    monkeypatch.setenv("MPI_LOCALRANKID", "0")
    assert distributed_env() == (5, 6, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_env() == (3, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(SweepError, match="WORLD_SIZE"):
        distributed_env()


class _SeedBatches:
    """The fake generator with a many(jobs) method that records the groups it was given."""

    def __init__(self) -> None:
        self.one = make_generate()
        self.groups: list[list[str]] = []

    def __call__(self, job: SweepJob):
        self.groups.append([job.job_id])
        return self.one(job)

    def many(self, jobs: list[SweepJob]):
        self.groups.append([j.job_id for j in jobs])
        return [self.one(j) for j in jobs]


def test_seed_batches_reach_many_whole_and_give_the_same_folder(
    tmp_path: Path, reference: dict[str, bytes]
) -> None:
    settings, jobs = build()
    pairs = {}
    for rank in (0, 1):  # two shards: a group of seeds is never split between them
        generate = _SeedBatches()
        run_sweep(tmp_path, settings, jobs, generate, progress=False, rank=rank, world_size=2, batch_size=2)
        pairs[rank] = generate.groups
    assert _snapshot(tmp_path) == reference
    groups = pairs[0] + pairs[1]
    assert len(groups) == len(jobs) // 2 and all(len(g) == 2 for g in groups)
    for a, b in groups:  # same composition and method, seeds 0 and 1
        assert a.rsplit("--s", 1) == [b.rsplit("--s", 1)[0], "0"] and b.endswith("--s1")
    assert sorted(pairs[0]) != sorted(pairs[1])


def test_seed_batches_resume_with_the_jobs_left(tmp_path: Path, reference: dict[str, bytes]) -> None:
    settings, jobs = build()
    run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    seed1 = [j for j in jobs if j.seed_index == 1]
    lost = seed1[:5] + [
        j for j in jobs if j.method == seed1[5].method and j.composition == seed1[5].composition
    ]
    for job in lost:  # five seed-1 images, and both seeds of one more pair
        for suffix in (".png", ".json"):
            (tmp_path / "images" / f"{job.job_id}{suffix}").unlink()
    generate = _SeedBatches()
    run_sweep(tmp_path, settings, jobs, generate, progress=False, rank=0, world_size=1, batch_size=2)
    assert _snapshot(tmp_path) == reference
    assert sorted(sorted(g) for g in generate.groups) == sorted(
        [[j.job_id] for j in seed1[:5]] + [sorted(j.job_id for j in lost[5:])]
    )


def test_seed_batch_settings_refused(tmp_path: Path) -> None:
    settings, jobs = build(n_comps=1)
    with pytest.raises(SweepError, match=r"batch_size=2 needs a generate with a many\(jobs\) method"):
        run_sweep(
            tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1, batch_size=2
        )
    with pytest.raises(SweepError, match="batch_size must be an integer >= 1, got 0"):
        run_sweep(
            tmp_path, settings, jobs, _SeedBatches(), progress=False, rank=0, world_size=1, batch_size=0
        )

    class Short(_SeedBatches):
        def many(self, jobs):
            return super().many(jobs)[:1]

    with pytest.raises(SweepError, match="returned 1 images for 2 jobs"):
        run_sweep(tmp_path, settings, jobs, Short(), progress=False, rank=0, world_size=1, batch_size=2)


def test_resume_remakes_a_truncated_png(tmp_path: Path, reference: dict[str, bytes]) -> None:
    """A PNG cut short (crash or full disk) with its record intact is made again, not kept."""
    settings, jobs = build()
    run_sweep(tmp_path, settings, jobs, make_generate(), progress=False, rank=0, world_size=1)
    broken = tmp_path / "images" / f"{jobs[3].job_id}.png"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    made: list[str] = []
    generate = make_generate()

    def tracking(job: SweepJob) -> tuple[Image.Image, dict[str, Any]]:
        made.append(job.job_id)
        return generate(job)

    run_sweep(tmp_path, settings, jobs, tracking, progress=False, rank=0, world_size=1)
    assert made == [jobs[3].job_id]
    assert _snapshot(tmp_path) == reference


def test_a_run_that_made_nothing_can_be_rerun_with_corrected_settings(tmp_path: Path) -> None:
    """A sweep stopped by a bad setting before its first image does not pin that setting forever."""
    settings, jobs = build()

    def bad(job: SweepJob) -> tuple[Image.Image, dict[str, Any]]:
        raise CmloraError("num_inference_steps must be >= 1, got 0")

    with pytest.raises(CmloraError):
        run_sweep(tmp_path, settings, jobs, bad, progress=False, rank=0, world_size=1)
    other_settings, other_jobs = build(base_seed=112)
    summary = run_sweep(
        tmp_path, other_settings, other_jobs, make_generate(), progress=False, rank=0, world_size=1
    )
    assert summary.generated == N_JOBS
    assert json.loads((tmp_path / "run.json").read_text())["settings"] == json.loads(
        json.dumps(other_settings)
    )

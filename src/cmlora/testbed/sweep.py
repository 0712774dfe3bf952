"""Resumable, shardable benchmark sweeps, independent of how an image is made.

A sweep can run for days on shared machines, so it is built to survive being killed at any instant
and to be re-run with the very same command: the disk is the only state (the run folder's files and
their rules are in :mod:`cmlora.testbed.run_folder`), and a re-run makes only the missing images.

* No process waits for another and none needs a network or a process group: ranks meet only in
  the output folder, and the last one to finish writes the complete manifest and sheets.
* ``new_run=True`` discards the previous results (only the files the sweep writes) and starts over.
* Sharding: job ``i`` belongs to rank ``i % world_size``; seeds come with the jobs, so which
  process makes an image never changes the image.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cmlora.signals import InterruptOnSignals
from cmlora.testbed.compositions import Composition
from cmlora.testbed.run_folder import (
    FORMAT_VERSION,
    IMAGES_DIR,
    MANIFEST_FILE,
    PNG_TEXT_KEY,
    RUN_FILE,
    RunFolder,
    SweepError,
    SweepSettingsError,
    _canonical,
    _dumps,
    _file_lock,
    _short,
)
from cmlora.testbed.sheets import comparison_sheet

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_JOB_FIELDS = (
    "job_id",
    "image",
    "composition_id",
    "style",
    "n",
    "loras",
    "trigger_prompt",
    "categories",
    "prompt",
    "negative_prompt",
    "method",
    "method_options",
    "seed_index",
    "seed",
)

Generate = Callable[["SweepJob"], tuple[Image.Image, dict[str, Any]]]


def _is_safe_name(value: str) -> bool:
    return bool(_SAFE_NAME.match(value)) and ".." not in value


@dataclass(frozen=True)
class SweepJob:
    """One image to make: a composition, a method (by label) with its options, and a seed."""

    composition: Composition
    method: str
    method_options: dict[str, Any] = field(default_factory=dict)
    seed_index: int = 0
    seed: int = 0

    @property
    def job_id(self) -> str:
        """``<composition_id>--<method>--s<seed_index>``: the file stem of the image and its record.

        The seed itself is not in the name, so changing the base seed changes ``run.json`` (and is
        refused) instead of quietly adding a second set of images next to the first.
        """
        return f"{self.composition.id}--{self.method}--s{self.seed_index}"

    def record(self) -> dict[str, Any]:
        """The job's own fields of the image record; ``generate`` adds what it measured."""
        return {
            "job_id": self.job_id,
            "image": f"{IMAGES_DIR}/{self.job_id}.png",
            **self.composition.to_dict(),
            "method": self.method,
            "method_options": self.method_options,
            "seed_index": self.seed_index,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class MethodStats:
    """Cost of one method over the images on disk, as the summary table shows it."""

    method: str
    images: int
    seconds_per_image: float | None
    full_calls: int
    cached_calls: int

    @property
    def full_calls_per_image(self) -> float | None:
        """Full UNet evaluations per image: the cost measure that does not depend on the GPU."""
        return self.full_calls / self.images if self.images else None

    @property
    def cached_calls_per_image(self) -> float | None:
        """UNet steps answered from a cache, per image (CMLoRA's saving)."""
        return self.cached_calls / self.images if self.images else None


@dataclass(frozen=True)
class SweepSummary:
    """What a call of :func:`run_sweep` achieved; ``done``/``total`` count every rank's images."""

    out_dir: Path
    total: int
    done: int
    generated: int
    skipped: int
    rank: int
    world_size: int
    methods: tuple[MethodStats, ...]

    @property
    def complete(self) -> bool:
        """True when every job of the run has its image, so manifest.jsonl is final."""
        return self.done == self.total

    def table(self) -> str:
        """Plain-text table, readable in a log file as well as on a terminal."""
        shard = f" (rank {self.rank}/{self.world_size})" if self.world_size > 1 else ""
        lines = [
            f"{self.out_dir}{shard}: {self.done}/{self.total} images"
            f" ({'complete' if self.complete else 'incomplete'}); this process generated"
            f" {self.generated}, found {self.skipped} already done",
        ]
        header = ("method", "images", "s/image", "full calls/image", "cached calls/image")
        rows = [header]
        for stats in self.methods:
            rows.append(
                (
                    stats.method,
                    str(stats.images),
                    _fmt(stats.seconds_per_image, 2),
                    _fmt(stats.full_calls_per_image, 1),
                    _fmt(stats.cached_calls_per_image, 1),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells))
        return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_RANK_VARS: tuple[tuple[str, ...], ...] = (
    ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"),
    ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"),
    ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
)
"""Where rank, world size and local rank may come from, first set one wins: torchrun's names (what
``accelerate launch --multi_gpu`` sets), then the MPI launchers' (what accelerate's multi-CPU mpirun
launch sets); the same lists accelerate itself reads."""


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables ``accelerate launch``/torchrun/mpirun set.

    Read from the environment rather than from ``torch.distributed`` so that a sweep needs no
    process group: processes never talk to each other, only through the output folder.
    """
    values: list[int | None] = []
    for names, default in zip(_RANK_VARS, (0, 1, None), strict=True):
        found: int | None = default
        for name in names:
            raw = os.environ.get(name)
            if raw is None or raw.strip() == "":
                continue
            try:
                found = int(raw)
            except ValueError as exc:
                raise SweepError(f"environment variable {name}={raw!r} is not an integer") from exc
            break
        values.append(found)
    rank, world_size, local_rank = values
    assert rank is not None and world_size is not None
    return rank, world_size, rank if local_rank is None else local_rank


def _method_stats(jobs: Sequence[SweepJob], records: Sequence[dict[str, Any]]) -> tuple[MethodStats, ...]:
    methods = list(dict.fromkeys(job.method for job in jobs))
    stats = []
    for method in methods:
        mine = [r for r in records if r.get("method") == method]
        seconds = [r["seconds"] for r in mine if isinstance(r.get("seconds"), int | float)]
        stats.append(
            MethodStats(
                method=method,
                images=len(mine),
                seconds_per_image=sum(seconds) / len(seconds) if seconds else None,
                full_calls=sum(int(r.get("full_calls") or 0) for r in mine),
                cached_calls=sum(int(r.get("cached_calls") or 0) for r in mine),
            )
        )
    return tuple(stats)


def _build_record(job: SweepJob, extra: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Job fields plus what ``generate`` reported; a contradiction is a bug and is refused."""
    if not isinstance(extra, dict):
        raise SweepError(
            f"generate returned a {type(extra).__name__} as record for {job.job_id}, expected a dict"
        )
    record = job.record()
    for key, value in extra.items():
        if key in record:
            if _canonical(value) != _canonical(record[key]):
                raise SweepError(
                    f"generate's record for {job.job_id} says {key}={_short(value)}, but the job has "
                    f"{_short(record[key])}; the image would be filed under the wrong settings"
                )
            continue
        record[key] = value
    record.setdefault("seconds", seconds)
    _dumps(record)  # fail now, before anything is written, if the record cannot be stored
    return record


def _seed_groups(jobs: Sequence[SweepJob], batch_size: int) -> list[list[SweepJob]]:
    """Jobs that differ only in their seed, in chunks of ``batch_size``, in order of first
    appearance; with ``batch_size`` 1, each job alone in the order given."""
    if batch_size == 1:
        return [[job] for job in jobs]
    by_key: dict[str, list[SweepJob]] = {}
    for job in jobs:
        by_key.setdefault(_dumps([job.composition.id, job.method, job.method_options]), []).append(job)
    return [same[k : k + batch_size] for same in by_key.values() for k in range(0, len(same), batch_size)]


def _validate(settings: dict[str, Any], jobs: Sequence[SweepJob], rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise SweepError(f"rank {rank} / world size {world_size} is impossible: need 0 <= rank < world_size")
    try:
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SweepError(
            f"the sweep settings must be plain JSON (they are stored in {RUN_FILE}): {exc}"
        ) from exc
    seen: set[str] = set()
    for job in jobs:
        for label, value in (("composition id", job.composition.id), ("method label", job.method)):
            if not _is_safe_name(value):
                raise SweepError(
                    f"{label} {value!r} cannot be part of a file name: use letters, digits and _ . + - "
                    "(not starting with . and without '..')"
                )
        if job.job_id in seen:
            raise SweepError(
                f"two jobs share the id {job.job_id!r}; give each method/options pair its own method label"
            )
        seen.add(job.job_id)
        try:
            json.dumps(job.method_options, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SweepError(f"method options of {job.job_id} must be plain JSON: {exc}") from exc


def run_sweep(
    out_dir: str | Path,
    settings: dict[str, Any],
    jobs: Sequence[SweepJob],
    generate: Generate,
    new_run: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    batch_size: int = 1,
) -> SweepSummary:
    """Make every image of ``jobs`` not yet in ``out_dir`` (this rank's share of them) and merge.

    ``settings`` is the whole run configuration; it is pinned in ``run.json`` on the first run and
    a different one is refused (:class:`SweepSettingsError`) unless ``new_run``, which deletes the
    previous run's images, records, manifests and sheets (nothing else in the folder) and starts
    over. ``rank``/``world_size`` default to the RANK/WORLD_SIZE environment variables, so the
    same command works under ``accelerate launch``; every process must get the same ``jobs``.

    ``generate(job)`` returns the image and a JSON-able record (``seconds``, ``full_calls``,
    ``cached_calls`` feed the summary); the job's own fields are added to it, and ``seconds`` is
    measured here when ``generate`` does not report it.

    ``batch_size`` > 1 hands jobs that differ only in their seed (same composition, method and
    options), up to that many, to ``generate.many(jobs)``, which returns one (image, record) per job
    (``CompositionGenerator`` denoises them as one batch). Such a group always goes to one rank.

    Ctrl-C and SIGTERM stop the sweep between two files, never inside a job's commit, and are
    re-raised as :class:`KeyboardInterrupt` (a CLI should exit with status 130); re-running the
    same call then finishes the remaining images only.
    """
    env_rank, env_world, _ = distributed_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    jobs = list(jobs)
    _validate(settings, jobs, rank, world_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SweepError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if batch_size > 1 and not callable(getattr(generate, "many", None)):
        raise SweepError(
            f"batch_size={batch_size} needs a generate with a many(jobs) method; "
            f"{type(generate).__name__} has none: use batch_size=1"
        )
    settings = json.loads(json.dumps(settings))  # what run.json will hold, tuples as lists

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = RunFolder(out, settings, jobs, rank, world_size)

    with _file_lock(out / f".rank{rank}.lock", blocking=False) as got:
        if not got:
            raise SweepError(
                f"another process is already running rank {rank} of a sweep in {out}; wait for it or stop it"
            )
        sweep.claim(new_run)
        sweep.images.mkdir(exist_ok=True)
        sweep.sheets.mkdir(exist_ok=True)
        sweep.remove_own_tmp()

        groups = _seed_groups(jobs, batch_size)[rank::world_size]
        mine = [job for group in groups for job in group]
        done_records: list[dict[str, Any]] = []
        pending: list[SweepJob] = []
        for job in mine:
            record = sweep.load_done(job)
            if record is None:
                pending.append(job)
            else:
                done_records.append(record)
        sweep.rebuild_part(done_records)

        generated = 0
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(mine),
            initial=len(done_records),
            unit="img",
            desc=f"sweep rank {rank}" if world_size > 1 else "sweep",
            position=rank if world_size > 1 else None,
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            with InterruptOnSignals((signal.SIGINT, signal.SIGTERM)) as guard:
                waiting = {job.job_id for job in pending}
                for group in groups:
                    todo = [job for job in group if job.job_id in waiting]
                    if not todo:
                        continue
                    bar.set_postfix_str(todo[0].method, refresh=False)
                    start = time.perf_counter()
                    made = generate.many(todo) if len(todo) > 1 else [generate(todo[0])]
                    seconds = (time.perf_counter() - start) / len(todo)
                    if len(made) != len(todo):
                        raise SweepError(
                            f"generate.many returned {len(made)} images for {len(todo)} jobs "
                            f"({todo[0].job_id} ...)"
                        )
                    for job, (image, extra) in zip(todo, made, strict=True):
                        record = _build_record(job, extra, seconds)
                        with guard.deferred():
                            sweep.commit(job, image, record)
                        generated += 1
                        bar.update(1)
                    sweep.make_sheet_if_complete(todo[0].composition.id)
                records, complete = sweep.merge()
        finally:
            bar.close()
            sweep.remove_own_tmp()

    summary = SweepSummary(
        out_dir=out,
        total=len(jobs),
        done=len(records),
        generated=generated,
        skipped=len(done_records),
        rank=rank,
        world_size=world_size,
        methods=_method_stats(jobs, records),
    )
    if progress:
        print(summary.table(), flush=True)
        if not complete and world_size > 1:
            print(
                f"rank {rank}: its share is done; the last process to finish writes the complete "
                f"{MANIFEST_FILE} and sheets",
                flush=True,
            )
    return summary


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PNG_TEXT_KEY",
    "Generate",
    "MethodStats",
    "SweepError",
    "SweepJob",
    "SweepSettingsError",
    "SweepSummary",
    "comparison_sheet",
    "distributed_env",
    "run_sweep",
]

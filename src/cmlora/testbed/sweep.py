"""Resumable, shardable benchmark sweeps, independent of how an image is made.

A sweep can run for days on shared machines, so everything here is built to survive being
killed at any instant and to be re-run with the very same command:

* The disk is the only state. A job is done iff ``images/<job_id>.json`` (its record) and
  ``images/<job_id>.png`` both exist; both are written atomically (tmp file in the same folder,
  fsync, ``os.replace``), png first, so a record never describes a missing or half-written image.
  A killed run leaves at worst a png without record (redone) or a stray tmp file (removed).
* ``manifest.rank<R>.jsonl`` is each process's running log, one line per image, appended (and
  fsynced) only after the image and its record exist; on start it is rebuilt from the records on
  disk, so a line cut by a kill or a line for a vanished file cannot survive a resume.
* ``manifest.jsonl`` (all images, in job order) is derived from the records on disk by whichever
  process finishes, under an exclusive file lock; the last process to take the lock has seen every
  finished image, so the final manifest is complete and is byte-for-byte what a single process
  would have written. No process waits for another; none needs a network or a process group.
* ``run.json`` pins the settings (and a digest of the job list) of the folder; re-running with
  anything else is refused, because mixing images of two configurations in one benchmark table
  silently corrupts it. ``new_run=True`` discards the previous results (only the files this
  module writes) and starts over.
* Sharding: job ``i`` belongs to rank ``i % world_size``; seeds come with the jobs, so which
  process makes an image never changes the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from cmlora.errors import CmloraError
from cmlora.paths import check_regular_file
from cmlora.testbed.compositions import Composition

try:  # POSIX only; without it, concurrent merges are not serialised (single process is still safe).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.jsonl"
IMAGES_DIR = "images"
REPORT_FILE = "report.md"
"""Written by ``cmlora report``; removed with the evaluation results when a new run discards the old one."""
SHEETS_DIR = "sheets"
PNG_TEXT_KEY = "cmlora"
"""PNG text chunk holding the image's record, so a copied-away image still says how it was made."""

_LOCK_FILE = ".sweep.lock"
_TMP_PREFIX = ".tmp-"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_PART_RE = re.compile(r"^manifest\.rank(\d+)\.jsonl$")
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


class SweepError(CmloraError, ValueError):
    """A sweep cannot start or go on as asked; the message says what to do instead."""


class SweepSettingsError(SweepError):
    """The output folder belongs to a run with other settings (or is not a sweep folder)."""


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


# --------------------------------------------------------------------------------------------------
# Small file-system helpers: every write that a reader could see goes through _atomic_write.


def _json_default(value: Any) -> Any:
    """Accept numpy/torch scalars in records (``.item()``), refuse anything else loudly."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"record value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False, **kwargs)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable across power loss (the rename lives in the directory entry)."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None], tag: str) -> None:
    """Write via a tmp file beside ``path``; ``tag`` keeps concurrent processes' tmp files apart."""
    tmp = path.with_name(f"{_TMP_PREFIX}{tag}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str, tag: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), tag)


@contextlib.contextmanager
def _file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Exclusive advisory lock; yields False (instead of waiting) when non-blocking and taken."""
    with open(path, "a+b") as fh:
        if fcntl is None:  # pragma: no cover
            yield True
            return
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fh.fileno(), flags)
            locked = True
        except BlockingIOError:
            locked = False
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class _SignalGuard:
    """Turns SIGTERM into KeyboardInterrupt and holds both off while a job is being committed.

    Holding off is what makes "png, record, manifest line" all-or-nothing for Ctrl-C and kill;
    SIGKILL and power loss cannot be held off, which the resume logic covers instead.
    """

    def __init__(self) -> None:
        self._deferring = False
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self._deferring:
            self._pending = signum
            return
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


# --------------------------------------------------------------------------------------------------
# Comparison sheets


def _default_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def comparison_sheet(
    cells: Sequence[Sequence[Image.Image | None]],
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    max_cell: int = 384,
) -> Image.Image:
    """Grid of images (rows x columns) with a label above each column and left of each row.

    Cells are shrunk to fit ``max_cell`` (never enlarged) so a sheet of full-size 1024x768
    images stays viewable; a missing cell is left grey rather than shifting its neighbours.
    """
    font = _default_font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    thumbs: list[list[Image.Image | None]] = []
    cell_w, cell_h = 1, 1
    for row in cells:
        thumb_row: list[Image.Image | None] = []
        for img in row:
            if img is None:
                thumb_row.append(None)
                continue
            thumb = img.convert("RGB")
            thumb.thumbnail((max_cell, max_cell), Image.Resampling.LANCZOS)
            cell_w, cell_h = max(cell_w, thumb.width), max(cell_h, thumb.height)
            thumb_row.append(thumb)
        thumbs.append(thumb_row)

    pad = 6
    label_h = max([text_size(t)[1] for t in [*column_labels, *row_labels, "Ag"]]) + 2 * pad
    row_label_w = max([text_size(t)[0] for t in row_labels] + [0]) + 2 * pad
    col_w = max([cell_w] + [text_size(t)[0] + 2 * pad for t in column_labels])
    n_cols = max([len(column_labels)] + [len(r) for r in thumbs])
    width = row_label_w + n_cols * (col_w + pad) + pad
    height = label_h + len(thumbs) * (cell_h + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels):
        x0 = row_label_w + c * (col_w + pad)
        tw, _ = text_size(label)
        draw.text((x0 + (col_w - tw) // 2, pad), label, fill="black", font=font)
    for r, row in enumerate(thumbs):
        y0 = label_h + r * (cell_h + pad)
        if r < len(row_labels):
            _, th = text_size(row_labels[r])
            draw.text((pad, y0 + (cell_h - th) // 2), row_labels[r], fill="black", font=font)
        for c in range(n_cols):
            x0 = row_label_w + c * (col_w + pad)
            thumb = row[c] if c < len(row) else None
            if thumb is None:
                draw.rectangle((x0, y0, x0 + col_w - 1, y0 + cell_h - 1), fill=(200, 200, 200))
            else:
                sheet.paste(thumb, (x0 + (col_w - thumb.width) // 2, y0 + (cell_h - thumb.height) // 2))
    return sheet


# --------------------------------------------------------------------------------------------------
# The runner


class _Sweep:
    """State of one :func:`run_sweep` call; a class only to keep the many paths in one place."""

    def __init__(
        self, out_dir: Path, settings: dict[str, Any], jobs: list[SweepJob], rank: int, world_size: int
    ) -> None:
        self.out = out_dir
        self.images = out_dir / IMAGES_DIR
        self.sheets = out_dir / SHEETS_DIR
        self.settings = settings
        self.jobs = jobs
        self.rank = rank
        self.world_size = world_size
        self.tag = f"r{rank}"
        self.part = out_dir / f"manifest.rank{rank}.jsonl"
        self.ids = [job.job_id for job in jobs]
        self.by_composition: dict[str, list[SweepJob]] = {}
        for job in jobs:
            self.by_composition.setdefault(job.composition.id, []).append(job)

    # -- paths and done-ness ----------------------------------------------------------------------
    def png(self, job_id: str) -> Path:
        return self.images / f"{job_id}.png"

    def sidecar(self, job_id: str) -> Path:
        return self.images / f"{job_id}.json"

    def load_done(self, job: SweepJob) -> dict[str, Any] | None:
        """The job's record if it is done; a record that does not match the job counts as not done."""
        side, png = self.sidecar(job.job_id), self.png(job.job_id)
        if not (side.is_file() and png.is_file()):
            return None
        try:
            record = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (
            not isinstance(record, dict)
            or record.get("job_id") != job.job_id
            or record.get("seed") != job.seed
            or not _png_is_whole(png)
        ):
            return None
        return record

    def is_done(self, job_id: str) -> bool:
        return self.sidecar(job_id).is_file() and self.png(job_id).is_file()

    # -- run.json -------------------------------------------------------------------------------
    def run_info(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for job in self.jobs:
            desc = {
                "job_id": job.job_id,
                "seed": job.seed,
                "options": job.method_options,
                "prompt": job.composition.prompt,
            }
            digest.update(_dumps(desc, sort_keys=True).encode("utf-8") + b"\n")
        return {
            "format": FORMAT_VERSION,
            "settings": self.settings,
            "jobs": {"count": len(self.jobs), "sha256": digest.hexdigest()},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def claim(self, new_run: bool) -> None:
        """Make the folder this run's, or refuse; with ``new_run`` first discard the previous run."""
        run_file = self.out / RUN_FILE
        info = self.run_info()
        with _file_lock(self.out / _LOCK_FILE):
            if not run_file.exists():
                leftovers = [p.name for p in self.images.iterdir()] if self.images.is_dir() else []
                if leftovers:
                    raise SweepSettingsError(
                        f"{self.out} has an {IMAGES_DIR}/ folder with {len(leftovers)} files but no "
                        f"{RUN_FILE}, so it is not a sweep folder this tool wrote; choose another output folder"
                    )
                _atomic_write_text(run_file, _dumps(info, indent=2) + "\n", self.tag)
                _fsync_dir(self.out)
                return
            check_regular_file(
                run_file,
                lambda problem: SweepSettingsError(f"{run_file} {problem}; choose another output folder"),
            )
            try:
                old = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise SweepSettingsError(
                    f"{run_file} is unreadable ({exc}); choose another output folder"
                ) from exc
            same = (
                isinstance(old, dict)
                and _canonical(old.get("settings")) == _canonical(info["settings"])
                and old.get("jobs") == info["jobs"]
            )
            if same and not new_run:
                return
            if not new_run and self._has_results():
                raise SweepSettingsError(self._mismatch_message(old, info))
            # new_run, or a run that made nothing yet (e.g. stopped by a bad setting): nothing to keep
            self._discard_previous()
            _atomic_write_text(run_file, _dumps(info, indent=2) + "\n", self.tag)
            _fsync_dir(self.out)

    def _has_results(self) -> bool:
        """Whether any image of the previous run exists (its settings then must not change)."""
        return self.images.is_dir() and any(p.suffix in (".png", ".json") for p in self.images.iterdir())

    def _mismatch_message(self, old: Any, new: dict[str, Any]) -> str:
        old_settings = old.get("settings") if isinstance(old, dict) else None
        diffs: list[str] = []
        if isinstance(old_settings, dict):
            for key in sorted(set(old_settings) | set(new["settings"])):
                a, b = old_settings.get(key, "<unset>"), new["settings"].get(key, "<unset>")
                if _canonical(a) != _canonical(b):
                    diffs.append(f"  {key}: {_short(a)} -> {_short(b)}")
        if not diffs:
            diffs.append("  (settings equal, but the list of jobs differs)")
        return (
            f"{self.out} holds a sweep with different settings:\n"
            + "\n".join(diffs[:20])
            + ("\n  ..." if len(diffs) > 20 else "")
            + "\nTo resume it, re-run with its original settings (see "
            f"{self.out / RUN_FILE}); to keep it, choose another output folder; to discard its "
            "images and start over here, ask for a new run (--new-run)."
        )

    def _discard_previous(self) -> None:
        """Delete the previous run's files, without touching other ranks' work of this run.

        Every rank removes manifest.jsonl, the sheets and its own part file first (so no manifest
        line outlives its image), then the images of its own shard; rank 0 also removes images of
        jobs no longer in the run and part files of ranks that no longer exist. A rank that starts
        late can therefore only delete files no other rank of *this* run writes, except sheets and
        manifest.jsonl, which the last process to finish writes again.

        The evaluation's results (``cmlora eval`` scores, ``cmlora report``) are removed as well: they
        are keyed by image path, and the new run's images take the same paths, so old scores would
        otherwise be taken for the new images. The judge's reply cache stays (it is keyed by image
        bytes, so it can never answer for a different image).
        """
        from cmlora.evaluate.runs import CLIPSCORE_FILENAME, CONCEPTS_FILENAME, EVAL_DIRNAME, JUDGE_FILENAME

        for name in (CLIPSCORE_FILENAME, JUDGE_FILENAME, CONCEPTS_FILENAME):
            (self.out / EVAL_DIRNAME / name).unlink(missing_ok=True)
        (self.out / REPORT_FILE).unlink(missing_ok=True)
        (self.out / MANIFEST_FILE).unlink(missing_ok=True)
        self.part.unlink(missing_ok=True)
        if self.sheets.is_dir():
            for path in self.sheets.iterdir():
                if path.suffix == ".png" and not path.name.startswith(_TMP_PREFIX):
                    path.unlink(missing_ok=True)
        for job in self.jobs[self.rank :: self.world_size]:
            self.sidecar(job.job_id).unlink(missing_ok=True)
            self.png(job.job_id).unlink(missing_ok=True)
        if self.rank == 0:
            for path in self.out.iterdir():
                match = _PART_RE.match(path.name)
                if match and int(match.group(1)) >= self.world_size:
                    path.unlink(missing_ok=True)
            current = set(self.ids)
            if self.images.is_dir():
                for path in self.images.iterdir():
                    if path.suffix in (".png", ".json") and not path.name.startswith(_TMP_PREFIX):
                        if path.stem not in current:
                            path.unlink(missing_ok=True)

    # -- per-job work ---------------------------------------------------------------------------
    def remove_own_tmp(self) -> None:
        prefix = f"{_TMP_PREFIX}{self.tag}-"
        for folder in (self.out, self.images, self.sheets):
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.name.startswith(prefix):
                        path.unlink(missing_ok=True)

    def rebuild_part(self, records: list[dict[str, Any]]) -> None:
        """Rewrite this rank's part file from the records on disk (drops cut or orphaned lines)."""
        text = "".join(_dumps(r) + "\n" for r in records)
        _atomic_write_text(self.part, text, self.tag)

    def commit(self, job: SweepJob, image: Image.Image, record: dict[str, Any]) -> None:
        """png, then record, then manifest line: each step only after the previous is durable."""
        pnginfo = PngInfo()
        pnginfo.add_text(PNG_TEXT_KEY, json.dumps(record, default=_json_default, ensure_ascii=True))
        _atomic_write(
            self.png(job.job_id), lambda fh: image.save(fh, format="PNG", pnginfo=pnginfo), self.tag
        )
        _atomic_write_text(self.sidecar(job.job_id), _dumps(record, indent=2) + "\n", self.tag)
        _fsync_dir(self.images)
        with open(self.part, "a", encoding="utf-8") as fh:
            fh.write(_dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def make_sheet_if_complete(self, composition_id: str) -> bool:
        """Write ``sheets/<composition_id>.png`` once all its images exist and it is missing."""
        target = self.sheets / f"{composition_id}.png"
        jobs = self.by_composition[composition_id]
        if target.exists() or not all(self.is_done(j.job_id) for j in jobs):
            return False
        methods = list(dict.fromkeys(j.method for j in jobs))
        seeds: dict[int, int] = {}
        for j in jobs:
            seeds.setdefault(j.seed_index, j.seed)
        rows = sorted(seeds)
        index = {(j.seed_index, j.method): j.job_id for j in jobs}
        cells: list[list[Image.Image | None]] = []
        for seed_index in rows:
            row: list[Image.Image | None] = []
            for method in methods:
                job_id = index.get((seed_index, method))
                if job_id is None:
                    row.append(None)
                    continue
                with Image.open(self.png(job_id)) as img:
                    row.append(img.convert("RGB"))
            cells.append(row)
        sheet = comparison_sheet(cells, methods, [f"seed {seeds[s]}" for s in rows])
        _atomic_write(target, lambda fh: sheet.save(fh, format="PNG"), self.tag)
        return True

    def merge(self) -> tuple[list[dict[str, Any]], bool]:
        """Write manifest.jsonl (job order) and missing sheets from the disk, under the lock.

        Returns the records on disk and whether the run is complete. Because the content is a
        function of the disk only and merges are serialised, the last merge wins and sees all.
        """
        with _file_lock(self.out / _LOCK_FILE):
            records: list[dict[str, Any]] = []
            for job in self.jobs:
                record = self.load_done(job)
                if record is not None:
                    records.append(record)
            text = "".join(_dumps(r) + "\n" for r in records)
            _atomic_write_text(self.out / MANIFEST_FILE, text, self.tag)
            for composition_id in self.by_composition:
                self.make_sheet_if_complete(composition_id)
            complete = len(records) == len(self.jobs)
            if complete:
                # Every image exists, so nobody is writing images any more: tmp files left in
                # images/ by a killed earlier run of another rank (or world size) can go.
                for path in self.images.iterdir():
                    if path.name.startswith(_TMP_PREFIX):
                        path.unlink(missing_ok=True)
                for path in self.out.iterdir():
                    match = _PART_RE.match(path.name)
                    if match and int(match.group(1)) >= self.world_size:
                        path.unlink(missing_ok=True)
            _fsync_dir(self.out)
        return records, complete


def _png_is_whole(path: Path) -> bool:
    """A resume must not keep a PNG cut short by a crash or a full disk: decode it fully."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=_json_default)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    sweep = _Sweep(out, settings, jobs, rank, world_size)

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
            with _SignalGuard() as guard:
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

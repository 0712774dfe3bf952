"""The files of a sweep's run folder: who writes what, when, and how a resume reads it back.

The disk is the only state of a sweep, so everything here is built to survive being killed at any
instant:

* A job is done iff ``images/<job_id>.json`` (its record) and ``images/<job_id>.png`` both exist;
  both are written atomically (tmp file in the same folder, fsync, ``os.replace``), png first, so a
  record never describes a missing or half-written image. A killed run leaves at worst a png
  without record (redone) or a stray tmp file (removed).
* ``manifest.rank<R>.jsonl`` is each process's running log, one line per image, appended (and
  fsynced) only after the image and its record exist; on start it is rebuilt from the records on
  disk, so a line cut by a kill or a line for a vanished file cannot survive a resume.
* ``manifest.jsonl`` (all images, in job order) is derived from the records on disk by whichever
  process finishes, under an exclusive file lock; the last process to take the lock has seen every
  finished image, so the final manifest is complete and is byte-for-byte what a single process
  would have written.
* ``run.json`` pins the settings (and a digest of the job list) of the folder; re-running with
  anything else is refused, because mixing images of two configurations in one benchmark table
  silently corrupts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from cmlora.errors import CmloraError
from cmlora.files import atomic_write_bytes, atomic_write_text, fsync_dir
from cmlora.paths import check_regular_file
from cmlora.records import RECORD_CHUNK, png_bytes
from cmlora.testbed.sheets import comparison_sheet

if TYPE_CHECKING:
    from cmlora.testbed.sweep import SweepJob

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
PNG_TEXT_KEY = RECORD_CHUNK
"""PNG text chunk holding the image's record, so a copied-away image still says how it was made."""

_LOCK_FILE = ".sweep.lock"
_TMP_PREFIX = ".tmp-"
_PART_RE = re.compile(r"^manifest\.rank(\d+)\.jsonl$")


class SweepError(CmloraError, ValueError):
    """A sweep cannot start or go on as asked; the message says what to do instead."""


class SweepSettingsError(SweepError):
    """The output folder belongs to a run with other settings (or is not a sweep folder)."""


# --------------------------------------------------------------------------------------------------
# JSON of the records and the folder lock; every write a reader could see is atomic (cmlora.files).


def _json_default(value: Any) -> Any:
    """Accept numpy/torch scalars in records (``.item()``), refuse anything else loudly."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"record value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False, **kwargs)


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


class RunFolder:
    """One rank's view of a run folder during one ``run_sweep`` call; a class only to keep the
    many paths in one place."""

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
        # Each rank's tmp files carry its tag, so a rank can remove its own leftovers of a kill
        # without touching a file another rank is writing at that moment.
        self.tmp_prefix = f"{_TMP_PREFIX}{self.tag}-"
        self.part = out_dir / f"manifest.rank{rank}.jsonl"
        self.ids = [job.job_id for job in jobs]
        self.by_composition: dict[str, list[SweepJob]] = {}
        for job in jobs:
            self.by_composition.setdefault(job.composition.id, []).append(job)

    # -- writing: atomic, never syncing the folder (the callers sync once after related writes) --
    def _write_bytes(self, path: Path, data: bytes) -> None:
        atomic_write_bytes(path, data, tmp_prefix=self.tmp_prefix, sync_dir=False)

    def _write_text(self, path: Path, text: str) -> None:
        atomic_write_text(path, text, tmp_prefix=self.tmp_prefix, sync_dir=False)

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
                self._write_text(run_file, _dumps(info, indent=2) + "\n")
                fsync_dir(self.out, strict=True)
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
            self._write_text(run_file, _dumps(info, indent=2) + "\n")
            fsync_dir(self.out, strict=True)

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
        for folder in (self.out, self.images, self.sheets):
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.name.startswith(self.tmp_prefix):
                        path.unlink(missing_ok=True)

    def rebuild_part(self, records: list[dict[str, Any]]) -> None:
        """Rewrite this rank's part file from the records on disk (drops cut or orphaned lines)."""
        text = "".join(_dumps(r) + "\n" for r in records)
        self._write_text(self.part, text)

    def commit(self, job: SweepJob, image: Image.Image, record: dict[str, Any]) -> None:
        """png, then record, then manifest line: each step only after the previous is durable."""
        chunk = json.dumps(record, default=_json_default, ensure_ascii=True)
        self._write_bytes(self.png(job.job_id), png_bytes(image, text=chunk))
        self._write_text(self.sidecar(job.job_id), _dumps(record, indent=2) + "\n")
        fsync_dir(self.images, strict=True)
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
        self._write_bytes(target, png_bytes(sheet))
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
            self._write_text(self.out / MANIFEST_FILE, text)
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
            fsync_dir(self.out, strict=True)
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

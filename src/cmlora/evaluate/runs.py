"""Reading sweep run directories and writing evaluation results safely.

Every evaluation step reads the same ``RUN_DIR/manifest.jsonl`` written by the sweep runner, so the
validation lives here once: a malformed manifest should fail loudly with the line number rather than
surface later as a confusing ``KeyError`` deep inside CLIPScore or the judge.  The write helpers exist
because evaluation runs are long and get interrupted: whole-file results are replaced atomically and
append-only logs are flushed per line, so a killed process leaves at worst one partial trailing line,
which the readers here tolerate and the appenders repair.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import CmloraError
from ..files import atomic_write_bytes, atomic_write_text
from ..paths import check_regular_file, regular_file_problem

__all__ = [
    "CLIPSCORE_FILENAME",
    "CONCEPTS_FILENAME",
    "EVAL_DIRNAME",
    "JUDGE_FILENAME",
    "MANIFEST_NAME",
    "LoraInfo",
    "ManifestEntry",
    "ManifestError",
    "JsonlAppender",
    "atomic_write_bytes",
    "atomic_write_text",
    "eval_dir",
    "read_jsonl",
    "read_manifest",
    "readable_images",
    "resolve_image",
]

MANIFEST_NAME = "manifest.jsonl"
EVAL_DIRNAME = "eval"
# Result file names live here (not in their modules) so the report can find them without importing torch.
CLIPSCORE_FILENAME = "clipscore.jsonl"
JUDGE_FILENAME = "judge.jsonl"
CONCEPTS_FILENAME = "concepts.jsonl"


class ManifestError(CmloraError, ValueError):
    """A run directory or one of its JSONL files is unusable; the message names the file and line."""


@dataclass(frozen=True)
class LoraInfo:
    """One LoRA of a composition, as recorded by the sweep runner."""

    name: str
    category: str
    triggers: tuple[str, ...]
    weight: float | None = None
    sha256: str | None = None
    file: str | None = None


@dataclass(frozen=True)
class ManifestEntry:
    """One generated image and how it was made.

    ``extra`` keeps the fields this module does not interpret so that nothing the runner records is
    lost when entries are passed around.
    """

    image: str
    job_id: str
    composition_id: str
    n: int
    method: str
    seed: int
    seed_index: int
    prompt: str
    trigger_prompt: str
    loras: tuple[LoraInfo, ...]
    full_calls: int | None = None
    cached_calls: int | None = None
    macs: int | None = None
    seconds: float | None = None
    line: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


_KNOWN_KEYS = {
    "image",
    "job_id",
    "composition_id",
    "n",
    "method",
    "seed",
    "seed_index",
    "prompt",
    "trigger_prompt",
    "loras",
    "full_calls",
    "cached_calls",
    "macs",
    "seconds",
}


def eval_dir(run_dir: str | os.PathLike[str], create: bool = True) -> Path:
    """Where evaluation outputs of a run live; kept apart from the runner's own files."""
    path = Path(run_dir) / EVAL_DIRNAME
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_image(run_dir: str | os.PathLike[str], rel: str) -> Path:
    """Turn a manifest image path into a real path, refusing anything outside ``run_dir``.

    Manifests can be copied between machines or edited by hand; an absolute path or ``..`` would
    make the judge upload arbitrary local files to a remote endpoint, so those are rejected.
    """
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"image path must be a non-empty string, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise ManifestError(f"image path {rel!r} must be relative to the run directory")
    # Lexical check on purpose: an ``images`` folder symlinked onto another disk is legitimate,
    # a ``..`` component is not.
    norm = os.path.normpath(rel)
    if norm in (".", "..") or norm.startswith(".." + os.sep) or norm.startswith("../"):
        raise ManifestError(f"image path {rel!r} escapes the run directory {str(run_dir)!r}")
    return Path(run_dir) / norm


def readable_images(run_dir: str | os.PathLike[str], entries) -> list[Path]:
    """The image paths of ``entries``, checked to be readable regular files all at once, so that a bad
    run fails before any model loads or any old score is discarded."""
    paths = [resolve_image(run_dir, e.image) for e in entries]
    missing = [f"{p}: {problem}" for p in paths if (problem := regular_file_problem(p)) is not None]
    if missing:
        raise ManifestError(f"{len(missing)} manifest image(s) cannot be read, e.g. {missing[0]}")
    return paths


def _iter_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)``; a partial *last* line (interrupted append) is skipped."""
    check_regular_file(path, lambda problem: ManifestError(f"{path}: {problem}"))
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = text.split("\n")
    for idx, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield idx, json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
            is_last = idx == len(lines) and not text.endswith("\n")
            if is_last:
                return
            raise ManifestError(f"{path}: line {idx}: invalid JSON ({getattr(exc, 'msg', exc)})") from None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file of objects, tolerating an interrupted final line; missing file -> []."""
    path = Path(path)
    if not os.path.lexists(path):
        return []
    out: list[dict[str, Any]] = []
    for idx, value in _iter_json_lines(path):
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: line {idx}: expected a JSON object, got {type(value).__name__}")
        out.append(value)
    return out


def _req(rec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in rec:
        raise ManifestError(f"{where}: missing required field {key!r}")
    value = rec[key]
    # bool is an int subclass; a boolean seed or N is always a bug in the writer.
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: field {key!r} must be {names}, got {value!r}")
    return value


def _opt_num(rec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if rec.get(key) is None:
        return None
    return _req(rec, key, kind, where)


def _parse_lora(raw: Any, where: str) -> LoraInfo:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: each entry of 'loras' must be an object, got {raw!r}")
    triggers = raw.get("triggers", raw.get("trigger", []))
    if isinstance(triggers, str):
        triggers = [triggers]
    if not isinstance(triggers, list) or not all(isinstance(t, str) for t in triggers):
        raise ManifestError(f"{where}: 'triggers' of a LoRA must be a list of strings, got {triggers!r}")
    weight = raw.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
        raise ManifestError(f"{where}: LoRA 'weight' must be a number, got {weight!r}")
    return LoraInfo(
        name=str(_req(raw, "name", str, where)),
        category=str(raw.get("category", "")),
        triggers=tuple(triggers),
        weight=None if weight is None else float(weight),
        sha256=raw.get("sha256"),
        file=raw.get("file"),
    )


def trigger_prompt_from_loras(loras: Iterable[LoraInfo]) -> str:
    """The text CLIPScore compares against when the runner did not record it: all triggers, in order."""
    return ", ".join(t for lora in loras for t in lora.triggers)


def parse_manifest_line(
    rec: Any, where: str, run_dir: str | os.PathLike[str], line: int = 0
) -> ManifestEntry:
    """Validate one manifest record; ``where`` prefixes every error so users can find the line."""
    if not isinstance(rec, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    image = _req(rec, "image", str, where)
    try:
        resolve_image(run_dir, image)
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    loras_raw = _req(rec, "loras", list, where)
    loras = tuple(_parse_lora(x, f"{where}: loras[{i}]") for i, x in enumerate(loras_raw))
    trigger_prompt = rec.get("trigger_prompt")
    if trigger_prompt is None:
        trigger_prompt = trigger_prompt_from_loras(loras)
    elif not isinstance(trigger_prompt, str):
        raise ManifestError(f"{where}: field 'trigger_prompt' must be str, got {trigger_prompt!r}")
    n = _req(rec, "n", int, where)
    if n < 1:
        raise ManifestError(f"{where}: field 'n' must be >= 1, got {n}")
    return ManifestEntry(
        image=image,
        job_id=str(_req(rec, "job_id", (str, int), where)),
        composition_id=str(_req(rec, "composition_id", (str, int), where)),
        n=n,
        method=_req(rec, "method", str, where),
        seed=_req(rec, "seed", int, where),
        seed_index=_req(rec, "seed_index", int, where),
        prompt=str(rec.get("prompt", "")),
        trigger_prompt=trigger_prompt,
        loras=loras,
        full_calls=_opt_num(rec, "full_calls", int, where),
        cached_calls=_opt_num(rec, "cached_calls", int, where),
        macs=_opt_num(rec, "macs", int, where),
        seconds=None if rec.get("seconds") is None else float(_req(rec, "seconds", (int, float), where)),
        line=line,
        extra={k: v for k, v in rec.items() if k not in _KNOWN_KEYS},
    )


def partial_tail(path: str | os.PathLike[str]) -> bool:
    """Whether a JSONL file ends in a line cut short (no newline, not valid JSON): a crash mid-write."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - (1 << 16)))
        tail = fh.read()
    if not tail or tail.endswith(b"\n"):
        return False
    last = tail.rsplit(b"\n", 1)[-1]
    try:
        json.loads(last)
    except ValueError:
        return True
    return False


def open_run_image(path: str | os.PathLike[str]):
    """A run's image, fully decoded as RGB; a missing, truncated or corrupt file is a ManifestError
    naming it (scorers read images only through here)."""
    from PIL import Image

    check_regular_file(path, lambda problem: ManifestError(f"{path}: {problem}"))  # never open a pipe
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise ManifestError(
            f"image {str(path)!r} is unreadable ({exc}): it is truncated or corrupt; re-run the sweep "
            "command that made it (resuming remakes broken images)"
        ) from None


def read_manifest(run_dir: str | os.PathLike[str]) -> list[ManifestEntry]:
    """Load and validate ``RUN_DIR/manifest.jsonl``.

    Duplicate images or job ids are errors because every downstream join (scores, judge verdicts,
    concept recall) is keyed by them and a duplicate would silently double-count.
    """
    path = Path(run_dir) / MANIFEST_NAME
    if not os.path.lexists(path):
        raise ManifestError(f"no {MANIFEST_NAME} in {str(run_dir)!r}: is this a sweep run directory?")
    if partial_tail(path):
        # the sweep writes its manifest atomically: a cut line is damage, and reading on would drop
        # that image from every count without a word
        raise ManifestError(
            f"{path}: the last line is cut short (a crash while it was written): re-run the sweep "
            "command that made this folder to rebuild the manifest from the images' records"
        )
    entries: list[ManifestEntry] = []
    seen_images: dict[str, int] = {}
    seen_jobs: dict[str, int] = {}
    for idx, rec in _iter_json_lines(path):
        where = f"{path}: line {idx}"
        entry = parse_manifest_line(rec, where, run_dir, line=idx)
        key = os.path.normpath(entry.image)
        if key in seen_images:
            raise ManifestError(f"{where}: image {entry.image!r} already listed on line {seen_images[key]}")
        if entry.job_id in seen_jobs:
            raise ManifestError(
                f"{where}: job_id {entry.job_id!r} already listed on line {seen_jobs[entry.job_id]}"
            )
        seen_images[key] = idx
        seen_jobs[entry.job_id] = idx
        entries.append(entry)
    return entries


class JsonlAppender:
    """Append JSON records one line at a time, each flushed and fsynced.

    On open, a partial trailing line left by an interrupted run is cut off so the next record does
    not get glued onto it (which would corrupt *two* records instead of losing one).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as fh:
            fh.truncate(cut)

    def write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            raise ValueError(f"{self.path} is closed")
        self._fh.write(json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

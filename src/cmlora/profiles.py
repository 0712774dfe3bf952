"""The profile file: stored frequency profiles of LoRAs, computed once and reused by CMLoRA.

Profiling a LoRA means generating images with it, which costs minutes; ordering a composition
must not. So ``cmlora profile`` writes one JSON file per base model and generation settings, and
a composition looks its LoRAs up there. Entries are matched by the SHA-256 of the LoRA file, not by
name, because names are user-chosen labels: the same name may point at a retrained file, and a
profile of another file would silently give a wrong order.

File layout (``format`` guards against reading an unrelated JSON file)::

    {"format": "cmlora-profiles", "version": 1,
     "settings": {...}, "created_with": {...},
     "entries": [{"name", "file", "sha256", "score", "radial_profile", "category"}, ...]}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmlora.errors import CmloraError
from cmlora.files import atomic_write_bytes
from cmlora.files import sha256_file as sha256_file  # re-exported: profile entries are keyed by it
from cmlora.frequency import order_and_partition
from cmlora.paths import regular_file_problem

FORMAT_NAME = "cmlora-profiles"
FORMAT_VERSION = 1

_HEX = frozenset("0123456789abcdef")


class ProfileFileError(CmloraError, ValueError):
    """A profile file cannot be read or does not cover a composition; names the file and the entry."""


@dataclass(frozen=True)
class LoRAProfileEntry:
    """The frequency profile of one LoRA file under the file's settings."""

    name: str
    file: str
    sha256: str
    score: float
    radial_profile: list[float]
    category: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "score": self.score,
            "radial_profile": list(self.radial_profile),
            "category": self.category,
        }


def _fail(where: str, message: str) -> ProfileFileError:
    return ProfileFileError(f"profile file {where}: {message}")


def _entry_from_json(raw: Any, index: int, where: str) -> LoRAProfileEntry:
    """Validate one entry; every message names the entry (by name when it has one) and the file."""
    label = f"entry {index}"
    if not isinstance(raw, dict):
        raise _fail(where, f"{label} must be an object, got {type(raw).__name__}")
    name = raw.get("name")
    if isinstance(name, str) and name:
        label = f"entry {index} ({name!r})"
    expected = {"name", "file", "sha256", "score", "radial_profile", "category"}
    missing = sorted(expected - raw.keys())
    if missing:
        raise _fail(where, f"{label} is missing field(s) {', '.join(missing)}")
    unknown = sorted(raw.keys() - expected)
    if unknown:
        raise _fail(where, f"{label} has unknown field(s) {', '.join(unknown)}")
    if not isinstance(name, str) or not name:
        raise _fail(where, f"{label}: 'name' must be a non-empty string, got {name!r}")
    if not isinstance(raw["file"], str):
        raise _fail(where, f"{label}: 'file' must be a string, got {raw['file']!r}")
    sha = raw["sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX):
        raise _fail(where, f"{label}: 'sha256' must be 64 lowercase hex digits, got {sha!r}")
    score = raw["score"]
    # bool is an int subclass; a true/false score is a bug in whoever wrote the file.
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise _fail(where, f"{label}: 'score' must be a finite number, got {score!r}")
    profile = raw["radial_profile"]
    if not isinstance(profile, list) or not profile:
        raise _fail(where, f"{label}: 'radial_profile' must be a non-empty list of numbers")
    for value in profile:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _fail(where, f"{label}: 'radial_profile' holds a non-number or non-finite value {value!r}")
    category = raw["category"]
    if category is not None and not isinstance(category, str):
        raise _fail(where, f"{label}: 'category' must be a string or null, got {category!r}")
    return LoRAProfileEntry(
        name=name,
        file=raw["file"],
        sha256=sha,
        score=float(score),
        radial_profile=[float(v) for v in profile],
        category=category,
    )


@dataclass
class ProfileFile:
    """All stored profiles made under one set of settings (base model, prompt, seeds, resolution)."""

    entries: list[LoRAProfileEntry]
    settings: dict[str, Any] = field(default_factory=dict)
    created_with: dict[str, Any] = field(default_factory=dict)
    #: Where the file was read from or last saved to; only used to name it in error messages.
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = self.source or "<in memory>"
        seen: dict[str, str] = {}
        for entry in self.entries:
            if entry.sha256 in seen:
                raise _fail(
                    where,
                    f"entries {seen[entry.sha256]!r} and {entry.name!r} have the same sha256 {entry.sha256}",
                )
            seen[entry.sha256] = entry.name

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "settings": self.settings,
            "created_with": self.created_with,
            "entries": [entry.to_json() for entry in self.entries],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (:func:`cmlora.files.atomic_write_bytes`: temporary file, fsync, os.replace).

        A reader (or a crash) never sees half a file, and a failed save leaves the old one intact.
        ``allow_nan=False`` because NaN is not JSON and other readers would reject the file.
        """
        target = Path(path)
        text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(target, text.encode("utf-8"))
        self.source = str(target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProfileFile:
        """Read and validate a profile file; every error names the file and, where one is at fault, the entry."""
        where = str(path)
        problem = regular_file_problem(path)
        if problem == "no such file":
            raise _fail(where, "does not exist: run `cmlora profile` to create it")
        if problem is not None:
            raise _fail(where, f"{problem}; give the JSON file `cmlora profile` wrote")
        try:
            with open(path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise _fail(where, f"is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise _fail(where, f"top level must be an object, got {type(raw).__name__}")
        if raw.get("format") != FORMAT_NAME:
            raise _fail(where, f"'format' must be {FORMAT_NAME!r}, got {raw.get('format')!r}")
        if raw.get("version") != FORMAT_VERSION:
            raise _fail(
                where, f"unsupported version {raw.get('version')!r} (this cmlora reads {FORMAT_VERSION})"
            )
        for key in ("settings", "created_with"):
            if not isinstance(raw.get(key), dict):
                raise _fail(where, f"{key!r} must be an object, got {raw.get(key)!r}")
        entries = raw.get("entries")
        if not isinstance(entries, list):
            raise _fail(where, f"'entries' must be a list, got {type(entries).__name__}")
        parsed = [_entry_from_json(item, i, where) for i, item in enumerate(entries)]
        return cls(entries=parsed, settings=raw["settings"], created_with=raw["created_with"], source=where)

    def by_sha256(self) -> dict[str, LoRAProfileEntry]:
        return {entry.sha256: entry for entry in self.entries}

    def order_for(
        self, loras_sha256: Mapping[str, str], threshold: float | None = None
    ) -> tuple[list[str], list[str], list[str]]:
        """(order, H, L) for a composition given as {name: sha256 of its file}, in the user's order.

        Names in the result are the composition's names; scores come from the entries whose
        sha256 matches. A LoRA without an entry is an error, never skipped: CMLoRA must place every
        LoRA. A name that matches an entry of another file is reported as such, because the
        likely cause (a retrained or replaced file) needs a new profile, not a rename.
        """
        where = self.source or "<in memory>"
        if not loras_sha256:
            raise ValueError("order_for needs at least one LoRA")
        table = self.by_sha256()
        names = {entry.name: entry for entry in self.entries}
        scores: dict[str, float] = {}
        for name, sha in loras_sha256.items():
            entry = table.get(sha)
            if entry is not None:
                scores[name] = entry.score
                continue
            if name in names:
                raise _fail(
                    where,
                    f"entry {name!r} was made from a different file (sha256 {names[name].sha256}) than the "
                    f"LoRA {name!r} of this composition (sha256 {sha}): run `cmlora profile` on it again",
                )
            raise ProfileFileError(
                f"profile file {where} has no entry for LoRA {name!r} (sha256 {sha}): run `cmlora profile` on it"
            )
        return order_and_partition(scores, threshold=threshold)

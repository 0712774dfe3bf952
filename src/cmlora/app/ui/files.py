"""Which files the web app may read: the model's own LoRAs, ``--lora-dir`` and uploads, nothing else.

Why: the page is a remote control for this machine. A file path taken from a request (a LoRA, a
profile, a record loaded back) would let any visitor make the server open ``/etc/passwd`` (and echo
its first bytes in an error) or ``/dev/zero`` (and read without end). So every path is resolved
(symbolic links followed) and must lie inside an allowed folder, be a regular file and stay under a
size cap, all judged by ``stat`` before anything is opened. The page itself never sends paths: it
names catalog entries, and a path from a loaded record is mapped to an entry here.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ...errors import OptionError
from ...paths import regular_file_problem

LORA_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
PROFILE_SUFFIX = ".json"
#: Largest LoRA file accepted (SDXL LoRAs of high rank are a few hundred MB).
MAX_LORA_BYTES = 1024 * 1024 * 1024
#: Profiles and records are small JSON files.
MAX_JSON_BYTES = 4 * 1024 * 1024
#: Uploaded files kept in one server run; the oldest go first.
MAX_UPLOADS = 32
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def safe_stem(stem: str) -> str:
    """A file stem as a LoRA name may spell it (letters, digits, ``_.-``; a letter or digit first)."""
    return _NAME_UNSAFE.sub("_", stem).lstrip("_.-")[:100]


@dataclass(frozen=True)
class CatalogEntry:
    """One LoRA the page can pick: its id, file, category and trigger words."""

    name: str
    file: Path
    category: str | None
    triggers: tuple[str, ...]
    origin: str  # "model", "folder", "upload" or "demo"

    @property
    def label(self) -> str:
        """What the picker shows: the name, its category and trigger words."""
        parts = [self.name]
        if self.category:
            parts.append(self.category)
        if self.triggers:
            parts.append(", ".join(self.triggers))
        return " · ".join(parts)


class AllowedFiles:
    """The allowed folders and the LoRA/profile catalog built from them."""

    def __init__(
        self,
        model_loras: dict[str, dict],
        lora_dir: str | Path | None,
        upload_dir: Path,
        model_profile: str | None = None,
        allow_pickle: bool = False,
        max_lora_bytes: int = MAX_LORA_BYTES,
    ) -> None:
        self.model_loras = dict(model_loras)
        self.lora_dir = Path(lora_dir).expanduser().resolve() if lora_dir is not None else None
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise OptionError(
                f"--lora-dir {str(lora_dir)!r} is not a folder: give the folder of your LoRA files"
            )
        self.upload_dir = upload_dir.resolve()
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        self.model_profile = Path(model_profile).resolve() if model_profile else None
        self.allow_pickle = allow_pickle
        self.max_lora_bytes = max_lora_bytes
        self.roots: tuple[Path, ...] = tuple(
            dict.fromkeys(
                [
                    *(Path(v["file"]).resolve().parent for v in self.model_loras.values()),
                    *([self.lora_dir] if self.lora_dir is not None else []),
                    self.upload_dir,
                    *([self.model_profile.parent] if self.model_profile else []),
                ]
            )
        )

    # ------------------------------------------------------------------ checks

    def check(self, path: str | os.PathLike[str], what: str = "file", max_bytes: int | None = None) -> Path:
        """``path`` resolved, when it is a regular file inside an allowed folder and under the cap;
        an ``OptionError`` naming the path and the rule otherwise. Nothing is opened."""
        raw = os.fspath(path)
        if not isinstance(raw, str) or not raw or "\x00" in raw:
            raise OptionError(f"{what} {raw!r} is not a file path")
        given = Path(raw).expanduser()
        try:
            resolved = given.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise OptionError(f"{what} {raw!r} cannot be resolved ({exc})") from None
        if not any(resolved.is_relative_to(root) for root in self.roots):
            via = f" (it resolves to {str(resolved)!r})" if resolved != given.absolute() else ""
            raise OptionError(
                f"{what} {raw!r}{via} is outside the folders this app may read: "
                f"{', '.join(str(r) for r in self.roots)}. Put it in --lora-dir or upload it."
            )
        problem = regular_file_problem(resolved)
        if problem is not None:
            raise OptionError(f"{what} {raw!r} {problem}")
        cap = self.max_lora_bytes if max_bytes is None else max_bytes
        size = resolved.stat().st_size
        if size > cap:
            raise OptionError(f"{what} {raw!r} is {size / 1e6:.1f} MB; the limit is {cap / 1e6:.1f} MB")
        return resolved

    # ------------------------------------------------------------------ catalog

    def loras(self) -> dict[str, CatalogEntry]:
        """name -> entry, re-read each call so files added to --lora-dir or uploaded show up.

        Files that break a rule (a symlink out of the folder, a FIFO) are left out, never read.
        """
        entries: dict[str, CatalogEntry] = {}
        for name, v in sorted(self.model_loras.items()):
            entries[name] = CatalogEntry(
                name, Path(v["file"]).resolve(), v.get("category"), tuple(v.get("triggers", ())), "model"
            )
        suffixes = LORA_SUFFIXES + (PICKLE_SUFFIXES if self.allow_pickle else ())
        for folder, origin in ((self.lora_dir, "folder"), (self.upload_dir, "upload")):
            if folder is None:
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() not in suffixes:
                    continue
                try:
                    resolved = self.check(path, "LoRA file")
                except OptionError:
                    continue
                name = _entry_name(path.stem, entries)
                category = None
                if origin == "upload" and path.stem.startswith("demo_"):
                    category, origin_ = path.stem.removeprefix("demo_"), "demo"
                else:
                    origin_ = origin
                entries[name] = CatalogEntry(name, resolved, category, (), origin_)
        return entries

    def profiles(self) -> list[tuple[str, str]]:
        """(label, path) of the profile files the page offers: --lora-dir's and uploaded ``.json``."""
        found: list[tuple[str, str]] = []
        for folder in (self.lora_dir, self.upload_dir):
            if folder is None:
                continue
            for path in sorted(folder.glob(f"*{PROFILE_SUFFIX}")):
                try:
                    found.append((path.name, str(self.check(path, "profile file", MAX_JSON_BYTES))))
                except OptionError:
                    continue
        return found

    def entry_for_file(self, file: str, name: str | None, sha256: str | None) -> CatalogEntry:
        """The catalog entry a record's LoRA names: the same resolved file, or (a record from
        another machine) the same name with the same hash. The file is checked first, so a
        record cannot make the app read outside its folders."""
        catalog = self.loras()
        try:
            resolved = self.check(file, "the record's LoRA file") if file else None
        except OptionError:
            resolved = None
            refusal = True
        else:
            refusal = False
        for entry in catalog.values():
            if resolved is not None and entry.file == resolved:
                return entry
        if name in catalog:
            entry = catalog[name]
            if sha256 is None:
                return entry
            from ...loras import sha256_of

            if sha256_of(entry.file) == sha256:
                return entry
        if refusal:
            self.check(file, "the record's LoRA file")  # raises with the reason
        raise OptionError(
            f"the record's LoRA {name or file!r} ({file}) is not among this app's LoRAs: "
            "upload it or start the app with --lora-dir on its folder"
        )

    def add_upload(self, source: str | os.PathLike[str], original_name: str) -> str:
        """Copy an uploaded file into the upload folder; returns the name it has there.

        Only safetensors LoRAs and JSON profiles are taken (a pickle runs code when loaded); the
        oldest uploads go once there are ``MAX_UPLOADS``.
        """
        suffix = Path(original_name).suffix.lower()
        if suffix not in LORA_SUFFIXES + (PROFILE_SUFFIX,):
            raise OptionError(
                f"upload {original_name!r}: only .safetensors LoRAs and .json profiles are taken here"
            )
        problem = regular_file_problem(source)
        if problem is not None:
            raise OptionError(f"upload {original_name!r} {problem}")
        cap = MAX_JSON_BYTES if suffix == PROFILE_SUFFIX else self.max_lora_bytes
        size = Path(source).stat().st_size
        if size > cap:
            raise OptionError(
                f"upload {original_name!r} is {size / 1e6:.1f} MB; the limit is {cap / 1e6:.1f} MB"
            )
        stem = safe_stem(Path(original_name).stem)[:60] or "upload"
        target = self.upload_dir / f"{stem}{suffix}"
        shutil.copyfile(source, target)
        kept = sorted(self.upload_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in kept[: max(0, len(kept) - MAX_UPLOADS)]:
            old.unlink(missing_ok=True)
        return target.name


def _entry_name(stem: str, taken: dict[str, CatalogEntry]) -> str:
    """A catalog id from a file name: characters a LoRA name may hold, made unique."""
    name = safe_stem(stem) or "lora"
    while name in taken:
        name += "_"
    return name

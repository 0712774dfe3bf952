"""Writing and hashing files: the one atomic writer and the one file hash of the project.

Images, records, reports, profile files, judge cache entries and sweep manifests are all read back
by other processes (a resumed sweep, a report, the web app) and may be cut by a kill, a full disk or
a power loss. Every such write therefore goes through :func:`atomic_write_bytes`, so a reader sees
the old file or the new one, never half of one, and a crash leaves at most a temporary file that is
recognisable by its name.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

_HASH_CHUNK = 1 << 20


def fsync_dir(path: str | os.PathLike[str], *, strict: bool = False) -> None:
    """Make a rename in ``path`` durable: the rename lives in the directory entry, not the file.

    Not every file system lets a directory be opened or synced, so by default a failure is ignored
    (the file itself is already synced). ``strict`` callers (the sweep, whose resume logic trusts the
    disk) want a failing sync to stop the run instead; where directories cannot be synced at all
    (not POSIX) there is nothing to do.
    """
    if strict and os.name != "posix":  # pragma: no cover
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def _create_temp(folder: Path, name: str, prefix: str | None) -> tuple[int, Path]:
    """Open a new, uniquely named temporary file in ``folder`` with mode 0o666 minus the umask.

    ``tempfile.mkstemp`` always creates 0o600, and ``os.replace`` keeps that mode, so every image,
    report, plot and cache entry came out private whatever the umask said, unlike the files any
    other tool (or ``open()``) makes. Asking the kernel for 0o666 lets it apply the umask itself,
    with no need to read the process-wide umask (which cannot be read without changing it).

    With a ``prefix`` the name starts with it and ends with ``name`` (so it keeps the target's
    suffix), which lets a caller find and remove its own leftovers after a kill.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        token = secrets.token_hex(6)
        tmp = folder / (f".{name}.{token}.tmp" if prefix is None else f"{prefix}{token}-{name}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file for {name!r} in {str(folder)!r}")


def atomic_write_bytes(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    tmp_prefix: str | None = None,
    sync_dir: bool = True,
) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half file.

    The file gets the usual ``0o666 & ~umask`` mode (see :func:`_create_temp`); the temporary file
    is removed on any failure, Ctrl-C included. ``sync_dir=False`` leaves the directory sync to a
    caller that writes several files and syncs the folder once after the last.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name, tmp_prefix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_text(
    path: str | os.PathLike[str],
    text: str,
    *,
    tmp_prefix: str | None = None,
    sync_dir: bool = True,
) -> None:
    """UTF-8 text through :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), tmp_prefix=tmp_prefix, sync_dir=sync_dir)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (LoRA files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "sha256_file"]

"""Paths the user names, checked before any work: input files must be regular files, output
folders must be writable.

Why one module: every command reads files the user typed (LoRAs, profiles, records, images,
info files, run folders) and writes into a folder the user typed. ``open()`` on a named pipe
blocks forever, on ``/dev/zero`` reads without end, on a directory fails with an OSError that used
to surface as "no such file" or a traceback; and an unwritable ``--out`` used to be found only
after minutes of generation. Each rule lives here once and every reader/writer calls it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import PathError

ErrorFactory = Callable[[str], Exception]


def _kind(mode: int) -> str:
    """What a non-regular file is, in words a user recognises."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _link_note(path: Path) -> str:
    try:
        return f" (symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
    except OSError:
        return ""


def regular_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a file (None when it can), found by ``os.stat`` alone.

    The symbolic link is followed, because its target is what ``open`` would read; nothing is
    opened, so a pipe or a device is never touched.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if p.is_symlink():
            return f"is a symbolic link to {os.readlink(p)}, which does not exist"
        return "no such file"
    except NotADirectoryError:
        return "no such file (a folder on its path is a file)"
    except PermissionError:
        return "cannot be read (permission denied on its folder)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return f"is {_kind(st.st_mode)}{_link_note(p)}, not a regular file"
    if not os.access(p, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def check_regular_file(path: str | os.PathLike[str], error: ErrorFactory | None = None) -> Path:
    """Refuse ``path`` unless it is a readable regular file; call this before opening any file a
    user named. ``error`` turns the problem text into the caller's own error type (default
    ``PathError("<path>: <problem>")``), so each reader keeps its error class and wording."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise error(problem) if error is not None else PathError(f"{path}: {problem}")
    return Path(path)


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out", label: str | None = None) -> Path:
    """Prove that the output folder ``path`` can be created and written, before any model loads.

    The folders that are missing are created, a probe file is written and removed, and the
    folders created here are removed again: the check leaves nothing behind, and the real writes
    create them when there is something to write. Root ignores permissions, which is fine: the
    probe tests what the process itself can do.
    """
    p = Path(path)
    label = label or f"{flag} {p}"
    if os.path.lexists(p) and not p.is_dir():
        if p.is_file():
            what = "a file"
        elif p.exists():
            what = _kind(os.stat(p).st_mode)
        else:
            what = "a broken symbolic link"
        raise PathError(f"{label}: is {what}, not a folder; give a folder path (it is created if missing)")
    missing: list[Path] = []
    ancestor = p
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PathError(
            f"{label}: lies under {ancestor}, which is {'a file' if ancestor.is_file() else 'not a folder'}; "
            "give a folder path"
        )
    for attempt in range(3):
        try:
            _probe_write(p, missing)
            return p
        except FileNotFoundError:
            # another process (a rank of the same sweep) removed a folder it created for its own probe
            if attempt == 2:
                raise PathError(f"{label}: its folders keep disappearing; choose another folder") from None
        except OSError as exc:
            raise PathError(
                f"{label}: cannot write there ({exc.strerror or exc}); choose a folder you can write to"
            ) from None
    return p


def _probe_write(folder: Path, missing: list[Path]) -> None:
    """Create the ``missing`` folders, write and remove a probe file in ``folder``, and remove the
    folders this call created (one that another process made meanwhile is not ours to remove)."""
    created: list[Path] = []
    try:
        for step in reversed(missing):
            try:
                step.mkdir()
                created.append(step)
            except FileExistsError:
                pass
        fd, probe = tempfile.mkstemp(prefix=".cmlora-write-probe-", dir=folder)
        try:
            os.write(fd, b"cmlora")
        finally:
            os.close(fd)
            os.unlink(probe)
    finally:
        for step in reversed(created):
            try:
                step.rmdir()
            except OSError:
                pass


def check_output_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Prove that the output file ``path`` can be written: not a folder, a pipe or a device, and
    in a folder that ``check_output_dir`` accepts."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise PathError(
            f"{flag} {p}: is {_kind(os.stat(p).st_mode)}{_link_note(p)}; give the path of a file to write"
        )
    check_output_dir(p.parent, label=f"{flag} {p} (folder {p.parent})")
    return p

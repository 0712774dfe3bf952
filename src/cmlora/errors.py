"""The project's own exceptions: each says what was wrong, with the offending value, and what to do."""

from __future__ import annotations


class CmloraError(Exception):
    """Base class, so callers (CLI, web app, sweeps) can tell our clear errors from crashes."""


class LoRAFileError(CmloraError, ValueError):
    """A LoRA file cannot be used; names the file (and the key when one is at fault)."""

    def __init__(self, path: object, message: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        where = f"{self.path}" + (f" (key {key!r})" if key else "")
        super().__init__(f"LoRA file {where}: {message}")


class OptionError(CmloraError, ValueError):
    """A method option or a generation setting is out of range."""


class GenerationError(CmloraError, RuntimeError):
    """A generation ran but its result is not an image (non-finite or saturated): it is never saved."""


class PathError(CmloraError, ValueError):
    """A file or folder the user named is not usable as such: missing, a directory where a file is
    read, a pipe or a device, an output folder that cannot be written. Names the path and what to do."""


class RecordError(CmloraError, ValueError):
    """An image's record cannot be read (no record chunk, not JSON, not a record); names the file."""

"""Every image comes with its record: a PNG text chunk and a JSON sidecar, written atomically.

Reports and sweeps read records, never file names, so a record holds everything needed to
regenerate the image: model, LoRAs (file, sha256, weight, category), method and every option,
prompt, seed, size, steps, guidance, scheduler, dtype, device, versions, and the cost counters.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from .errors import RecordError
from .paths import check_regular_file

RECORD_CHUNK = "cmlora"


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("cmlora", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def json_safe(value):
    """JSON without NaN/Infinity (which strict readers reject) and without tensors or paths."""
    if isinstance(value, Mapping):  # dicts and the core's GenerationRecord
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return [json_safe(v) for v in items]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    return str(value)


def record_json(record: dict) -> str:
    return json.dumps(json_safe(record), indent=1, allow_nan=False)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (power loss right after os.replace)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """Open a new, uniquely named temporary file in ``folder`` with mode 0o666 minus the umask.

    ``tempfile.mkstemp`` always creates 0o600, and ``os.replace`` keeps that mode, so every image,
    report, plot and cache entry came out private whatever the umask said, unlike the files any
    other tool (or ``open()``) makes.  Asking the kernel for 0o666 lets it apply the umask itself,
    with no need to read the process-wide umask (which cannot be read without changing it).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file for {name!r} in {str(folder)!r}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half file.

    The file gets the usual ``0o666 & ~umask`` mode (see :func:`_create_temp`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
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
    _fsync_dir(path.parent)


def png_bytes(image, record: dict) -> bytes:
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(RECORD_CHUNK, record_json(record))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_image(image, record: dict, png_path: Path) -> tuple[Path, Path]:
    """PNG (record in its text chunk) and sidecar JSON; the sidecar is written last, so a PNG
    without sidecar means an interrupted save and is overwritten on the next run."""
    png_path = Path(png_path)
    sidecar = png_path.with_suffix(".json")
    atomic_write_bytes(png_path, png_bytes(image, record))
    atomic_write_bytes(sidecar, (record_json(record) + "\n").encode())
    return png_path, sidecar


def read_record(path: Path) -> dict:
    """Record of an image: from its sidecar (.json) or its PNG text chunk.

    Records are read back by ``plot-trace``, the web app and reports from files a user points at,
    so anything that is not a record (a pipe, another PNG, garbage JSON, a JSON list) is a
    RecordError naming the file, never a traceback.
    """
    path = check_regular_file(path, lambda problem: RecordError(f"{path}: {problem}"))
    if path.suffix.lower() == ".json":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecordError(f"{path}: is not UTF-8 text, so not a cmlora record (JSON sidecar)") from None
    else:
        from PIL import Image

        try:
            with Image.open(path) as image:
                text = image.info.get(RECORD_CHUNK)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise RecordError(
                f"{path}: not a readable image ({type(exc).__name__}: {exc}); give a PNG written by cmlora "
                "or its .json sidecar"
            ) from None
        if text is None:
            raise RecordError(
                f"{path} holds no cmlora record (no '{RECORD_CHUNK}' PNG text chunk): give a PNG written by "
                "cmlora generate or its .json sidecar"
            )
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RecordError(f"{path}: the record is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: the record is a JSON {type(record).__name__}, not an object")
    return record

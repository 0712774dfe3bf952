"""Every image comes with its record: a PNG text chunk and a JSON sidecar, written atomically.

Reports and sweeps read records, never file names, so a record holds everything needed to
regenerate the image: model, LoRAs (file, sha256, weight, category), method and every option,
prompt, seed, size, steps, guidance, scheduler, dtype, device, versions, and the cost counters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from .errors import RecordError
from .files import atomic_write_bytes
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


def png_bytes(image, record: dict | None = None, *, text: str | None = None) -> bytes:
    """The image as PNG with its record in the ``cmlora`` text chunk: the project's one PNG writer.

    ``text`` is the record already serialised, for writers whose chunk format is pinned elsewhere
    (the sweep keeps its compact one-line JSON so that old and new run folders hold the same bytes);
    with neither, the PNG carries no record (comparison sheets).
    """
    import io

    from PIL.PngImagePlugin import PngInfo

    if record is not None:
        if text is not None:
            raise ValueError("give the record or its text, not both")
        text = record_json(record)
    info = None
    if text is not None:
        info = PngInfo()
        info.add_text(RECORD_CHUNK, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_record_text(source) -> str | None:
    """The text of a PNG's ``cmlora`` chunk (``None`` when it has none), from a path or a file object.

    Decoding errors propagate (OSError, ValueError, DecompressionBombError) for the caller to name
    the file in its own terms.
    """
    from PIL import Image

    with Image.open(source) as image:
        return image.info.get(RECORD_CHUNK)


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
            text = png_record_text(path)
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

"""LoRA info files of the ComposLoRA testbed (and users' own files with the same layout).

An info file maps a category to a list of LoRAs, each ``{"id", "name", "trigger": [...], "url"}``.
The ids become file names (``<dir>/<style>/<id>.safetensors``, ``images/<composition>.png``), so
they are checked here, once, before anything touches the disk: an id that could climb out of a
folder or collide with another one is refused with the file and the entry named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cmlora.errors import CmloraError
from cmlora.paths import check_regular_file

CATEGORIES: tuple[str, ...] = ("character", "clothing", "style", "background", "object")
"""Known categories, in composition order (the order of the published info files)."""

TESTBED_STYLES: tuple[str, ...] = ("reality", "anime")
"""Image styles of the packaged ComposLoRA testbed."""

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""What an id may look like: it is used as a file stem, so no separators and no leading dot."""

_DATA_PACKAGE = "cmlora.testbed.data"


class InfoFileError(CmloraError, ValueError):
    """An info or prompts file is malformed; the message names the file and the offending entry."""


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of an info file; frozen so compositions can share entries without copying."""

    id: str
    name: str
    trigger: tuple[str, ...]
    url: str
    category: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for records that must be readable without this package."""
        return {
            "id": self.id,
            "name": self.name,
            "trigger": list(self.trigger),
            "url": self.url,
            "category": self.category,
        }


@dataclass(frozen=True)
class TestbedPrompts:
    """The per-style entry of ``prompts.json``: the base model and the prompts the papers used."""

    __test__ = False  # not a pytest test class, despite the name

    style: str
    base_model: str
    vae: str | None
    prompt: str
    negative_prompt: str


def is_safe_id(value: object) -> bool:
    """True when ``value`` can be used as a file stem without escaping or clashing with tmp files."""
    return (
        isinstance(value, str)
        and bool(SAFE_ID.match(value))
        and ".." not in value
        and not Path(value).is_absolute()
    )


def parse_info(data: object, source: str = "<info>") -> dict[str, tuple[LoraEntry, ...]]:
    """Validate already-decoded info data; ``source`` only names the origin in error messages.

    Keys starting with ``_`` are comments (like ``_about`` in prompts.json) and are skipped. The
    result is in :data:`CATEGORIES` order whatever the order in the file, because composition
    order (and so prompts and ids) must not depend on how a user happened to write the file.
    """
    if not isinstance(data, Mapping):
        raise InfoFileError(
            f"{source}: the top level must be an object mapping category -> list of LoRAs, "
            f"got {type(data).__name__}"
        )
    unknown = [k for k in data if not (isinstance(k, str) and (k.startswith("_") or k in CATEGORIES))]
    if unknown:
        raise InfoFileError(
            f"{source}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown!r}; "
            f"expected some of {list(CATEGORIES)}"
        )
    if "character" not in data:
        raise InfoFileError(f"{source}: no 'character' category; every composition starts with a character")

    result: dict[str, tuple[LoraEntry, ...]] = {}
    seen: dict[str, str] = {}
    for category in CATEGORIES:
        if category not in data:
            continue
        items = data[category]
        if not isinstance(items, list):
            raise InfoFileError(
                f"{source}: category {category!r} must be a list of LoRAs, got {type(items).__name__}"
            )
        entries: list[LoraEntry] = []
        for index, item in enumerate(items):
            entry = _parse_entry(item, f"{source}: {category}[{index}]", category)
            if entry.id in seen:
                raise InfoFileError(
                    f"{source}: {category}[{index}]: duplicate id {entry.id!r} (already used in {seen[entry.id]})"
                )
            seen[entry.id] = f"{category}[{index}]"
            entries.append(entry)
        result[category] = tuple(entries)
    if not result["character"]:
        raise InfoFileError(f"{source}: the 'character' category is empty; every composition needs one")
    return result


def _parse_entry(item: object, where: str, category: str) -> LoraEntry:
    """Check one LoRA entry; ``where`` already names file, category and index for the message."""
    if not isinstance(item, Mapping):
        raise InfoFileError(f"{where}: a LoRA entry must be an object, got {type(item).__name__}")
    label = f"{where} (id {item.get('id')!r})" if "id" in item else where
    for key in ("id", "name", "trigger", "url"):
        if key not in item:
            raise InfoFileError(f"{label}: missing field {key!r}")
    lora_id, name, trigger, url = item["id"], item["name"], item["trigger"], item["url"]
    for key, value in (("id", lora_id), ("name", name), ("url", url)):
        if not isinstance(value, str):
            raise InfoFileError(f"{label}: field {key!r} must be a string, got {type(value).__name__}")
    if not is_safe_id(lora_id):
        raise InfoFileError(
            f"{label}: id {lora_id!r} is not a safe file stem: it must match {SAFE_ID.pattern} "
            "and must not contain '..', '/' or '\\'"
        )
    if not name.strip():
        raise InfoFileError(f"{label}: field 'name' is empty")
    if not isinstance(trigger, list) or not all(isinstance(t, str) for t in trigger):
        raise InfoFileError(f"{label}: field 'trigger' must be a list of strings, got {trigger!r}")
    if any(not t.strip() for t in trigger):
        raise InfoFileError(f"{label}: field 'trigger' holds an empty phrase: {trigger!r}")
    return LoraEntry(id=lora_id, name=name, trigger=tuple(trigger), url=url, category=category)


def load_info(path: str | Path) -> dict[str, tuple[LoraEntry, ...]]:
    """Read and validate an info file (see :func:`parse_info`); errors name ``path``."""
    path = check_regular_file(
        path, lambda problem: InfoFileError(f"{path}: cannot read the info file: {problem}")
    )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InfoFileError(f"{path}: cannot read the info file: {exc}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InfoFileError(f"{path}: not valid JSON: {exc}") from None
    return parse_info(data, str(path))


def _check_style(style: str) -> None:
    if style not in TESTBED_STYLES:
        raise InfoFileError(f"unknown testbed style {style!r}; expected one of {list(TESTBED_STYLES)}")


def _read_packaged(name: str) -> tuple[object, str]:
    """Decoded JSON of a packaged data file, plus a readable origin for error messages."""
    resource = resources.files(_DATA_PACKAGE).joinpath(name)
    return json.loads(resource.read_text(encoding="utf-8")), f"{_DATA_PACKAGE}/{name}"


def load_testbed_info(style: str) -> dict[str, tuple[LoraEntry, ...]]:
    """The packaged ComposLoRA info file of ``style`` ('reality' or 'anime'), validated."""
    _check_style(style)
    data, source = _read_packaged(f"{style}_lora_info.json")
    return parse_info(data, source)


def load_testbed_prompts(style: str) -> TestbedPrompts:
    """The packaged ``prompts.json`` entry of ``style``: base model, VAE, base and negative prompt."""
    _check_style(style)
    data, source = _read_packaged("prompts.json")
    if not isinstance(data, Mapping) or not isinstance(data.get(style), Mapping):
        raise InfoFileError(f"{source}: no object for style {style!r}")
    entry = data[style]
    for key in ("base_model", "prompt", "negative_prompt"):
        if not isinstance(entry.get(key), str):
            raise InfoFileError(f"{source}: {style}.{key} must be a string")
    vae = entry.get("vae")
    if vae is not None and not isinstance(vae, str):
        raise InfoFileError(f"{source}: {style}.vae must be a string or null")
    return TestbedPrompts(
        style=style,
        base_model=entry["base_model"],
        vae=vae,
        prompt=entry["prompt"],
        negative_prompt=entry["negative_prompt"],
    )


def lora_file(lora_dir: str | Path, style: str, entry: LoraEntry | str) -> Path:
    """Where the ComposLoRA zip puts a LoRA: ``<lora_dir>/<style>/<id>.safetensors``.

    The id is re-checked so a hand-made :class:`LoraEntry` cannot point outside ``lora_dir``.
    """
    lora_id = entry.id if isinstance(entry, LoraEntry) else entry
    for label, value in (("style", style), ("id", lora_id)):
        if not is_safe_id(value):
            raise InfoFileError(f"unsafe {label} {value!r} for a LoRA file path")
    return Path(lora_dir) / style / f"{lora_id}.safetensors"

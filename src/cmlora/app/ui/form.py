"""What the page sends, checked and turned into core ``GenerationRequest`` objects (one per method).

Why here: the page's fields are strings, numbers and table rows; the request type judges every
rule of a generation, and this module only adds what a shared server needs on top: caps on
prompt, steps, size, methods and the job's total work (one visitor must not hold the machine for
hours), and the mapping from catalog names to files (the page never sends a path). A record
loaded back (JSON or a cmlora PNG) becomes the same fields, so its image is made again exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ...errors import OptionError
from ...loras import CATEGORIES, LoRA
from ...methods import METHOD_LABELS, accepted_options, reads_profile, split_label
from ...request import GenerationRequest
from .files import MAX_JSON_BYTES, AllowedFiles

#: Table columns of the chosen LoRAs.
LORA_COLUMNS = ("LoRA", "weight", "category", "order")


@dataclass(frozen=True)
class Limits:
    """Caps of one job on a shared server; each refusal names the cap and what to lower."""

    prompt_chars: int = 2000
    loras: int = 8
    methods: int = 4
    steps: int = 200
    side: int = 1024
    #: methods x steps x (pixels / default pixels): 4 methods of 100 steps at the model's size.
    work: float = 400.0
    options_chars: int = 2000


@dataclass(frozen=True)
class ModelDefaults:
    """A model's sensible starting values (the page's defaults)."""

    size: int
    steps: int
    guidance: float
    prompt: str
    negative_prompt: str
    methods: tuple[str, ...] = ("merge", "cmlora-offline")


@dataclass
class Form:
    """The page's fields, as Gradio hands them over."""

    rows: list[list[Any]] = field(default_factory=list)
    prompt: str = ""
    negative_prompt: str = ""
    methods: list[str] = field(default_factory=list)
    seed: Any = 0
    steps: Any = 20
    width: Any = 512
    height: Any = 512
    guidance: Any = 7.5
    lora_scale: Any = 1.0
    profile: str | None = None
    options: str = ""


def _int(label: str, value: Any) -> int:
    """An integer field; a number with a fraction or text is refused with the value shown."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise OptionError(f"{label} must be an integer, got {value!r}") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{label} must be an integer, got {value!r}")
    return value


def _float(label: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise OptionError(f"{label} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OptionError(f"{label} must be a finite number, got {value!r}")
    return float(value)


def chosen_loras(rows: Sequence[Sequence[Any]], files: AllowedFiles, limits: Limits) -> tuple[LoRA, ...]:
    """The table's rows as LoRAs in their ``order`` column's order (ties: table order)."""
    rows = [list(r) for r in rows if r and str(r[0]).strip()]
    if len(rows) > limits.loras:
        raise OptionError(f"{len(rows)} LoRAs chosen; the limit is {limits.loras}: remove some")
    catalog = files.loras()
    ordered: list[tuple[float, int, LoRA]] = []
    for k, row in enumerate(rows):
        row = [*row, None, None, None][:4]
        name = str(row[0]).strip()
        if name not in catalog:
            raise OptionError(
                f"unknown LoRA {name!r}: choose one of {', '.join(catalog) or 'none (upload one)'}"
            )
        entry = catalog[name]
        weight = _float(f"LoRA {name!r}: weight", 1.0 if row[1] in (None, "") else row[1])
        category = (str(row[2]).strip() if row[2] is not None else "") or None
        if category is not None and category not in CATEGORIES:
            raise OptionError(
                f"LoRA {name!r}: unknown category {category!r}; use one of {', '.join(CATEGORIES)}"
            )
        order = k + 1 if row[3] in (None, "") else _float(f"LoRA {name!r}: order", row[3])
        lora = LoRA(entry.file, weight=weight, category=category, name=name, triggers=entry.triggers)
        ordered.append((order, k, lora))
    return tuple(lora for _, _, lora in sorted(ordered, key=lambda t: (t[0], t[1])))


def parse_options(text: str | None, labels: Sequence[str], limits: Limits) -> dict[str, dict[str, Any]]:
    """Method options (JSON object) split per method label; an option no chosen method takes is refused."""
    text = (text or "").strip()
    if len(text) > limits.options_chars:
        raise OptionError(f"method options are {len(text)} characters; the limit is {limits.options_chars}")
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise OptionError(f'method options must be a JSON object such as {{"tau": 3}} ({exc})') from None
    if not isinstance(options, dict):
        raise OptionError(f'method options must be a JSON object such as {{"tau": 3}}, got {text[:80]!r}')
    per_label = {}
    used: set[str] = set()
    for label in labels:
        accepted = set(accepted_options(split_label(label)[0]))
        per_label[label] = {k: v for k, v in options.items() if k in accepted}
        used |= set(per_label[label])
    unused = sorted(set(options) - used)
    if unused:
        raise OptionError(f"method option(s) {unused} apply to none of the chosen methods {list(labels)}")
    return per_label


def build_requests(
    form: Form,
    files: AllowedFiles,
    base: Any,
    defaults: ModelDefaults,
    limits: Limits = Limits(),
) -> list[GenerationRequest]:
    """One checked ``GenerationRequest`` per chosen method, or an ``OptionError`` saying what to fix.

    Everything is judged before any work: the caps here, then every rule of the request type.
    """
    prompt = form.prompt or ""
    if not isinstance(prompt, str) or len(prompt) > limits.prompt_chars:
        raise OptionError(
            f"the prompt is {len(prompt)} characters; the limit is {limits.prompt_chars} "
            "(the text encoder reads the first 77 tokens anyway)"
        )
    negative = form.negative_prompt or ""
    if len(negative) > limits.prompt_chars:
        raise OptionError(
            f"the negative prompt is {len(negative)} characters; the limit is {limits.prompt_chars}"
        )
    labels = list(form.methods or [])
    if not labels:
        raise OptionError("choose at least one method")
    unknown = [label for label in labels if label not in METHOD_LABELS]
    if unknown:
        raise OptionError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_LABELS)}")
    if len(set(labels)) != len(labels):
        raise OptionError(f"method(s) {sorted({m for m in labels if labels.count(m) > 1})} chosen twice")
    if len(labels) > limits.methods:
        raise OptionError(f"{len(labels)} methods chosen; the limit is {limits.methods} per job")
    steps = _int("steps", form.steps)
    if not 1 <= steps <= limits.steps:
        raise OptionError(f"steps must be an integer in [1, {limits.steps}], got {steps}")
    width, height = _int("width", form.width), _int("height", form.height)
    for label, side in (("width", width), ("height", height)):
        if not 8 <= side <= limits.side:
            raise OptionError(f"{label} must be in [8, {limits.side}] pixels, got {side}")
    work = len(labels) * steps * (width * height) / (defaults.size * defaults.size)
    if work > limits.work:
        raise OptionError(
            f"this job is too large: {len(labels)} methods x {steps} steps x {width}x{height} px is "
            f"{work:.0f} method-steps at {defaults.size} px; the limit is {limits.work:.0f}. "
            "Choose fewer methods, steps or pixels."
        )
    seed = _int("seed", form.seed)
    guidance = _float("guidance", form.guidance)
    lora_scale = _float("LoRA scale", form.lora_scale)
    loras = chosen_loras(form.rows, files, limits)
    options = parse_options(form.options, labels, limits)
    profile = (form.profile or "").strip() or None
    if profile is not None:
        profile = str(files.check(profile, "profile file", MAX_JSON_BYTES))
        if not any(reads_profile(*split_label(label)) for label in labels):
            raise OptionError("a profile file sets the LoRA order of cmlora and switch-profiled: choose one")
    template = GenerationRequest(
        loras=loras,
        prompt=prompt,
        method="none",
        negative_prompt=negative or None,
        steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        seeds=(seed,),
        lora_scale=lora_scale,
    )
    requests = []
    for label in labels:
        method, variant = split_label(label)
        chosen = profile if reads_profile(method, variant) else None
        requests.append(
            replace(
                template,
                method=label,  # the label names the variant; the request splits it
                variant=None,
                options=options[label],
                profile=base.profile_for(
                    method, variant, [lora.path for lora in loras], options[label], chosen
                ),
            )
        )
    return requests


# --------------------------------------------------------------------------- records back to the form


def form_from_record(record: Mapping[str, Any], files: AllowedFiles) -> Form:
    """The fields that regenerate a record's image. Method options are the record's effective
    values restricted to the method's inputs; derived values (a switch's order, a cache point) go
    back as the inputs they came from; LoRA files are mapped to this app's catalog."""
    if not isinstance(record, Mapping) or "method" not in record:
        raise OptionError("this is not a cmlora record (no 'method' field)")
    label = record.get("method_label") or (
        f"cmlora-{record.get('variant') or 'offline'}" if record["method"] == "cmlora" else record["method"]
    )
    method, _ = split_label(str(label))
    recorded = dict(record.get("options") or {})
    if isinstance(recorded.get("cache_point"), list) and len(recorded["cache_point"]) == 2:
        recorded["cache_layer"], recorded["cache_block"] = recorded["cache_point"]
    skip = {"order"} | ({"intervals"} if method != "cmlora" else set())
    options = {k: v for k, v in recorded.items() if k in accepted_options(method) and k not in skip}
    rows = []
    for k, lora in enumerate(record.get("loras") or []):
        if not isinstance(lora, Mapping):
            raise OptionError(f"the record's LoRA #{k + 1} is not an object: {lora!r}")
        entry = files.entry_for_file(str(lora.get("file") or ""), lora.get("name"), lora.get("sha256"))
        rows.append([entry.name, lora.get("weight", 1.0), lora.get("category") or "", k + 1])
    return Form(
        rows=rows,
        prompt=record.get("prompt") or "",
        negative_prompt=record.get("negative_prompt") or "",
        methods=[str(label)],
        seed=record.get("seed", 0),
        steps=record.get("steps", 20),
        width=record.get("width"),
        height=record.get("height"),
        guidance=record.get("guidance_scale", 7.5),
        lora_scale=record.get("lora_scale", 1.0),
        options=json.dumps(options) if options else "",
    )


def read_record_upload(path: str | Path) -> dict[str, Any]:
    """A record from an uploaded ``.json`` record or a PNG written by cmlora (its text chunk)."""
    from ...paths import regular_file_problem
    from ...records import RECORD_CHUNK

    path = Path(path)
    problem = regular_file_problem(path)
    if problem is not None:
        raise OptionError(f"{path.name!r} {problem}")
    size = path.stat().st_size
    if size > 64 * MAX_JSON_BYTES:
        raise OptionError(f"{path.name!r} is {size / 1e6:.1f} MB: not an image or record of this app")
    if path.suffix.lower() == ".png":
        from PIL import Image

        try:
            with Image.open(path) as image:
                text = image.info.get(RECORD_CHUNK)
        except Exception as exc:
            raise OptionError(f"{path.name!r} cannot be read as a PNG ({exc})") from None
        if text is None:
            raise OptionError(f"{path.name!r} holds no cmlora record (no '{RECORD_CHUNK}' text chunk)")
    else:
        if size > MAX_JSON_BYTES:
            raise OptionError(f"{path.name!r} is {size / 1e6:.1f} MB; a record is a few kB")
        text = path.read_text(encoding="utf-8", errors="replace")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"{path.name!r}: the record is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise OptionError(f"{path.name!r}: a record is a JSON object, got {type(record).__name__}")
    return record

"""The web app behind ``cmlora ui``: JSON endpoints over ``http.server``, one worker thread.

Why this shape:
- stdlib ``ThreadingHTTPServer``: status polls and downloads are answered while a job runs, and
  no web framework has to be installed next to torch;
- one worker thread and a lock around the pipeline: a diffusers pipeline with our adapter
  wrappers is not re-entrant, so jobs (each one ``Composer`` session, several methods) run in
  order; requests only read snapshots of job state;
- cancel is a flag checked in ``on_step``: raising there unwinds ``Composer``'s context manager,
  which gives the pipeline its original modules back, so a cancelled job leaves nothing behind;
- inputs are checked when the job is posted (``OptionError`` → HTTP 400 with its message), so a
  bad field is reported at once; errors that only a run can find become the job's error.

Endpoints: ``GET /`` (page), ``GET /api/settings``, ``GET /api/loras``, ``POST /api/jobs``,
``GET /api/jobs/<id>``, ``POST /api/jobs/<id>/cancel``, ``GET /api/images/<job>/<k>.png|.json``,
``POST /api/parse-record``.
"""

from __future__ import annotations

import argparse
import base64
import inspect
import io
import ipaddress
import json
import math
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import CmloraError, OptionError
from ..loras import CATEGORIES, LoRA
from ..methods import METHOD_LABELS, reads_profile
from ..methods import split_label as _split_method_label

DEFAULT_PORT = 7860
MAX_BODY = 32 * 1024 * 1024  # a pasted PNG (base64) of a large image fits; anything bigger is a mistake
KEEP_JOBS = 20  # finished jobs whose images stay in memory (the app keeps no files on disk)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_NAME_UNSAFE = str.maketrans({c: "_" for c in " ()[]{}!@#$%^&*+=,;'\"`~<>?|\\/:"})


class _Cancelled(Exception):
    """Raised inside ``on_step`` to stop a generation; private so no caller mistakes it for an error."""


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- input parsing


def _int(body: dict, key: str, default: int) -> int:
    """An integer field; a float with a fraction or text is refused with the value shown."""
    value = body.get(key, default)
    if value is None or value == "":
        value = default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise OptionError(f"{key} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{key} must be an integer, got {value!r}")
    return value


def _float(body: dict, key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None or value == "":
        value = default
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise OptionError(f"{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OptionError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _text(body: dict, key: str, default: str | None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise OptionError(f"{key} must be text, got {type(value).__name__}")
    return value


def split_label(label: object) -> tuple[str, str | None]:
    """A method label (``merge``, ``cmlora-online``...) → (method, variant), exactly as the CLI reads it."""
    if not isinstance(label, str):
        raise OptionError(f"a method must be a label such as 'merge', got {label!r}")
    return _split_method_label(label)


def _accepted_options(method: str) -> set[str]:
    from ..methods import METHODS

    return set(inspect.signature(METHODS[method].__init__).parameters) - {"self", "comp", "variant"}


@dataclass
class JobSpec:
    """A checked request: what the worker runs. Built only by ``WebApp.parse_job``."""

    loras: list[LoRA]
    methods: list[tuple[str, str, str | None]]  # (label, method, variant)
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    width: int
    height: int
    guidance: float
    lora_scale: float
    profile: str | None
    options: dict[str, dict[str, Any]]  # per label


@dataclass
class Job:
    id: str
    spec: JobSpec
    state: str = "queued"  # queued, running, done, cancelled, error
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    files: list[tuple[bytes, str]] = field(default_factory=list)  # (png with record, record json)
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)


# --------------------------------------------------------------------------- the app


class WebApp:
    """Catalog of LoRAs, job queue and worker around one loaded base model.

    Independent of HTTP so tests (and other front ends) can drive it; ``make_server`` puts the
    HTTP handler in front.
    """

    def __init__(
        self,
        base,
        lora_dir: str | Path | None = None,
        allow_partial: bool = False,
        allow_pickle: bool = False,
    ):
        self.base = base
        self.allow_partial = allow_partial
        self.allow_pickle = allow_pickle
        self._demo_dir: Path | None = None
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir is not None else None
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise OptionError(f"--lora-dir {str(self.lora_dir)!r} is not a folder")
        if self.lora_dir is None and not base.lora_ids:
            # The tiny random fallback has no LoRAs of its own: write two demo LoRAs (as `cmlora
            # generate` does) so the app shows composition out of the box.
            from ..tiny import write_random_lora

            self._demo_dir = Path(tempfile.mkdtemp(prefix="cmlora-ui-demo-"))
            for k, category in enumerate(("character", "background")):
                write_random_lora(base.pipe, self._demo_dir / f"demo_{category}.safetensors", seed=k)
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = threading.Lock()
        self._pipe_lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="cmlora-ui-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ catalog

    def catalog(self) -> dict[str, dict[str, Any]]:
        """name → {file, category, triggers}; the folder is re-read each time so new files show up."""
        if self.lora_dir is None and self._demo_dir is None:
            return {
                name: {
                    "file": str(v["file"]),
                    "category": v.get("category"),
                    "triggers": list(v.get("triggers", [])),
                }
                for name, v in sorted(self.base.lora_ids.items())
            }
        folder = self.lora_dir or self._demo_dir
        assert folder is not None
        suffixes = {".safetensors"} | ({".ckpt", ".pt", ".bin", ".pth"} if self.allow_pickle else set())
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.suffix.lower() not in suffixes:
                continue
            name = path.stem.translate(_NAME_UNSAFE).lstrip("_.-") or "lora"
            while name in entries:
                name += "_"
            category = None
            if self._demo_dir is not None:
                category = name.removeprefix("demo_")
            entries[name] = {"file": str(path), "category": category, "triggers": []}
        return entries

    def settings(self) -> dict[str, Any]:
        pipe = self.base.pipe
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        size = int(pipe.unet.config.sample_size) * factor
        return {
            "base": self.base.name,
            "note": self.base.note,
            "base_prompt": self.base.base_prompt,
            "negative_prompt": self.base.negative_prompt or "",
            "methods": list(METHOD_LABELS),
            "categories": list(CATEGORIES),
            "lora_dir": str(self.lora_dir or self._demo_dir or ""),
            "defaults": {
                "seed": 0,
                "steps": 20,
                "width": size,
                "height": size,
                "guidance": self.base.guidance,
                "lora_scale": 1.0,
                "methods": ["merge", "cmlora-offline"],
            },
        }

    # ------------------------------------------------------------------ requests

    def parse_job(self, body: object) -> JobSpec:
        """Check every field of a job request now, so the page can say what is wrong at once."""
        from ..methods import Composition, build_method
        from ..request import GenerationRequest

        if not isinstance(body, dict):
            raise OptionError("the request must be a JSON object")
        catalog = self.catalog()
        loras = [self._lora(item, catalog) for item in self._list(body, "loras")]
        labels = self._list(body, "methods")
        if not labels:
            raise OptionError("choose at least one method")
        methods = [(label, *split_label(label)) for label in labels]
        repeated = sorted({m[0] for m in methods if labels.count(m[0]) > 1})
        if repeated:
            raise OptionError(f"method(s) {repeated} chosen twice")
        steps = _int(body, "steps", 20)
        if not 1 <= steps <= 1000:
            raise OptionError(f"steps must be an integer in [1, 1000], got {steps}")
        default = self.settings()["defaults"]
        width, height = _int(body, "width", default["width"]), _int(body, "height", default["height"])
        seed = _int(body, "seed", 0)
        GenerationRequest(loras=(), method="none", height=height, width=width, seeds=(seed,))
        guidance = _float(body, "guidance", self.base.guidance)
        if guidance < 0:
            raise OptionError(f"guidance must be >= 0, got {guidance}")
        lora_scale = _float(body, "lora_scale", 1.0)
        prompt = _text(body, "prompt", "") or ""
        negative = _text(body, "negative_prompt", None)
        profile = (_text(body, "profile", None) or "").strip() or None
        if profile is not None:
            from ..profiles import ProfileFile

            try:
                ProfileFile.load(profile)  # a missing or malformed file is reported now, by name
            except OSError as exc:  # a folder, no permission...
                raise OptionError(
                    f"profile file {profile!r} cannot be read ({exc.strerror or exc})"
                ) from None
            if not any(reads_profile(m[1], m[2]) for m in methods):
                raise OptionError(
                    "a profile file sets the LoRA order of cmlora and switch-profiled: choose one"
                )
        options = body.get("options") or {}
        if isinstance(options, str):
            try:
                options = json.loads(options) if options.strip() else {}
            except json.JSONDecodeError as exc:
                raise OptionError(f"method options must be a JSON object ({exc})") from None
        if not isinstance(options, dict):
            raise OptionError('method options must be a JSON object such as {"tau": 3}')
        per_label: dict[str, dict[str, Any]] = {}
        used: set[str] = set()
        for label, method, _ in methods:
            accepted = _accepted_options(method)
            per_label[label] = {k: v for k, v in options.items() if k in accepted}
            used |= set(per_label[label])
        unused = sorted(set(options) - used)
        if unused:
            raise OptionError(f"method option(s) {unused} apply to none of the chosen methods {labels}")
        names = [lora.adapter for lora in loras]
        if len(set(names)) != len(names):
            raise OptionError(f"a LoRA is chosen twice: {sorted({n for n in names if names.count(n) > 1})}")
        comp = Composition(
            names=tuple(names),
            weights={lora.adapter: float(lora.weight) for lora in loras},
            categories={lora.adapter: lora.category for lora in loras},
            num_steps=steps,
            lora_scale=lora_scale,
        )
        for label, method, variant in methods:
            if (
                profile is not None
                and reads_profile(method, variant)
                and {"order", "high", "low"} & set(per_label[label])
            ):
                raise OptionError("a profile file conflicts with order/high/low options: give one of them")
            build_method(method, comp, variant, **per_label[label])  # every option checked before any work
        return JobSpec(
            loras,
            methods,
            prompt,
            negative,
            seed,
            steps,
            width,
            height,
            guidance,
            lora_scale,
            profile,
            per_label,
        )

    @staticmethod
    def _list(body: dict, key: str) -> list:
        value = body.get(key) or []
        if not isinstance(value, list):
            raise OptionError(f"{key} must be a list")
        return value

    def _lora(self, item: object, catalog: dict[str, dict[str, Any]]) -> LoRA:
        """A LoRA of the request: a catalog name, or a file path (a record from elsewhere)."""
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise OptionError(f"a LoRA must be an object with a name, got {item!r}")
        name, file = item.get("name") or None, (item.get("file") or "").strip() or None
        weight = _float(item, "weight", 1.0)
        category = item.get("category") or None
        if file is None:
            if name not in catalog:
                where = (
                    f"--lora-dir {self.lora_dir}" if self.lora_dir else f"the {self.base.name} model's LoRAs"
                )
                raise OptionError(
                    f"unknown LoRA {name!r}: not in {where} (available: {', '.join(catalog) or 'none'})"
                )
            known = catalog[name]
            return LoRA(
                known["file"],
                weight=weight,
                category=category or known["category"],
                name=name,
                triggers=tuple(known["triggers"]),
            )
        path = Path(file).expanduser()
        if not path.is_file():
            raise OptionError(f"LoRA file {file!r} does not exist (or is not a file)")
        triggers = item.get("triggers") or ()
        if not isinstance(triggers, list | tuple) or not all(isinstance(t, str) for t in triggers):
            raise OptionError(f"LoRA {name or file!r}: triggers must be a list of text")
        return LoRA(path, weight=weight, category=category, name=name, triggers=tuple(triggers))

    def submit(self, body: object) -> str:
        spec = self.parse_job(body)
        job = Job(uuid.uuid4().hex[:12], spec)
        for label, _, _ in spec.methods:
            job.progress[label] = {"step": 0, "total": spec.steps, "state": "queued"}
        with self._jobs_lock:
            self._jobs[job.id] = job
            self._forget_old_jobs()
        self._queue.put(job.id)
        return job.id

    def _forget_old_jobs(self) -> None:
        """Keep the images of the last KEEP_JOBS finished jobs: memory stays bounded in a long session."""
        finished = sorted(
            (j for j in self._jobs.values() if j.state in ("done", "cancelled", "error")),
            key=lambda j: j.created,
        )
        for job in finished[: max(0, len(finished) - KEEP_JOBS)]:
            del self._jobs[job.id]

    def job(self, job_id: str) -> Job:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise _HttpError(
                HTTPStatus.NOT_FOUND, f"no job {job_id!r} (finished jobs are kept for a while only)"
            )
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        job = self.job(job_id)
        with self._jobs_lock:
            return {
                "id": job.id,
                "state": job.state,
                "methods": [{"label": label, **job.progress[label]} for label, _, _ in job.spec.methods],
                "results": [dict(r) for r in job.results],
                "error": job.error,
            }

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.job(job_id)
        with self._jobs_lock:
            job.cancel.set()
            if job.state == "queued":  # the worker will skip it
                job.state = "cancelled"
                for progress in job.progress.values():
                    progress["state"] = "cancelled"
        return self.status(job_id)

    def file(self, job_id: str, index: int, kind: str) -> bytes:
        job = self.job(job_id)
        with self._jobs_lock:
            if not 0 <= index < len(job.files):
                raise _HttpError(HTTPStatus.NOT_FOUND, f"job {job_id} has no image {index}")
            png, record = job.files[index]
        return png if kind == "png" else record.encode()

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._jobs_lock:
                job = self._jobs.get(job_id)
                if job is None or job.state != "queued":
                    continue
                job.state = "running"
            try:
                with self._pipe_lock:
                    self._run(job)
                state, error = "done", None
            except _Cancelled:
                state, error = "cancelled", None
            except CmloraError as exc:
                state, error = "error", str(exc)
            except Exception as exc:  # the app must keep serving: report, log, go on
                traceback.print_exc(file=sys.stderr)
                state, error = "error", f"internal error ({type(exc).__name__}): {exc}"
            with self._jobs_lock:
                job.state, job.error = state, error
                for progress in job.progress.values():
                    if progress["state"] in ("queued", "running"):
                        progress["state"] = "cancelled" if state == "cancelled" else "stopped"

    def _run(self, job: Job) -> None:
        from ..api import Composer
        from ..records import png_bytes, record_json

        spec = job.spec
        with Composer(
            self.base.pipe, spec.loras, allow_partial=self.allow_partial, allow_pickle=self.allow_pickle
        ) as composer:
            for label, method, variant in spec.methods:
                if job.cancel.is_set():
                    raise _Cancelled

                def on_step(i: int, plan: object, label: str = label) -> None:
                    with self._jobs_lock:
                        job.progress[label]["step"] = i + 1
                    if job.cancel.is_set():
                        raise _Cancelled

                with self._jobs_lock:
                    job.progress[label]["state"] = "running"
                result = composer.generate(
                    prompt=spec.prompt,
                    method=method,
                    variant=variant,
                    negative_prompt=spec.negative_prompt,
                    num_inference_steps=spec.steps,
                    guidance_scale=spec.guidance,
                    height=spec.height,
                    width=spec.width,
                    seed=spec.seed,
                    lora_scale=spec.lora_scale,
                    profile=self.base.profile_for(
                        method,
                        variant,
                        [lora.path for lora in composer.loras],
                        spec.options[label],
                        spec.profile,
                    )
                    if reads_profile(method, variant)
                    else None,
                    progress=False,
                    on_step=on_step,
                    **spec.options[label],
                )
                record = {**result.records[0].as_dict(), "base_model": self.base.name}
                png, text = png_bytes(result.images[0], record), record_json(record)
                with self._jobs_lock:
                    k = len(job.files)
                    job.files.append((png, text))
                    stem = f"cmlora-{job.id}-{k}-{label}-s{spec.seed}"
                    job.results.append(
                        {
                            "method_label": label,
                            "image_url": f"/api/images/{job.id}/{k}.png",
                            "record_url": f"/api/images/{job.id}/{k}.json",
                            "download_name": stem,
                            "full_calls": record["full_calls"],
                            "cached_calls": record["cached_calls"],
                            "seconds": record["seconds"],
                            "macs": record["macs"],
                            "seed": spec.seed,
                            "form": form_from_record(record),
                        }
                    )
                    job.progress[label]["state"] = "done"

    def close(self) -> None:
        """Stop the worker (cancelling a running job) and remove the demo LoRAs."""
        with self._jobs_lock:
            for job in self._jobs.values():
                job.cancel.set()
        self._queue.put(None)
        self._worker.join(timeout=30)
        if self._demo_dir is not None:
            shutil.rmtree(self._demo_dir, ignore_errors=True)


def form_from_record(record: dict) -> dict[str, Any]:
    """The page's form fields from an image record, so pasting a record regenerates its image.

    Method options are the record's effective values restricted to what the method takes as
    input; derived values (a switch's order, a cache point) go back as the inputs they came from.
    """
    if not isinstance(record, dict) or "method" not in record:
        raise OptionError("this is not a cmlora record (no 'method' field)")
    label = record.get("method_label") or (
        f"cmlora-{record.get('variant') or 'offline'}" if record["method"] == "cmlora" else record["method"]
    )
    method, _ = split_label(label)
    recorded = dict(record.get("options") or {})
    if isinstance(recorded.get("cache_point"), list) and len(recorded["cache_point"]) == 2:
        recorded["cache_layer"], recorded["cache_block"] = recorded["cache_point"]
    skip = {"order"} | ({"intervals"} if method != "cmlora" else set())
    options = {k: v for k, v in recorded.items() if k in _accepted_options(method) and k not in skip}
    loras = [
        {
            "name": lora.get("name"),
            "file": lora.get("file"),
            "weight": lora.get("weight", 1.0),
            "category": lora.get("category"),
            "triggers": lora.get("triggers", []),
        }
        for lora in record.get("loras") or []
    ]
    return {
        "loras": loras,
        "methods": [label],
        "prompt": record.get("prompt") or "",
        "negative_prompt": record.get("negative_prompt") or "",
        "seed": record.get("seed", 0),
        "steps": record.get("steps", 20),
        "width": record.get("width"),
        "height": record.get("height"),
        "guidance": record.get("guidance_scale", 7.5),
        "lora_scale": record.get("lora_scale", 1.0),
        "options": options,
    }


def parse_record_request(body: object) -> dict[str, Any]:
    """``{text}`` (a record's JSON) or ``{png_base64}`` (a PNG written by cmlora) → form fields."""
    if not isinstance(body, dict):
        raise OptionError("send {text: ...} or {png_base64: ...}")
    if body.get("png_base64"):
        from PIL import Image

        from ..records import RECORD_CHUNK

        try:
            data = base64.b64decode(str(body["png_base64"]).split(",")[-1], validate=False)
            with Image.open(io.BytesIO(data)) as image:
                text = image.info.get(RECORD_CHUNK)
        except Exception as exc:
            raise OptionError(f"could not read that file as a PNG ({exc})") from None
        if text is None:
            raise OptionError(f"that PNG holds no cmlora record (no '{RECORD_CHUNK}' text chunk)")
    else:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise OptionError("paste a record (the JSON of a cmlora image) first")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"the pasted record is not valid JSON ({exc})") from None
    return form_from_record(record)


def make_app(
    base, lora_dir: str | Path | None = None, allow_partial: bool = False, allow_pickle: bool = False
) -> WebApp:
    """The app around a loaded ``BaseModel`` (``cmlora.models.load_base``)."""
    return WebApp(base, lora_dir, allow_partial=allow_partial, allow_pickle=allow_pickle)


# --------------------------------------------------------------------------- HTTP


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name part of a Host header: ``127.0.0.1:8000`` → ``127.0.0.1``, ``[::1]:8000`` → ``::1``."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def check_host(host: str, allow_remote: bool) -> str | None:
    """Refuse a non-loopback address unless asked: the app runs code on this machine for anyone
    who reaches it and reads files by path. Returns the warning to print when allowed."""
    if is_loopback(host):
        return None
    if not allow_remote:
        raise OptionError(
            f"--host {host!r} is not a loopback address: the app would let anyone who reaches it run "
            "generations and open files by path here. Use --allow-remote to do it anyway."
        )
    return (
        f"WARNING: listening on {host}: anyone who can reach this port can run generations on this "
        "machine and make it read files by path. There is no authentication."
    )


def _make_handler(app: WebApp, loopback_only: bool) -> type[BaseHTTPRequestHandler]:
    from .page import PAGE

    page = PAGE.encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "cmlora-ui"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            """Silent: polling every 300 ms would flood the terminal."""

        # ---------------------------------------------------------- plumbing

        def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload: object) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _body(self) -> object:
            if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                # Forces a CORS preflight on cross-site requests, which we never approve: a web page
                # in the user's browser cannot start jobs here.
                raise _HttpError(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)"
                )
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large")
            try:
                return json.loads(self.rfile.read(length) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _HttpError(HTTPStatus.BAD_REQUEST, f"the request is not valid JSON ({exc})") from None

        def _guarded(self, route) -> None:
            try:
                host = _host_name(self.headers.get("Host") or "")
                if loopback_only and not is_loopback(host):
                    # DNS rebinding: a foreign site's name made to resolve to 127.0.0.1.
                    raise _HttpError(HTTPStatus.FORBIDDEN, f"host {host!r} refused: open http://127.0.0.1/")
                route()
            except _HttpError as exc:
                self._json(exc.status, {"error": str(exc)})
            except CmloraError as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                self._json(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    {"error": f"internal error ({type(exc).__name__}): {str(exc)[:300]}"},
                )

        # ---------------------------------------------------------- routes

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self._guarded(self._get)

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            self._guarded(self._post)

        def _get(self) -> None:
            url = urlsplit(self.path)
            parts = [p for p in url.path.split("/") if p]
            if not parts:
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif parts == ["api", "settings"]:
                self._json(HTTPStatus.OK, app.settings())
            elif parts == ["api", "loras"]:
                self._json(HTTPStatus.OK, {"loras": [{"name": k, **v} for k, v in app.catalog().items()]})
            elif len(parts) == 3 and parts[:2] == ["api", "jobs"]:
                self._json(HTTPStatus.OK, app.status(parts[2]))
            elif len(parts) == 4 and parts[:2] == ["api", "images"]:
                stem, _, kind = parts[3].partition(".")
                if kind not in ("png", "json") or not stem.isdigit():
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"no such file {parts[3]!r}")
                data = app.file(parts[2], int(stem), kind)
                headers = {}
                name = parse_qs(url.query).get("download", [""])[0]
                if name:
                    safe = "".join(c for c in name if c.isalnum() or c in "-_.") or "image"
                    headers["Content-Disposition"] = f'attachment; filename="{safe}.{kind}"'
                self._send(HTTPStatus.OK, data, "image/png" if kind == "png" else "application/json", headers)
            else:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no such page {url.path!r}")

        def _post(self) -> None:
            parts = [p for p in urlsplit(self.path).path.split("/") if p]
            body = self._body()
            if parts == ["api", "jobs"]:
                self._json(HTTPStatus.OK, {"id": app.submit(body)})
            elif len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "cancel":
                self._json(HTTPStatus.OK, app.cancel(parts[2]))
            elif parts == ["api", "parse-record"]:
                self._json(HTTPStatus.OK, {"form": parse_record_request(body)})
            else:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path!r}")

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck browser connection must not keep the process alive on exit
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(
    app: WebApp, host: str = "127.0.0.1", port: int = DEFAULT_PORT, allow_remote: bool = False
) -> ThreadingHTTPServer:
    """Bind (port 0: any free port; read it from ``server.server_address``); call ``serve_forever``."""
    check_host(host, allow_remote)
    cls = _Server6 if ":" in host.strip("[]") else _Server
    try:
        return cls((host.strip("[]"), port), _make_handler(app, loopback_only=is_loopback(host)))
    except OSError as exc:
        raise OptionError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port (0 = any free port)"
        ) from None


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in str(host) else host
    return f"http://{host}:{port}/"


def serve(
    base,
    lora_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    allow_remote: bool = False,
    open_browser: bool = False,
    allow_partial: bool = False,
    allow_pickle: bool = False,
) -> None:
    """Run the app until Ctrl+C; prints the URL (and opens a browser only when asked)."""
    warning = check_host(host, allow_remote)
    if warning:
        print(warning, file=sys.stderr)
    app = make_app(base, lora_dir, allow_partial=allow_partial, allow_pickle=allow_pickle)
    try:
        server = make_server(app, host, port, allow_remote)
    except BaseException:
        app.close()
        raise
    url = server_url(server)
    print(f"cmlora ui: {url}  (model {base.name}; Ctrl+C stops)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    if threading.current_thread() is threading.main_thread():
        # `kill` (and service managers) send SIGTERM: stop as on Ctrl+C, so the demo LoRAs are removed.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("cmlora ui: stopped", file=sys.stderr)
    finally:
        server.server_close()
        app.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- CLI


def cmd_ui(args: argparse.Namespace) -> int:
    from ..models import load_base

    check_host(args.host, args.allow_remote)  # before minutes of model loading
    base = load_base(args.base, args.device, args.dtype, args.config, allow_pickle=args.allow_pickle)
    if base.note:
        print(base.note, file=sys.stderr)
    serve(
        base,
        lora_dir=args.lora_dir,
        host=args.host,
        port=args.port,
        allow_remote=args.allow_remote,
        open_browser=args.open,
        allow_partial=args.allow_partial,
        allow_pickle=args.allow_pickle,
    )
    return 0


def add_ui_subcommand(sub) -> argparse.ArgumentParser:
    """Register ``cmlora ui`` on the CLI's subparsers (``cli.build_parser`` calls this)."""
    ui = sub.add_parser(
        "ui",
        help="local web app: pick LoRAs, compare methods side by side, download images with records",
        description=(
            "Start a local web app on the embedded default model (or --base). Pick LoRAs from --lora-dir "
            "(default: the model's own LoRAs), set weights, categories and order, choose several methods and "
            "see their images side by side with UNet calls (full/cached) and seconds; cancel a running job; "
            "download each PNG (record in its 'cmlora' text chunk) or its JSON record, and paste a record "
            "back to regenerate it. Prints the URL; listens on 127.0.0.1 only unless --allow-remote."
        ),
    )
    ui.add_argument(
        "--base",
        default=None,
        help="base model: a diffusers folder, a .safetensors checkpoint, a hub id, or mini / tiny-sd15 / "
        "tiny-sdxl (default: the embedded mini model)",
    )
    ui.add_argument(
        "--config", default=None, help="local diffusers folder giving a single-file checkpoint's config"
    )
    ui.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    ui.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto (fp16 on CUDA, else fp32)")
    ui.add_argument(
        "--lora-dir",
        default=None,
        metavar="DIR",
        help="folder of LoRA files to choose from (default: the model's LoRAs, or two demo LoRAs)",
    )
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)"
    )
    ui.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (no authentication: anyone reaching the port can use the app)",
    )
    ui.add_argument(
        "--open", action="store_true", help="also open the URL in a web browser (default: print it)"
    )
    ui.add_argument(
        "--allow-partial", action="store_true", help="load LoRAs whose keys partly match no layer (warns)"
    )
    ui.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.pt/.bin LoRA files (pickles can execute code: trusted sources only)",
    )
    ui.set_defaults(func=cmd_ui)
    return ui

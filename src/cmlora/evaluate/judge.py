"""Pairwise multimodal-LLM judge over any OpenAI-compatible chat-completions endpoint.

Implements the published protocol (Zhong et al., CMLoRA): two images of the same composition from
two methods are each scored 0-10 in 0.5 steps on composition quality and image quality.  Both
presentation orders are judged because these judges have a strong position bias; the report pools
the two orders.

Design constraints that shape this module:

* Only the standard library talks HTTP, so the judge works against OpenAI, vLLM, llama.cpp or
  LM Studio servers without adding a client dependency.
* Judging is paid and slow, so every well-formed reply is cached on disk keyed by
  ``sha256(model, prompt, image hashes)`` and every verdict is appended to ``judge.jsonl`` as soon as
  it is known: a re-run costs nothing and an interrupted run resumes.
* A reply that cannot be parsed into valid scores is retried and then recorded as a *failure*,
  never guessed into a score, because a fabricated score would bias win rates silently.
* The API key is a secret: it is only ever placed in the ``Authorization`` header and is scrubbed
  from every message this module produces.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ..paths import check_regular_file
from .runs import (
    JUDGE_FILENAME,
    JsonlAppender,
    ManifestEntry,
    ManifestError,
    atomic_write_text,
    eval_dir,
    read_jsonl,
    read_manifest,
    resolve_image,
)

__all__ = [
    "DIMENSIONS",
    "JUDGE_FILENAME",
    "ChatClient",
    "JudgeAborted",
    "JudgeConfig",
    "JudgeError",
    "JudgeSummary",
    "MalformedReply",
    "ResponseCache",
    "TransportError",
    "build_messages",
    "build_prompt",
    "chat_completions_url",
    "judge_run",
    "parse_scores",
    "redact",
]

logger = logging.getLogger(__name__)

DIMENSIONS = ("composition", "image")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PROMPT_VERSION = "cmlora-judge-v1"

SYSTEM_PROMPT = (
    "You are a meticulous, impartial expert judge of AI-generated images that must combine several "
    "concepts (characters, clothing, styles, backgrounds, objects) into one picture. You follow the "
    "scoring rubric exactly and you never let the order in which images are shown influence you."
)

_RUBRIC = """\
Score EACH image independently from 0 to 10 in steps of 0.5 on two dimensions. Start every score at \
10 and deduct points:

Composition quality (does the image contain the listed elements, correctly and together?):
- deduct 3 points for each element that is missing or wrong;
- deduct 1 point for each missing or wrong feature of an element (e.g. hair colour, an outfit detail, \
a trait of the style, a part of the background or object);
- deduct 1 point if the elements are combined disharmoniously (they do not fit naturally into one \
coherent scene).

Image quality (is the image well made, regardless of the composition?):
- deduct 3 points for each deformity (e.g. malformed hands, faces, limbs, bodies or objects);
- deduct 2 points for problems with texture, lighting or colour;
- deduct 1 point for each minor flaw.

A score never goes below 0. Use the same standard for both images, so that images of equal quality \
receive equal scores.

First write a short analysis of Image 1 and of Image 2 (which elements and features are present or \
missing, which flaws you see). Then finish your reply with exactly one JSON block in this form, with \
numbers, not strings:
```json
{"image_1": {"composition": 0.0, "image": 0.0}, "image_2": {"composition": 0.0, "image": 0.0}}
```"""


class JudgeError(RuntimeError):
    """Base class of judge errors; messages are always free of the API key."""


class MalformedReply(JudgeError):
    """The endpoint answered, but not with two valid score pairs."""


class TransportError(JudgeError):
    """The request failed at the HTTP level; ``fatal`` means retrying other items is pointless."""

    def __init__(self, message: str, status: int | None = None, fatal: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.fatal = fatal


class JudgeAborted(JudgeError):
    """The run stopped early (bad credentials, endpoint down); finished verdicts are kept."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Remove secrets from text destined for logs, records or exceptions."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def chat_completions_url(endpoint: str) -> str:
    """Accept either a base URL (``.../v1``) or the full ``.../chat/completions`` URL."""
    url = endpoint.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must be an http(s) URL, got {endpoint!r}")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class JudgeConfig:
    """Everything about *how* to judge; ``sleep`` is injectable so tests need not wait."""

    endpoint: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_retries: int = 5
    malformed_retries: int = 2
    backoff_base: float = 2.0
    backoff_max: float = 60.0
    retry_after_max: float = 600.0
    max_tokens: int = 1024
    temperature: float = 0.0
    max_consecutive_failures: int = 10
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def api_key(self) -> str | None:
        key = os.environ.get(self.api_key_env, "").strip()
        return key or None


class ChatClient:
    """Minimal chat-completions client with retries; never exposes the key it holds."""

    _RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
    _FATAL_STATUS = frozenset({401, 403, 404, 405})

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.url = chat_completions_url(config.endpoint)
        self._key = config.api_key()
        self.requests_made = 0
        if self._key is None:
            logger.warning(
                "environment variable %s is not set; sending requests without a key", config.api_key_env
            )

    def _redact(self, text: str) -> str:
        return redact(text, [self._key])

    def _backoff(self, attempt: int) -> float:
        return min(self.config.backoff_max, self.config.backoff_base * (2.0**attempt))

    def complete(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """POST the conversation and return the assistant text, retrying transient failures."""
        body = json.dumps(
            {
                "model": self.config.model,
                "messages": list(messages),
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last_error = "no attempt made"
        last_status: int | None = None
        for attempt in range(self.config.max_retries + 1):
            wait: float | None = None
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            self.requests_made += 1
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as resp:
                    payload = resp.read()
                return self._extract_text(payload)
            except urllib.error.HTTPError as exc:
                last_status = exc.code
                detail = self._error_body(exc)
                last_error = f"HTTP {exc.code} from {self.url}: {detail}"
                if exc.code in self._FATAL_STATUS:
                    raise TransportError(self._redact(last_error), status=exc.code, fatal=True) from None
                if exc.code not in self._RETRY_STATUS and exc.code < 500:
                    raise TransportError(self._redact(last_error), status=exc.code) from None
                retry_after = _parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                if retry_after is not None:
                    wait = min(retry_after, self.config.retry_after_max)
            except TimeoutError as exc:
                last_status = None
                last_error = f"timeout after {self.config.timeout:g}s from {self.url} ({type(exc).__name__})"
            except urllib.error.URLError as exc:
                last_status = None
                last_error = f"cannot reach {self.url}: {exc.reason}"
            except (ConnectionError, OSError) as exc:
                last_status = None
                last_error = f"connection error with {self.url}: {type(exc).__name__}: {exc}"
            if attempt >= self.config.max_retries:
                break
            if wait is None:
                wait = self._backoff(attempt)
            logger.warning(
                "%s; retry %d/%d in %.2fs",
                self._redact(last_error),
                attempt + 1,
                self.config.max_retries,
                wait,
            )
            self.config.sleep(wait)
        raise TransportError(
            self._redact(f"giving up after {self.config.max_retries + 1} attempts: {last_error}"),
            status=last_status,
        )

    def _error_body(self, exc: urllib.error.HTTPError) -> str:
        try:
            raw = exc.read()[:500].decode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001 - the body is only decoration for the message
            raw = ""
        return self._redact(" ".join(raw.split()) or exc.reason or "")

    def _extract_text(self, payload: bytes) -> str:
        try:
            data = json.loads(payload.decode("utf-8"))
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            excerpt = payload[:200].decode("utf-8", errors="replace")
            raise MalformedReply(self._redact(f"response is not a chat completion: {excerpt!r}")) from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise MalformedReply("chat completion has no text content")
        return content


# --------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------


def build_prompt(entry: ManifestEntry) -> str:
    """The instruction text for one composition: its elements, then the published rubric."""
    lines = [
        f"Two images were generated for the same composition of {len(entry.loras)} elements, each by a "
        "different method. The composition's elements are (category: name; trigger words):"
    ]
    for i, lora in enumerate(entry.loras, start=1):
        triggers = ", ".join(f'"{t}"' for t in lora.triggers) or "(none)"
        lines.append(f"{i}. {lora.category or 'element'}: {lora.name}; triggers: {triggers}")
    lines.append("")
    lines.append(_RUBRIC)
    return "\n".join(lines)


def _png_bytes(path: Path) -> bytes:
    check_regular_file(path, lambda problem: ManifestError(f"{path}: {problem}"))
    data = path.read_bytes()
    if data.startswith(PNG_SIGNATURE):
        return data
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def build_messages(prompt: str, images_png: Sequence[bytes]) -> list[dict[str, Any]]:
    """Chat messages with the images inline as base64 PNG data URLs (no hosting needed)."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    for i, png in enumerate(images_png, start=1):
        content.append({"type": "text", "text": f"Image {i}:"})
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def cache_key(model: str, prompt: str, image_hashes: Sequence[str]) -> str:
    """Key of a reply in the cache; includes the system prompt version so rubric edits invalidate it."""
    blob = json.dumps(
        {
            "v": _PROMPT_VERSION,
            "model": model,
            "system": SYSTEM_PROMPT,
            "prompt": prompt,
            "images": list(image_hashes),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Reply parsing
# --------------------------------------------------------------------------------------------------

# A score in prose.  A minus sign is kept (so "-1" is rejected as out of range, not read as 1), a hyphen
# only separates when a space follows it, and arithmetic is never cut short: "10 - 3 = 7" is read as its
# result, 7, while "10 - 3" alone (or "7 - 2 missing") matches nothing, so the reply counts as malformed.
_NUM = r"(-?\d+(?:\.\d+)?)(?!\.?\d)(?!\s*[-+*\u2212\u00d7]\s*\d)"
_EXPR = r"(?:\d+(?:\.\d+)?(?:\s*[-+\u2212]\s*\d+(?:\.\d+)?)+\s*=\s*)?"
_SEP = r"\s*(?:score)?\s*(?:[:=]|is|of|-(?=\s)|\u2013|\u2014)?\s*"
_COMP_RE = re.compile(r"composition(?:\s+quality)?" + _SEP + _EXPR + _NUM + r"(?:\s*/\s*10)?", re.IGNORECASE)
_QUAL_RE = re.compile(r"(?:image\s+)?quality" + _SEP + _EXPR + _NUM + r"(?:\s*/\s*10)?", re.IGNORECASE)
_HEAD_RE = re.compile(r"\b(?:image|img)\s*(?:#\s*)?([12])\b", re.IGNORECASE)


def _norm_key(key: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


_IMAGE_KEYS = {"image1": 1, "img1": 1, "1": 1, "first": 1, "image2": 2, "img2": 2, "2": 2, "second": 2}
_COMP_KEYS = {"composition", "compositionquality", "compositionscore", "comp"}
_QUAL_KEYS = {"image", "imagequality", "quality", "imagescore", "imagequalityscore", "qualityscore"}


def _valid_score(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise MalformedReply(f"score {value!r} is not a number")
    if isinstance(value, str):
        text = value.strip().removesuffix("/10").strip()
        try:
            value = float(text)
        except ValueError:
            raise MalformedReply(f"score {value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise MalformedReply(f"score {value!r} is not a number")
    score = float(value)
    if not math.isfinite(score) or score < 0.0 or score > 10.0:
        raise MalformedReply(f"score {value!r} is outside 0-10")
    if abs(score * 2.0 - round(score * 2.0)) > 1e-6:
        raise MalformedReply(f"score {value!r} is not a multiple of 0.5")
    return round(score * 2.0) / 2.0


def _scores_from_obj(obj: Mapping[str, Any]) -> dict[int, dict[str, float]] | None:
    """Scores from one JSON object, or None when it does not look like a verdict at all."""
    if "scores" in obj and isinstance(obj["scores"], dict):
        obj = obj["scores"]
    per_image: dict[int, Mapping[str, Any]] = {}
    for key, value in obj.items():
        idx = _IMAGE_KEYS.get(_norm_key(key))
        if idx is not None and isinstance(value, dict):
            per_image[idx] = value
    if not per_image:
        return None
    if set(per_image) != {1, 2}:
        raise MalformedReply("verdict JSON does not score both images")
    out: dict[int, dict[str, float]] = {}
    for idx, dims in per_image.items():
        comp = [v for k, v in dims.items() if _norm_key(k) in _COMP_KEYS]
        qual = [v for k, v in dims.items() if _norm_key(k) in _QUAL_KEYS]
        if len(comp) != 1 or len(qual) != 1:
            raise MalformedReply(f"verdict JSON for image {idx} needs one composition and one image score")
        out[idx] = {"composition": _valid_score(comp[0]), "image": _valid_score(qual[0])}
    return out


def _json_objects(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    pos = 0
    while True:
        start = text.find("{", pos)
        if start < 0:
            return found
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        pos = end


def _scores_from_text(text: str) -> dict[int, dict[str, float]] | None:
    clean = re.sub(r"[*_`#>]", "", text)
    heads = list(_HEAD_RE.finditer(clean))
    out: dict[int, dict[str, float]] = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(clean)
        segment = clean[head.end() : end]
        comp = _COMP_RE.search(segment)
        if comp is None:
            continue
        # Blank out the composition match so "composition quality 7" is not read as image quality.
        rest = segment[: comp.start()] + " " * (comp.end() - comp.start()) + segment[comp.end() :]
        qual = _QUAL_RE.search(rest)
        if comp and qual:
            # Later segments win: the final summary comes after the analysis.
            out[int(head.group(1))] = {
                "composition": _valid_score(comp.group(1)),
                "image": _valid_score(qual.group(1)),
            }
    if set(out) == {1, 2}:
        return out
    return None


def parse_scores(text: str) -> dict[int, dict[str, float]]:
    """Both images' scores from a judge reply: ``{1: {composition, image}, 2: {...}}``.

    The last JSON verdict wins; without one, "Image 1: composition 7.5, image quality 8" style
    text is accepted.  A verdict with out-of-range or non-0.5-step values is rejected outright rather
    than falling back to prose, since a self-contradicting reply cannot be trusted.
    """
    if not isinstance(text, str) or not text.strip():
        raise MalformedReply("empty reply")
    for obj in reversed(_json_objects(text)):
        parsed = _scores_from_obj(obj)
        if parsed is not None:
            return parsed
    parsed = _scores_from_text(text)
    if parsed is None:
        raise MalformedReply("no scores for both images found in reply")
    return parsed


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


class ResponseCache:
    """Well-formed replies on disk, one small JSON file each, written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        reply = data.get("reply") if isinstance(data, dict) else None
        return reply if isinstance(reply, str) else None

    def put(self, key: str, model: str, reply: str) -> None:
        record = {"key": key, "model": model, "reply": reply, "created": datetime.now(UTC).isoformat()}
        atomic_write_text(self._path(key), json.dumps(record, ensure_ascii=False))


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------


@dataclass
class JudgeSummary:
    """Counts of one judge run, for the CLI to print and tests to check."""

    verdicts: int = 0
    from_cache: int = 0
    failures: int = 0
    skipped_existing: int = 0
    unmatched: int = 0
    requests: int = 0


def _record_key(rec: Mapping[str, Any]) -> tuple[str, int, tuple[str, ...], str]:
    return (
        str(rec.get("composition_id")),
        int(rec.get("seed_index", 0)),
        tuple(rec.get("methods", ())),
        str(rec.get("model")),
    )


def _pair_items(
    entries: Sequence[ManifestEntry], a: str, b: str
) -> tuple[list[tuple[ManifestEntry, ManifestEntry]], int]:
    """Images of methods ``a`` and ``b`` made for the same composition and seed."""
    by_key: dict[str, dict[tuple[str, int], ManifestEntry]] = {a: {}, b: {}}
    for e in entries:
        if e.method in by_key:
            key = (e.composition_id, e.seed_index)
            if key in by_key[e.method]:
                # Two candidates for one slot would make the pairing arbitrary.
                raise ManifestError(
                    f"method {e.method!r} has two images for composition {key[0]!r}, seed_index {key[1]} "
                    f"(lines {by_key[e.method][key].line} and {e.line})"
                )
            by_key[e.method][key] = e
    common = sorted(set(by_key[a]) & set(by_key[b]))
    unmatched = len(set(by_key[a]) ^ set(by_key[b]))
    items = []
    for key in common:
        ea, eb = by_key[a][key], by_key[b][key]
        if [lo.name for lo in ea.loras] != [lo.name for lo in eb.loras]:
            raise ManifestError(
                f"composition {key[0]!r} lists different LoRAs for {a!r} (line {ea.line}) "
                f"and {b!r} (line {eb.line})"
            )
        items.append((ea, eb))
    return items, unmatched


def judge_run(
    run_dir: str | os.PathLike[str],
    methods: Sequence[str],
    config: JudgeConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    retry_failures: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> JudgeSummary:
    """Judge every pair of ``methods`` (all combinations) on every shared composition and seed, in both orders.

    Verdicts go to ``RUN_DIR/eval/judge.jsonl``; items already there (for this judge model) are
    skipped, failures too unless ``retry_failures``.  ``limit`` caps new judgements, which helps to
    try a paid endpoint on a handful of items first.
    """
    methods = list(methods)
    if len(methods) < 2 or len(set(methods)) != len(methods):
        raise ValueError(f"need at least two distinct methods, got {methods!r}")
    entries = read_manifest(run_dir)
    present = {e.method for e in entries}
    absent = [m for m in methods if m not in present]
    if absent:
        raise ManifestError(f"method(s) {absent} not in the manifest; it has {sorted(present)}")
    out_path = eval_dir(run_dir) / JUDGE_FILENAME
    cache = ResponseCache(cache_dir if cache_dir is not None else eval_dir(run_dir) / "judge_cache")
    done: set[tuple[str, int, tuple[str, ...], str]] = set()
    for rec in read_jsonl(out_path):
        # Transport failures (endpoint down, retries exhausted) say nothing about the item: always redo.
        if "scores" in rec or (not retry_failures and rec.get("failure_kind") != "transport"):
            done.add(_record_key(rec))

    work: list[tuple[ManifestEntry, ManifestEntry, tuple[str, str]]] = []
    summary = JudgeSummary()
    for a, b in itertools.combinations(methods, 2):
        items, unmatched = _pair_items(entries, a, b)
        summary.unmatched += unmatched
        if unmatched:
            logger.warning("%d composition/seed(s) have an image from only one of %s, %s", unmatched, a, b)
        for ea, eb in items:
            for first, second in ((ea, eb), (eb, ea)):
                key = (first.composition_id, first.seed_index, (first.method, second.method), config.model)
                if key in done:
                    summary.skipped_existing += 1
                else:
                    work.append((first, second, (a, b)))
    if limit is not None:
        work = work[: max(0, limit)]

    client = ChatClient(config)
    consecutive = 0
    with (
        JsonlAppender(out_path) as sink,
        tqdm(total=len(work), desc=f"judge {config.model}", unit="pair", disable=not progress) as bar,
    ):
        for first, second, pair in work:
            record = _judge_one(run_dir, first, second, pair, config, client, cache)
            if record.get("failure_kind") == "fatal":
                # Bad key / URL / model: not the item's fault, so nothing is recorded for it.
                summary.requests = client.requests_made
                raise JudgeAborted(f"stopping: {record['failure']}")
            sink.write(record)
            bar.update(1)
            if "scores" in record:
                summary.verdicts += 1
                summary.from_cache += int(record.get("cached", False))
                consecutive = 0
            else:
                summary.failures += 1
                consecutive += 1
                logger.warning(
                    "judge failure on %s %s: %s", first.composition_id, record["methods"], record["failure"]
                )
                if consecutive >= config.max_consecutive_failures:
                    summary.requests = client.requests_made
                    raise JudgeAborted(
                        f"stopping after {consecutive} consecutive failures (last: {record['failure']}); "
                        "fix the cause and re-run with --retry-failures"
                    )
    summary.requests = client.requests_made
    return summary


def _judge_one(
    run_dir: str | os.PathLike[str],
    first: ManifestEntry,
    second: ManifestEntry,
    pair: tuple[str, str],
    config: JudgeConfig,
    client: ChatClient,
    cache: ResponseCache,
) -> dict[str, Any]:
    """One verdict record for one presentation order; never raises for item-level problems."""
    shown = [first.method, second.method]
    record: dict[str, Any] = {
        "composition_id": first.composition_id,
        "seed_index": first.seed_index,
        "n": first.n,
        "methods": shown,
        "pair": list(pair),
        "images": [first.image, second.image],
        "model": config.model,
    }
    try:
        pngs = [_png_bytes(resolve_image(run_dir, e.image)) for e in (first, second)]
    except (OSError, ManifestError) as exc:
        record.update(
            failure=client._redact(f"cannot read image: {exc}"), failure_kind="image", raw_reply_sha=None
        )
        return record
    prompt = build_prompt(first)
    hashes = [hashlib.sha256(p).hexdigest() for p in pngs]
    key = cache_key(config.model, prompt, hashes)
    record["cache_key"] = key
    cached = cache.get(key)
    if cached is not None:
        try:
            parsed = parse_scores(cached)
        except MalformedReply:
            cached = None  # corrupted or edited cache entry: ask again
        else:
            return _with_scores(record, shown, parsed, cached, cached_hit=True, attempts=0)
    messages = build_messages(prompt, pngs)
    last_problem = ""
    last_reply: str | None = None
    attempts = 0
    for _ in range(config.malformed_retries + 1):
        attempts += 1
        try:
            reply = client.complete(messages)
        except TransportError as exc:
            if exc.fatal:
                kind = "fatal"
            elif exc.status is not None and exc.status < 500 and exc.status not in ChatClient._RETRY_STATUS:
                kind = "http"
            else:
                kind = "transport"
            record.update(failure=str(exc), failure_kind=kind, raw_reply_sha=None, attempts=attempts)
            return record
        except MalformedReply as exc:
            last_problem, last_reply = str(exc), None
            continue
        try:
            parsed = parse_scores(reply)
        except MalformedReply as exc:
            last_problem, last_reply = str(exc), reply
            continue
        cache.put(key, config.model, reply)
        return _with_scores(record, shown, parsed, reply, cached_hit=False, attempts=attempts)
    excerpt = client._redact(" ".join((last_reply or "").split())[:160])
    record.update(
        failure=client._redact(f"malformed reply after {attempts} attempt(s): {last_problem}")
        + (f" (reply starts {excerpt!r})" if excerpt else ""),
        failure_kind="malformed",
        raw_reply_sha=None if last_reply is None else hashlib.sha256(last_reply.encode("utf-8")).hexdigest(),
        attempts=attempts,
    )
    return record


def _with_scores(
    record: dict[str, Any],
    shown: Sequence[str],
    parsed: Mapping[int, Mapping[str, float]],
    reply: str,
    *,
    cached_hit: bool,
    attempts: int,
) -> dict[str, Any]:
    record["scores"] = {shown[0]: dict(parsed[1]), shown[1]: dict(parsed[2])}
    record["raw_reply_sha"] = hashlib.sha256(reply.encode("utf-8")).hexdigest()
    record["cached"] = cached_hit
    record["attempts"] = attempts
    return record

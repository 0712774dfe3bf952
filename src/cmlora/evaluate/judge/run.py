"""Judging a run: pairing images, asking in both orders, recording every verdict as soon as it is known.

Every verdict is appended to ``judge.jsonl`` at once and every well-formed reply is cached, so an
interrupted run resumes where it stopped and a re-run of a finished one sends no request.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..runs import (
    JUDGE_FILENAME,
    JsonlAppender,
    ManifestEntry,
    ManifestError,
    eval_dir,
    read_jsonl,
    read_manifest,
    resolve_image,
)
from .cache import ResponseCache
from .client import ChatClient, JudgeConfig
from .errors import JudgeAborted, MalformedReply, TransportError
from .prompt import _png_bytes, build_messages, build_prompt, cache_key
from .reply import parse_scores

logger = logging.getLogger(__name__)


@dataclass
class JudgeSummary:
    """Counts of one judge run, for the CLI to print and tests to check."""

    verdicts: int = 0
    from_cache: int = 0
    failures: int = 0
    skipped_existing: int = 0
    unmatched: int = 0
    requests: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)


# What brings each kind of failure back, so the stop message and the CLI can say the right thing:
# transport failures are always judged again, the others only with --retry-failures.
_RETRY_HINTS = {
    "transport": "transport failures (timeouts, connection errors, 5xx after all retries) are judged "
    "again by a plain re-run of the same command",
    "malformed": "malformed replies are asked again only with --retry-failures",
    "http": "rejected requests (HTTP 4xx) are asked again only with --retry-failures, once the cause "
    "(e.g. --max-tokens, --model, image size) is fixed",
    "image": "unreadable images are judged again only with --retry-failures, once the files are fixed",
}


def retry_hint(kinds: Iterable[str]) -> str:
    """How to redo failures of these kinds: a plain re-run for transport failures, else --retry-failures."""
    seen = list(dict.fromkeys(kinds))
    hints = [_RETRY_HINTS.get(k, f"{k} failures are asked again only with --retry-failures") for k in seen]
    return "; ".join(hints)


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
    skipped, failures too unless ``retry_failures`` (transport failures are always judged again).  ``limit`` caps new judgements, which helps to
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
    streak: list[str] = []  # failure kinds of the current run of consecutive failures
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
                streak.clear()
            else:
                kind = str(record.get("failure_kind"))
                summary.failures += 1
                summary.failure_kinds[kind] = summary.failure_kinds.get(kind, 0) + 1
                streak.append(kind)
                logger.warning(
                    "judge failure on %s %s: %s", first.composition_id, record["methods"], record["failure"]
                )
                if len(streak) >= config.max_consecutive_failures:
                    summary.requests = client.requests_made
                    raise JudgeAborted(
                        f"stopping after {len(streak)} consecutive failures (last: {record['failure']}); "
                        f"fix the cause: {retry_hint(streak)}"
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
    """One verdict record for one presentation order; never raises for item-level problems.

    ``attempts`` counts every HTTP request sent for the record (transport retries and malformed
    re-asks alike; 0 for a cache hit), since that is what a paid endpoint bills and rate-limits.
    """
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
    requests_before = client.requests_made
    asks = 0
    for _ in range(config.malformed_retries + 1):
        asks += 1
        try:
            reply = client.complete(messages)
        except TransportError as exc:
            record.update(
                failure=str(exc),
                failure_kind=_transport_kind(exc),
                raw_reply_sha=None,
                attempts=client.requests_made - requests_before,
            )
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
        attempts = client.requests_made - requests_before
        return _with_scores(record, shown, parsed, reply, cached_hit=False, attempts=attempts)
    excerpt = client._redact(" ".join((last_reply or "").split())[:160])
    attempts = client.requests_made - requests_before
    record.update(
        failure=client._redact(
            f"malformed reply after {asks} ask(s) ({attempts} HTTP request(s)): {last_problem}"
        )
        + (f" (reply starts {excerpt!r})" if excerpt else ""),
        failure_kind="malformed",
        raw_reply_sha=None if last_reply is None else hashlib.sha256(last_reply.encode("utf-8")).hexdigest(),
        attempts=attempts,
    )
    return record


def _transport_kind(exc: TransportError) -> str:
    """``fatal`` (stop the run), ``http`` (this request was refused) or ``transport`` (redo on any re-run)."""
    if exc.fatal:
        return "fatal"
    if exc.status is not None and exc.status < 500 and exc.status not in ChatClient._RETRY_STATUS:
        return "http"
    return "transport"


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

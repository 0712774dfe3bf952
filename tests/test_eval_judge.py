"""The pairwise judge against a local chat-completions server started by the test."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cmlora.evaluate.judge import (
    JudgeAborted,
    JudgeConfig,
    MalformedReply,
    _parse_retry_after,
    chat_completions_url,
    judge_run,
    parse_scores,
    retry_hint,
)
from cmlora.evaluate.report import build_report
from cmlora.evaluate.runs import read_jsonl

SECRET = "sk-cmlora-TEST-secret-4f9a1c"
COLOURS = {"switch": (255, 0, 0), "merge": (0, 0, 255), "composite": (0, 255, 0)}
# What the fake judge gives each method: (composition, image quality).
TRUE_SCORES = {"switch": (8.0, 7.5), "merge": (6.0, 7.5), "composite": (9.5, 4.0)}


def _verdict_json(s1: tuple[float, float], s2: tuple[float, float]) -> str:
    verdict = {
        "image_1": {"composition": s1[0], "image": s1[1]},
        "image_2": {"composition": s2[0], "image": s2[1]},
    }
    return "Image 1 shows ... Image 2 shows ...\n```json\n" + json.dumps(verdict) + "\n```"


def _verdict_prose(s1: tuple[float, float], s2: tuple[float, float]) -> str:
    return (
        "**Image 1**: composition {:g}, image quality {:g}\n**Image 2**: composition {:g}, image quality {:g}"
    ).format(*s1, *s2)


@dataclass(frozen=True)
class Trickle:
    """A response body the fake server sends slowly, piece by piece (headers go out at once)."""

    payload: bytes
    chunks: int
    every: float

    def pieces(self) -> list[bytes]:
        step = -(-len(self.payload) // self.chunks)
        return [self.payload[i : i + step] for i in range(0, len(self.payload), step)]


class FakeJudge:
    """Chat-completions server whose behaviour per request is scripted by the test."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[Callable[[dict[str, Any]], tuple[int, dict[str, str], bytes]]] = []
        self.default = self.ok_json
        self.lock = threading.Lock()

    # -- behaviours -------------------------------------------------------------------------------
    @staticmethod
    def shown_methods(body: dict[str, Any]) -> list[str]:
        out = []
        for part in body["messages"][1]["content"]:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                png = base64.b64decode(url.split(",", 1)[1])
                assert png.startswith(b"\x89PNG")
                rgb = Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))
                out.append(next(m for m, c in COLOURS.items() if c == rgb))
        return out

    @staticmethod
    def completion(text: str) -> tuple[int, dict[str, str], bytes]:
        body = {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    def ok_json(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        m1, m2 = self.shown_methods(body)
        return self.completion(_verdict_json(TRUE_SCORES[m1], TRUE_SCORES[m2]))

    def ok_prose(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        m1, m2 = self.shown_methods(body)
        return self.completion(_verdict_prose(TRUE_SCORES[m1], TRUE_SCORES[m2]))

    def malformed(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        return self.completion(
            "I like both images, they are lovely. Image 1 composition: 7.3, image quality 11"
        )

    @staticmethod
    def status(code: int, headers: dict[str, str] | None = None, text: str = "") -> Callable[..., Any]:
        def respond(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
            return code, dict(headers or {}), json.dumps({"error": {"message": text}}).encode()

        return respond

    @staticmethod
    def slow(seconds: float) -> Callable[..., Any]:
        def respond(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
            time.sleep(seconds)
            return 200, {}, b"{}"

        return respond

    def trickle(self, chunks: int, every: float) -> Callable[..., Any]:
        """A good verdict whose body arrives in ``chunks`` pieces, ``every`` seconds apart."""

        def respond(body: dict[str, Any]) -> tuple[int, dict[str, str], Trickle]:
            code, headers, payload = self.ok_json(body)
            return code, headers, Trickle(payload, chunks, every)

        return respond

    # -- plumbing ---------------------------------------------------------------------------------
    def next_action(
        self, body: dict[str, Any], headers: dict[str, str], path: str
    ) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.requests.append({"body": body, "headers": headers, "path": path})
            action = self.script.pop(0) if self.script else self.default
        return action(body)


@pytest.fixture()
def server() -> Iterator[tuple[FakeJudge, str]]:
    fake = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            code, headers, payload = fake.next_action(body, dict(self.headers), self.path)
            try:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                if isinstance(payload, Trickle):
                    self.send_header("Content-Length", str(len(payload.payload)))
                    self.end_headers()
                    for piece in payload.pieces():
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(payload.every)
                    return
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:  # the client gave up (timeout tests)
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _make_run(root: Path, methods: tuple[str, ...] = ("switch", "merge"), compositions: int = 2) -> Path:
    run = root / "run"
    (run / "images").mkdir(parents=True)
    lines = []
    for c in range(compositions):
        n = 2 + c
        loras = [{"name": "Hero", "category": "character", "triggers": ["the hero", "red scarf"]}]
        loras += [
            {"name": f"Thing{k}", "category": "object", "triggers": [f"thing{k}"]} for k in range(n - 1)
        ]
        for m in methods:
            job = f"{m}-c{c}"
            Image.new("RGB", (16, 16), COLOURS[m]).save(run / "images" / f"{job}.png")
            rec = {
                "image": f"images/{job}.png",
                "job_id": job,
                "composition_id": f"comp{c}",
                "n": n,
                "method": m,
                "seed": 111,
                "seed_index": 0,
                "prompt": "p",
                "loras": loras,
                "full_calls": 10,
                "cached_calls": 0,
                "macs": 5,
                "seconds": 1.0,
            }
            lines.append(json.dumps(rec))
    (run / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture()
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMLORA_TEST_KEY", SECRET)


def _config(url: str, sleeps: list[float], **kw: Any) -> JudgeConfig:
    defaults: dict[str, Any] = {
        "endpoint": url,
        "model": "fake-vlm",
        "api_key_env": "CMLORA_TEST_KEY",
        "timeout": 2.0,
        "max_retries": 3,
        "malformed_retries": 1,
        "backoff_base": 0.01,
        "sleep": sleeps.append,
    }
    defaults.update(kw)
    return JudgeConfig(**defaults)


def _assert_no_secret(run: Path, *texts: str) -> None:
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for text in texts:
        assert SECRET not in text


def test_both_orders_scores_and_cache(
    server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = server
    run = _make_run(tmp_path)
    fake.script = [fake.ok_json, fake.ok_prose, fake.ok_json, fake.ok_prose]
    sleeps: list[float] = []
    summary = judge_run(run, ["switch", "merge"], _config(url, sleeps), progress=False)
    assert (summary.verdicts, summary.failures, summary.requests) == (4, 0, 4)
    assert sleeps == []
    req = fake.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert req["body"]["model"] == "fake-vlm" and req["body"]["temperature"] == 0
    prompt = req["body"]["messages"][1]["content"][0]["text"]
    assert 'character: Hero; triggers: "the hero", "red scarf"' in prompt
    assert "3 points" in prompt and "0.5" in prompt

    records = read_jsonl(run / "eval" / "judge.jsonl")
    orders = {(r["composition_id"], tuple(r["methods"])) for r in records}
    assert orders == {(c, o) for c in ("comp0", "comp1") for o in (("switch", "merge"), ("merge", "switch"))}
    for r in records:
        assert r["pair"] == ["switch", "merge"]
        assert r["scores"]["switch"] == {"composition": 8.0, "image": 7.5}
        assert r["scores"]["merge"] == {"composition": 6.0, "image": 7.5}
        assert len(r["raw_reply_sha"]) == 64 and r["model"] == "fake-vlm"
    assert {r["n"] for r in records} == {2, 3}

    # Re-run: everything is already in judge.jsonl -> zero requests.
    again = judge_run(run, ["switch", "merge"], _config(url, sleeps), progress=False)
    assert (again.requests, again.skipped_existing, again.verdicts) == (0, 4, 0)
    # Lost judge.jsonl: the reply cache answers, still zero requests.
    (run / "eval" / "judge.jsonl").unlink()
    cached = judge_run(run, ["switch", "merge"], _config(url, sleeps), progress=False)
    assert (cached.requests, cached.from_cache, cached.verdicts) == (0, 4, 4)
    assert [r["scores"] for r in read_jsonl(run / "eval" / "judge.jsonl")] == [r["scores"] for r in records]
    assert len(fake.requests) == 4
    _assert_no_secret(run, caplog.text)


def test_malformed_retried_then_failure(
    server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None
) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=1)
    # order 1: malformed then good (retry succeeds); order 2: malformed twice -> failure.
    fake.script = [fake.malformed, fake.ok_json, fake.malformed, fake.malformed]
    summary = judge_run(run, ["switch", "merge"], _config(url, [], malformed_retries=1), progress=False)
    assert (summary.verdicts, summary.failures, summary.requests) == (1, 1, 4)
    ok, bad = read_jsonl(run / "eval" / "judge.jsonl")
    assert ok["attempts"] == 2 and "scores" in ok
    assert "scores" not in bad and bad["failure_kind"] == "malformed"
    assert "malformed reply after 2 ask(s) (2 HTTP request(s))" in bad["failure"]
    assert len(bad["raw_reply_sha"]) == 64
    # A failure is not re-asked on a plain re-run, but is with retry_failures; malformed replies are not cached.
    assert judge_run(run, ["switch", "merge"], _config(url, []), progress=False).requests == 0
    fake.script = [fake.ok_json]
    redo = judge_run(run, ["switch", "merge"], _config(url, []), retry_failures=True, progress=False)
    assert (redo.requests, redo.verdicts, redo.skipped_existing) == (1, 1, 1)
    assert "scores" in read_jsonl(run / "eval" / "judge.jsonl")[-1]


def test_retries_timeout_429_500(
    server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=1)
    fake.script = [
        fake.slow(2.0),  # times out (client timeout 0.5 s)
        fake.status(429, {"Retry-After": "7"}, "slow down"),
        fake.ok_json,
        fake.status(500, text=f"internal error, your key {SECRET} is fine"),
        fake.status(503),
        fake.ok_prose,
    ]
    sleeps: list[float] = []
    caplog.set_level(logging.WARNING)
    summary = judge_run(
        run, ["switch", "merge"], _config(url, sleeps, timeout=0.5, backoff_base=0.01), progress=False
    )
    assert (summary.verdicts, summary.failures, summary.requests) == (2, 0, 6)
    # timeout -> exponential backoff 0.01; 429 -> Retry-After honoured; 500, 503 -> 0.01, 0.02
    assert sleeps == pytest.approx([0.01, 7.0, 0.01, 0.02])
    assert "timeout" in caplog.text and "HTTP 429" in caplog.text and "HTTP 500" in caplog.text
    _assert_no_secret(run, caplog.text)


def test_timeout_is_a_total_deadline_per_request(
    server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None
) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=1)
    # Each piece comes 0.2 s after the last, well inside a 0.5 s socket timeout, but the body takes 2 s.
    fake.script = [fake.trickle(chunks=10, every=0.2)]
    config = _config(url, [], timeout=0.5, max_retries=0, malformed_retries=0)
    start = time.monotonic()
    summary = judge_run(run, ["switch", "merge"], config, limit=1, progress=False)
    elapsed = time.monotonic() - start
    assert (summary.verdicts, summary.failures, summary.requests) == (0, 1, 1)
    (record,) = read_jsonl(run / "eval" / "judge.jsonl")
    assert record["failure_kind"] == "transport" and "timeout" in record["failure"], record
    assert "within 0.5s" in record["failure"]
    assert elapsed < 1.5, elapsed
    # A reply in several pieces that all arrive before the deadline is read whole.
    fake.script = [fake.trickle(chunks=3, every=0.05)]
    again = judge_run(run, ["switch", "merge"], config, limit=1, progress=False)
    assert (again.verdicts, again.failures) == (1, 0)
    assert read_jsonl(run / "eval" / "judge.jsonl")[-1]["scores"]["switch"] == {
        "composition": 8.0,
        "image": 7.5,
    }


def test_attempts_count_http_retries(server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=1)
    # order 1: 503, then a verdict; order 2: a malformed reply, then 502, then a verdict.
    fake.script = [fake.status(503), fake.ok_json, fake.malformed, fake.status(502), fake.ok_json]
    summary = judge_run(run, ["switch", "merge"], _config(url, [], malformed_retries=1), progress=False)
    assert (summary.verdicts, summary.failures, summary.requests) == (2, 0, 5)
    assert [r["attempts"] for r in read_jsonl(run / "eval" / "judge.jsonl")] == [2, 3]
    # A transport failure records every request it took, too.
    (run / "eval" / "judge.jsonl").unlink()
    fake.default = fake.status(502)
    config = _config(url, [], max_retries=2, malformed_retries=0, backoff_base=0.001)
    judge_run(run, ["switch", "merge"], config, cache_dir=tmp_path / "empty_cache", limit=1, progress=False)
    (record,) = read_jsonl(run / "eval" / "judge.jsonl")
    assert (record["failure_kind"], record["attempts"]) == ("transport", 3)


def test_stop_message_says_how_to_redo_each_failure_kind(
    server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None
) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=2)
    fake.default = fake.status(502)
    config = _config(url, [], max_retries=0, malformed_retries=0, max_consecutive_failures=2)
    with pytest.raises(JudgeAborted) as info:
        judge_run(run, ["switch", "merge"], config, progress=False)
    # Transport failures are redone by any re-run: suggesting --retry-failures would mislead.
    assert "plain re-run" in str(info.value) and "--retry-failures" not in str(info.value)
    fake.default = fake.malformed
    with pytest.raises(JudgeAborted) as info:
        judge_run(run, ["switch", "merge"], config, progress=False)
    assert "--retry-failures" in str(info.value) and "plain re-run" not in str(info.value)
    assert "plain re-run" in retry_hint(["malformed", "transport"])
    assert "--retry-failures" in retry_hint(["http"]) and "--retry-failures" in retry_hint(["image"])


def test_one_failed_order_is_half_judged_in_report(
    server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None
) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=1)
    fake.script = [fake.ok_json, fake.malformed]  # (switch, merge) judged; (merge, switch) malformed
    summary = judge_run(run, ["switch", "merge"], _config(url, [], malformed_retries=0), progress=False)
    assert (summary.verdicts, summary.failures) == (1, 1)
    rows = [r for r in build_report(run).judge if r.n == 2]
    assert {r.dimension for r in rows} == {"composition", "image"}
    for row in rows:
        assert (row.judged, row.failures, row.half_judged) == (0, 1, 1), row
    # Judging the failed order again completes the item: both orders count.
    fake.script = [fake.ok_json]
    judge_run(run, ["switch", "merge"], _config(url, []), retry_failures=True, progress=False)
    for row in (r for r in build_report(run).judge if r.n == 2):
        assert (row.judged, row.failures, row.half_judged) == (2, 0, 0), row
    (comp,) = [r for r in build_report(run).judge if r.n == 2 and r.dimension == "composition"]
    assert comp.wins == 2  # switch (8.0) beats merge (6.0) in both orders


def test_exhausted_retries_recorded_and_redone(
    server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None
) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=1)
    fake.default = fake.status(502, text=f"bad gateway {SECRET}")
    summary = judge_run(run, ["switch", "merge"], _config(url, [], max_retries=1), progress=False)
    assert (summary.verdicts, summary.failures, summary.requests) == (0, 2, 4)
    records = read_jsonl(run / "eval" / "judge.jsonl")
    assert all(r["failure_kind"] == "transport" and "HTTP 502" in r["failure"] for r in records)
    assert all("***" in r["failure"] for r in records)
    _assert_no_secret(run)
    # Transport failures say nothing about the items: a plain re-run asks again.
    fake.default = fake.ok_json
    redo = judge_run(run, ["switch", "merge"], _config(url, []), progress=False)
    assert (redo.requests, redo.verdicts) == (2, 2)


def test_fatal_status_aborts_without_recording_or_leaking(
    server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=1)
    fake.default = fake.status(401, text=f"Incorrect API key provided: {SECRET}")
    with pytest.raises(JudgeAborted) as info:
        judge_run(run, ["switch", "merge"], _config(url, []), progress=False)
    assert "HTTP 401" in str(info.value)
    assert len(fake.requests) == 1
    assert read_jsonl(run / "eval" / "judge.jsonl") == []
    _assert_no_secret(run, str(info.value), repr(info.value), caplog.text)
    assert info.value.__cause__ is None


def test_consecutive_failures_abort(server: tuple[FakeJudge, str], tmp_path: Path, secret_env: None) -> None:
    fake, url = server
    run = _make_run(tmp_path, compositions=2)
    fake.default = fake.malformed
    with pytest.raises(JudgeAborted, match="2 consecutive"):
        judge_run(
            run,
            ["switch", "merge"],
            _config(url, [], malformed_retries=0, max_consecutive_failures=2),
            progress=False,
        )
    assert len(read_jsonl(run / "eval" / "judge.jsonl")) == 2


def test_three_methods_all_pairs_and_limit(server: tuple[FakeJudge, str], tmp_path: Path) -> None:
    fake, url = server
    run = _make_run(tmp_path, methods=("switch", "merge", "composite"), compositions=1)
    summary = judge_run(run, ["merge", "switch", "composite"], _config(url, []), limit=5, progress=False)
    assert summary.requests == 5
    rest = judge_run(run, ["merge", "switch", "composite"], _config(url, []), progress=False)
    assert (rest.requests, rest.skipped_existing) == (1, 5)
    pairs = {tuple(r["pair"]) for r in read_jsonl(run / "eval" / "judge.jsonl")}
    assert pairs == {("merge", "switch"), ("merge", "composite"), ("switch", "composite")}
    assert "Authorization" not in fake.requests[0]["headers"]  # env var unset: no key sent


# -- parser ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        _verdict_json((7.5, 8.0), (3.0, 10.0)),
        "Image 1: composition 7.5, image quality 8\nImage 2: composition 3, image quality 10",
        "Image 1 - Composition Quality: 7.5/10, Image Quality: 8/10.\nImage 2 - Composition Quality: 3/10, "
        "Image Quality: 10/10.",
        '{"Image 1": {"composition_quality": "7.5", "image_quality": 8}, "Image 2": '
        '{"composition_quality": 3, "image_quality": 10.0}}',
        'analysis {"scores": {"image1": {"composition": 7.5, "image": 8}, "image2": {"composition": 3, "image": 10}}}',
        # Earlier prose is superseded by the final JSON block.
        "Image 1: composition 1, image quality 1\n" + _verdict_json((7.5, 8.0), (3.0, 10.0)),
        # Deductions spelled out: the result after "=" is the score, not the 10 it starts from.
        "Image 1: composition quality: 10 - 3 + 0.5 = 7.5, image quality - 8.\n"
        "Image 2: composition quality: 10 - 3 - 3 - 1 = 3, image quality: 10",
    ],
)
def test_parse_scores_accepts(text: str) -> None:
    assert parse_scores(text) == {
        1: {"composition": 7.5, "image": 8.0},
        2: {"composition": 3.0, "image": 10.0},
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Both are nice.",
        _verdict_json((7.3, 8.0), (3.0, 10.0)),  # not a 0.5 step
        _verdict_json((10.5, 8.0), (3.0, 10.0)),  # out of range
        '{"image_1": {"composition": 7, "image": 8}}',  # only one image
        '{"image_1": {"composition": true, "image": 8}, "image_2": {"composition": 3, "image": 1}}',
        "Image 1: composition 7.5, image quality 8",  # image 2 missing
        "Image 1: composition 7.5, image quality 8\nImage 2: composition -1, image quality 12",
        # A negative score is out of range, not a "1" after a dash.
        "Image 1: composition 7.5, image quality 8\nImage 2: composition -1, image quality 10",
        # Arithmetic without a result cannot be read as its first term.
        "Image 1: composition: 10 - 3, image quality 8\nImage 2: composition 3, image quality 10",
        "Image 1: composition 7.5, image quality 8 - 2 flaws\nImage 2: composition 3, image quality 10",
    ],
)
def test_parse_scores_rejects(text: str) -> None:
    with pytest.raises(MalformedReply):
        parse_scores(text)


def test_url_and_retry_after() -> None:
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    with pytest.raises(ValueError):
        chat_completions_url("h/v1")
    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 10) == pytest.approx(10.0)
    assert _parse_retry_after("soon") is None

"""The HTTP side of the judge: a chat-completions client with retries and a total deadline.

Only the standard library talks HTTP, so the judge works against OpenAI, vLLM, llama.cpp or
LM Studio servers without adding a client dependency. The API key is a secret: it is only ever
placed in the ``Authorization`` header and is scrubbed from every message this module produces.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from .errors import MalformedReply, TransportError

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------------
# A total deadline per request
# --------------------------------------------------------------------------------------------------
#
# ``urlopen(timeout=...)`` bounds each socket operation, not the request: a server that trickles its
# reply one chunk at a time restarts the clock on every chunk and can hold a request for ever.  The
# classes below keep urllib (proxies from the environment, TLS defaults, HTTPError handling) and only
# change the connection it opens: connecting gets the time left, and every read of the status line,
# headers and body waits at most the time left before one monotonic deadline.


def _time_left(deadline: float) -> float:
    """Seconds before ``deadline`` (monotonic clock); TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("request deadline passed")
    return left


class _DeadlineReader(io.RawIOBase):
    """A socket's read side that never waits past ``deadline``, whatever the server's pace."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        # makefile() holds a reference, so the socket stays open after the connection hands it over.
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_time_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """HTTPResponse whose every read (status line, headers, body) is bounded by one deadline."""

    def __init__(self, sock: socket.socket, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain buffered file the base class made; replaced by a deadline-aware one
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))


class _DeadlineConnectionMixin:
    """Connect within the time left and answer with a :class:`_DeadlineResponse`."""

    timeout: float | None

    def __init__(self, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)

    def connect(self) -> None:
        self.timeout = _time_left(self._deadline)  # also bounds the TLS handshake and sending
        super().connect()  # type: ignore[misc]


class _DeadlineHTTPConnection(_DeadlineConnectionMixin, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnectionMixin, http.client.HTTPSConnection):
    pass


class _DeadlineHandlerMixin:
    """urllib handler opening deadline-bound connections; urllib's own arguments pass through."""

    connection_class: type

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        del http_class  # replaced by the deadline-bound flavour of the same connection
        factory = functools.partial(self.connection_class, deadline=self._deadline)
        return super().do_open(factory, req, **kwargs)  # type: ignore[misc]


class _DeadlineHTTPHandler(_DeadlineHandlerMixin, urllib.request.HTTPHandler):
    connection_class = _DeadlineHTTPConnection


class _DeadlineHTTPSHandler(_DeadlineHandlerMixin, urllib.request.HTTPSHandler):
    connection_class = _DeadlineHTTPSConnection


def _post_with_deadline(request: urllib.request.Request, timeout: float) -> bytes:
    """POST ``request`` and return the whole body, or raise TimeoutError after ``timeout`` seconds in total.

    HTTP errors surface as ``urllib.error.HTTPError`` exactly as with ``urlopen``.
    """
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline))
    with opener.open(request, timeout=timeout) as resp:
        return resp.read()


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
                payload = _post_with_deadline(request, self.config.timeout)
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
            except TimeoutError:
                last_status = None
                last_error = f"timeout: no complete reply within {self.config.timeout:g}s from {self.url}"
            except urllib.error.URLError as exc:
                last_status = None
                if isinstance(exc.reason, TimeoutError):
                    last_error = (
                        f"timeout: cannot connect or send to {self.url} within {self.config.timeout:g}s"
                    )
                else:
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

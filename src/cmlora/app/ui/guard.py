"""The HTTP guard in front of the web app: which requests reach Gradio at all.

Why a middleware of our own: Gradio answers any Host header and any simple cross-site POST, and
reads request bodies of any size. The app runs generations and reads files on this machine, so:

- a Host header that is not one of this server's names is refused (DNS rebinding: a foreign site
  whose name is made to resolve to 127.0.0.1 would otherwise be same-origin with the app);
- a request from another site (``Origin`` naming another host, or ``Sec-Fetch-Site: cross-site``)
  is refused, so a page the user visits cannot start jobs here;
- a body larger than its route's cap is refused from its ``Content-Length`` before it is read; a
  body without one (chunked) is read here up to the cap and refused past it (an upload must say
  its length), so memory stays bounded whatever a client sends; a malformed length is a 400;
- every answer says it must not be framed (clickjacking) nor sniffed.

Plain ASGI, no Gradio import: tests drive it on a tiny app, and it sits in front of any framework.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ...errors import OptionError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Names every loopback server answers to.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: A form submission (JSON of the inputs) is small; a large body is a mistake or an attack.
MAX_BODY = 2 * 1024 * 1024
#: Routes that take file uploads (a LoRA, a PNG with its record) get their own, larger cap.
UPLOAD_PATHS = ("/gradio_api/upload",)
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header: ``127.0.0.1:8000`` -> ``127.0.0.1``, ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def check_bind(host: str, allow_remote: bool, has_auth: bool) -> str | None:
    """Refuse a non-loopback address unless asked for and protected by a password.

    Returns the warning to print when a remote address is allowed. Called before the model loads,
    so a refused command line costs nothing.
    """
    if is_loopback(host):
        return None
    if not allow_remote:
        raise OptionError(
            f"--host {host!r} is not a loopback address: anyone who reaches it could run generations "
            "on this machine. Add --allow-remote and --auth-file FILE to do it anyway."
        )
    if not has_auth:
        raise OptionError(
            f"--allow-remote (--host {host!r}) needs --auth-file FILE (lines user:password): the app "
            "asks every visitor to log in before anything runs"
        )
    return (
        f"WARNING: listening on {host}: anyone who can reach this port and knows a password from the "
        "auth file can run generations on this machine. Prefer an SSH tunnel to 127.0.0.1."
    )


def server_names(host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names the server answers to: loopback always; when bound to another address, that
    address, this machine's names and addresses, and the names the user listed (``--public-name``)."""
    names = set(LOOPBACK_NAMES) | {n.strip().lower() for n in extra if n.strip()}
    bound = host.strip("[]").lower()
    if not is_loopback(bound):
        if bound not in ("0.0.0.0", "::", ""):
            names.add(bound)
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            try:
                names |= {info[4][0].lower() for info in socket.getaddrinfo(name, None)}
            except OSError:
                pass
    return frozenset(names)


class RequestGuard:
    """ASGI middleware applying the rules of this module; see the module docstring for why."""

    def __init__(
        self,
        app: ASGIApp,
        names: Iterable[str] = LOOPBACK_NAMES,
        max_body: int = MAX_BODY,
        max_upload: int = 512 * 1024 * 1024,
    ) -> None:
        self.app = app
        self.names = frozenset(n.lower() for n in names)
        self.max_body = max_body
        self.max_upload = max_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = self._refusal(scope, headers)
        if problem is not None:
            await _refuse(scope, send, *problem)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        upload = scope.get("path", "").startswith(UPLOAD_PATHS)
        cap = self.max_upload if upload else self.max_body
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _refuse(scope, send, 400, f"Content-Length {length[:40]!r} is not a byte count")
                return
            if int(length) > cap:
                await _refuse(scope, send, 413, _too_large(int(length), cap))
                return
        elif scope.get("method") in ("POST", "PUT", "PATCH"):
            if upload:
                await _refuse(scope, send, 411, "an upload must say its Content-Length")
                return
            # A chunked body: read it here up to the cap, so the app never sees more than that.
            buffered = await _read_capped(receive, cap)
            if buffered is None:
                await _refuse(scope, send, 413, _too_large(None, cap))
                return
            receive = _replay(buffered, receive)

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, secured)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, message) when the request must not reach the app, else None."""
        host = host_name(headers.get("host", ""))
        if host not in self.names:
            # DNS rebinding: a foreign site's name made to resolve to this server.
            return (
                403,
                f"host {host!r} refused: open the app at http://127.0.0.1 (or a name it was started for)",
            )
        origin = headers.get("origin")
        if origin is not None and origin != "null":
            origin_host = host_name(origin.partition("://")[2].partition("/")[0])
            if origin_host not in self.names or _port(origin) != _port_of_host(
                headers.get("host", ""), scope
            ):
                return 403, f"cross-origin request from {origin[:100]!r} refused"
        if origin == "null" or headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-site request refused: use the app's own page"
        return None


def _port(origin: str) -> int:
    scheme, _, rest = origin.partition("://")
    hostport = rest.partition("/")[0]
    tail = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    if ":" in tail:
        try:
            return int(tail.rpartition(":")[2])
        except ValueError:
            return -1
    return 443 if scheme in ("https", "wss") else 80


def _port_of_host(host: str, scope: Scope) -> int:
    tail = host.rpartition("]")[2] if host.startswith("[") else host
    if ":" in tail:
        try:
            return int(tail.rpartition(":")[2])
        except ValueError:
            return -1
    return 443 if scope.get("scheme") in ("https", "wss") else 80


def _too_large(size: int | None, cap: int) -> str:
    got = f"{size / 1e6:.1f} MB" if size is not None else "more"
    return f"request body too large ({got}; the limit is {cap / 1e6:.1f} MB)"


async def _read_capped(receive: Receive, cap: int) -> list[Message] | None:
    """The body messages of a request without Content-Length, or None once they pass ``cap``."""
    messages, seen = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return [message]
        seen += len(message.get("body", b""))
        if seen > cap:
            return None
        messages.append(message)
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body back, then the connection's later messages."""
    pending = list(messages)

    async def wrapped() -> Message:
        return pending.pop(0) if pending else await receive()

    return wrapped


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

"""Judge errors; every message is free of the API key (see :func:`.client.redact`)."""

from __future__ import annotations


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

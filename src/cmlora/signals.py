"""Stopping on a signal the way Ctrl-C stops: the one signal helper of the project.

``kill`` and a cluster's pre-emption send SIGTERM, whose default action ends the process on the spot,
so ``finally`` blocks never run: temporary files stay behind and a sweep cannot tell a cut commit
from a whole one. Raising :class:`KeyboardInterrupt` instead unwinds like Ctrl-C, and every
front-end already knows what to do with that (clean up, say how to resume, exit 130).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class InterruptOnSignals:
    """Context manager: while inside, ``signals`` raise KeyboardInterrupt; on leaving, the previous
    handlers come back.

    Python only lets the main thread install handlers, so elsewhere (a web request thread, a test
    runner's worker) this does nothing and the process keeps its handlers.

    :meth:`deferred` holds the signals off around a few writes that must be all-or-nothing (the
    sweep's png, record and manifest line): a signal that arrives inside is raised on leaving it.
    SIGKILL and power loss cannot be held off; the callers' resume logic covers those.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.signals = tuple(signals)
        self._deferring = False
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> InterruptOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None: the handler was installed outside Python; SIG_DFL is the nearest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    @property
    def active(self) -> bool:
        """Whether this guard's handlers are installed (False outside the main thread)."""
        return bool(self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self._deferring:
            self._pending = signum
            return
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def sigterm_as_interrupt() -> InterruptOnSignals:
    """SIGTERM unwinds like Ctrl-C inside the ``with`` block (what a command-line front-end wants)."""
    return InterruptOnSignals((signal.SIGTERM,))


__all__ = ["InterruptOnSignals", "sigterm_as_interrupt"]

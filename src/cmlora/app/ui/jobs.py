"""Jobs of the web app: one worker thread runs them in order; each belongs to a browser session.

Why not run inside Gradio's event: a Gradio generator stops being iterated when its page goes
away (a reload), which would leave a ``Composer`` half-open on the pipeline and the job orphaned.
Here a job is owned by the session's token (kept in the browser), so a reloaded page finds its
running job, follows or cancels it, and finds its finished images in the session's history.

- cancel is a flag checked in ``on_step``: raising there unwinds ``Composer``'s context manager,
  which gives the pipeline its original modules back;
- at most one job per session waits or runs, and at most ``max_pending`` in all;
- history is bounded: ``history_size`` images per session, ``max_sessions`` sessions (least
  recently used go first, their files removed), so a long-running server's disk stays bounded.
"""

from __future__ import annotations

import itertools
import queue
import re
import secrets
import shutil
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CmloraError, OptionError
from ...request import GenerationRecord, GenerationRequest

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def new_token() -> str:
    """A session token: unguessable, so one visitor cannot read or cancel another's jobs."""
    return secrets.token_urlsafe(18)


def valid_token(token: object) -> bool:
    return isinstance(token, str) and bool(_TOKEN.match(token))


class _Cancelled(Exception):
    """Raised inside ``on_step`` to stop a generation; private so no caller mistakes it for an error."""


@dataclass
class MethodProgress:
    label: str
    total: int
    step: int = 0
    state: str = "queued"  # queued, running, done, cancelled, stopped
    started: float | None = None
    finished: float | None = None

    def elapsed(self, now: float) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or now) - self.started

    def eta(self, now: float) -> float | None:
        """Seconds left at the rate of the steps so far (None before the first step)."""
        if self.state != "running" or self.step == 0:
            return None
        return self.elapsed(now) / self.step * (self.total - self.step)


@dataclass(frozen=True)
class Result:
    """One finished image: its PNG (record inside), the record, and where in history it sits."""

    label: str
    png: Path
    record: GenerationRecord
    job: int

    @property
    def caption(self) -> str:
        r = self.record
        return f"{r['method_label']} · seed {r['seed']} · {r['steps']} steps"


@dataclass
class Job:
    id: int
    token: str
    requests: list[GenerationRequest]
    progress: list[MethodProgress]
    state: str = "queued"  # queued, running, done, cancelled, error
    results: list[Result] = field(default_factory=list)
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None

    @property
    def finished_state(self) -> bool:
        return self.state in ("done", "cancelled", "error")


class Runner:
    """The job queue and worker around one loaded ``BaseModel``."""

    def __init__(
        self,
        base: Any,
        work_dir: Path,
        allow_partial: bool = False,
        allow_pickle: bool = False,
        max_pending: int = 8,
        history_size: int = 48,
        max_sessions: int = 64,
    ) -> None:
        self.base = base
        self.work_dir = work_dir
        self.allow_partial = allow_partial
        self.allow_pickle = allow_pickle
        self.max_pending = max_pending
        self.history_size = history_size
        self.max_sessions = max_sessions
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # token -> its latest job
        self._history: OrderedDict[str, deque[Result]] = OrderedDict()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="cmlora-ui-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ sessions

    def submit(self, token: str, requests: list[GenerationRequest]) -> Job:
        """Queue a checked job for a session; refused while the session has one waiting or running,
        or when ``max_pending`` jobs wait."""
        if not valid_token(token):
            raise OptionError("this page has no session: reload it")
        if not requests:
            raise OptionError("choose at least one method")
        with self._lock:
            current = self._jobs.get(token)
            if current is not None and not current.finished_state:
                raise OptionError(
                    f"job {current.id} of this session is still {current.state}: wait for it or cancel it"
                )
            pending = sum(not j.finished_state for j in self._jobs.values())
            if pending >= self.max_pending:
                raise OptionError(f"the server has {pending} jobs waiting (the limit): try again in a while")
            job = Job(
                next(self._ids),
                token,
                list(requests),
                [MethodProgress(r.label, r.steps) for r in requests],
            )
            self._jobs[token] = job
        self._queue.put(job)
        return job

    def job(self, token: str) -> Job | None:
        """The session's latest job (running or finished), if any."""
        with self._lock:
            return self._jobs.get(token)

    def jobs_ahead(self, job: Job) -> int:
        """Jobs of other sessions that run before ``job``."""
        with self._lock:
            return sum(
                1
                for other in self._jobs.values()
                if other is not job and not other.finished_state and other.id < job.id
            )

    def cancel(self, token: str) -> Job | None:
        """Stop the session's job: a waiting one never starts, a running one stops at its next step."""
        with self._lock:
            job = self._jobs.get(token)
            if job is None or job.finished_state:
                return job
            job.cancel.set()
            if job.state == "queued":
                job.state = "cancelled"
                job.finished = time.monotonic()
                for progress in job.progress:
                    progress.state = "cancelled"
            return job

    def history(self, token: str) -> list[Result]:
        """The session's images, newest first."""
        with self._lock:
            items = self._history.get(token)
            if items is None:
                return []
            self._history.move_to_end(token)
            return list(reversed(items))

    def snapshot(self, job: Job) -> dict[str, Any]:
        """A consistent copy of a job's state for the page (the worker changes it meanwhile)."""
        with self._lock:
            return {
                "id": job.id,
                "state": job.state,
                "error": job.error,
                "results": list(job.results),
                "progress": [MethodProgress(**vars(p)) for p in job.progress],
                "created": job.created,
                "started": job.started,
                "finished": job.finished,
            }

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.state != "queued":
                    continue
                job.state, job.started = "running", time.monotonic()
            try:
                self._run(job)
                state, error = "done", None
            except _Cancelled:
                state, error = "cancelled", None
            except CmloraError as exc:
                state, error = "error", str(exc)
            except Exception as exc:  # the app must keep serving: report, log, go on
                traceback.print_exc(file=sys.stderr)
                state, error = "error", f"internal error ({type(exc).__name__}): {str(exc)[:300]}"
            with self._lock:
                job.state, job.error, job.finished = state, error, time.monotonic()
                for progress in job.progress:
                    if progress.state in ("queued", "running"):
                        progress.state = "cancelled" if state == "cancelled" else "stopped"
                        progress.finished = job.finished

    def _run(self, job: Job) -> None:
        from ...api import Composer
        from ...records import png_bytes

        folder = self.work_dir / job.token
        folder.mkdir(parents=True, exist_ok=True)
        with Composer(
            self.base.pipe,
            job.requests[0].loras,
            allow_partial=self.allow_partial,
            allow_pickle=self.allow_pickle,
            model_name=self.base.name,
        ) as composer:
            for request, progress in zip(job.requests, job.progress, strict=True):
                if job.cancel.is_set():
                    raise _Cancelled

                def on_step(i: int, plan: object, progress: MethodProgress = progress) -> None:
                    with self._lock:
                        progress.step = i + 1
                    if job.cancel.is_set():
                        raise _Cancelled

                with self._lock:
                    progress.state, progress.started = "running", time.monotonic()
                result = composer.run(request, progress=False, on_step=on_step)
                record = result.records[0]
                png = folder / f"job{job.id}-{request.label}-s{record['seed']}.png"
                png.write_bytes(png_bytes(result.images[0], record.as_dict()))
                item = Result(request.label, png, record, job.id)
                with self._lock:
                    progress.state, progress.finished = "done", time.monotonic()
                    job.results.append(item)
                    self._remember(job.token, item)

    def _remember(self, token: str, item: Result) -> None:
        """Add to the session's history (lock held); drop the oldest images and sessions past the caps."""
        items = self._history.setdefault(token, deque())
        self._history.move_to_end(token)
        items.append(item)
        while len(items) > self.history_size:
            items.popleft().png.unlink(missing_ok=True)
        while len(self._history) > self.max_sessions:
            old_token, old = self._history.popitem(last=False)
            for result in old:
                result.png.unlink(missing_ok=True)
            shutil.rmtree(self.work_dir / old_token, ignore_errors=True)

    def close(self) -> None:
        """Cancel what runs or waits and stop the worker."""
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()
        self._queue.put(None)
        self._worker.join(timeout=30)


def record_text(record: GenerationRecord) -> str:
    """The record as the JSON sidecar carries it."""
    from ...records import record_json

    return record_json(record.as_dict())


__all__ = ["Job", "MethodProgress", "Result", "Runner", "new_token", "record_text", "valid_token"]

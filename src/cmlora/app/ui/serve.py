"""Starting the app: the Gradio page behind ``RequestGuard``, on loopback unless asked otherwise.

Why these settings: Gradio's telemetry is off (the environment variable is set before Gradio is
imported, and ``analytics_enabled=False`` on the page); the theme uses system fonts, so the page
fetches nothing from the internet and works offline; one generation at a time (a diffusers
pipeline is not re-entrant) with a bounded queue; a remote address only with a password
(``check_bind``). The app keeps its images and uploads in one temporary folder, removed on close.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import OptionError
from ...paths import check_regular_file
from .files import AllowedFiles
from .form import Limits
from .guard import MAX_BODY, RequestGuard, check_bind, server_names
from .jobs import Runner

DEFAULT_PORT = 7860
#: Events waiting in Gradio's queue; more are refused with "Queue is full".
QUEUE_SIZE = 8


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``cmlora ui`` decides before the model loads."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow_remote: bool = False
    auth: tuple[tuple[str, str], ...] = ()
    public_names: tuple[str, ...] = ()
    lora_dir: str | None = None
    allow_partial: bool = False
    allow_pickle: bool = False
    open_browser: bool = False
    max_upload_mb: int = 512
    queue_size: int = QUEUE_SIZE
    limits: Limits = field(default_factory=Limits)


def read_auth_file(path: str) -> tuple[tuple[str, str], ...]:
    """``user:password`` lines (blank lines and ``#`` comments skipped) from a file only the user reads."""
    check_regular_file(path, lambda problem: OptionError(f"--auth-file {path!r}: {problem}"))
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()[:1000], 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or len(password) < 8:
            raise OptionError(
                f"--auth-file {path!r} line {number}: write user:password with a password of 8 or more characters"
            )
        pairs.append((user, password))
    if not pairs:
        raise OptionError(f"--auth-file {path!r} holds no user:password line")
    return tuple(pairs)


@dataclass
class RunningApp:
    """A started app: its URL, the Gradio page and the parts to close."""

    url: str
    demo: Any
    runner: Runner
    files: AllowedFiles
    work_dir: Path

    def close(self) -> None:
        """Stop the server and the worker (a running job is cancelled) and remove the app's files."""
        try:
            self.demo.close()
        finally:
            self.runner.close()
            shutil.rmtree(self.work_dir, ignore_errors=True)


def start(base: Any, options: ServeOptions = ServeOptions(), quiet: bool = False) -> RunningApp:
    """Launch the app around a loaded ``BaseModel`` without blocking; ``RunningApp.close`` stops it."""
    warning = check_bind(options.host, options.allow_remote, bool(options.auth))
    if warning and not quiet:
        print(warning, file=sys.stderr)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr
    from starlette.middleware import Middleware

    from .page import CSS, UIContext, build_page, model_defaults

    work_dir = Path(tempfile.mkdtemp(prefix="cmlora-ui-"))
    try:
        files = AllowedFiles(
            base.lora_ids,
            options.lora_dir,
            work_dir / "uploads",
            model_profile=base.profile,
            allow_pickle=options.allow_pickle,
            max_lora_bytes=options.max_upload_mb * 1024 * 1024,
        )
        if not base.lora_ids and options.lora_dir is None:
            _write_demo_loras(base, files.upload_dir)
        runner = Runner(base, work_dir / "images", options.allow_partial, options.allow_pickle)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    ctx = UIContext(base, files, runner, model_defaults(base), options.limits, note=base.note)
    demo = build_page(ctx)
    demo.queue(max_size=options.queue_size, default_concurrency_limit=1)
    guard = Middleware(
        RequestGuard,
        names=server_names(options.host, options.public_names),
        max_body=MAX_BODY,
        max_upload=options.max_upload_mb * 1024 * 1024 + MAX_BODY,
    )
    theme = gr.themes.Default(
        font=["system-ui", "Segoe UI", "Roboto", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    try:
        demo.launch(
            server_name=options.host.strip("[]"),
            server_port=options.port or _free_port(options.host),
            share=False,
            auth=list(options.auth) or None,
            inbrowser=options.open_browser,
            prevent_thread_lock=True,
            quiet=quiet,
            show_error=False,
            max_file_size=options.max_upload_mb * 1024 * 1024,
            allowed_paths=[str(work_dir)],
            app_kwargs={"middleware": [guard], "docs_url": None, "redoc_url": None, "openapi_url": None},
            footer_links=["gradio"],
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            theme=theme,
            css=CSS,
        )
    except BaseException:
        runner.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    host = options.host.strip("[]")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{demo.server_port}/"
    return RunningApp(url, demo, runner, files, work_dir)


def _free_port(host: str) -> int:
    """Port 0 means any free port; Gradio wants a number, so ask the OS for one."""
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host.strip("[]"), 0))
        return probe.getsockname()[1]


def _write_demo_loras(base: Any, folder: Path) -> None:
    """A tiny random model has no LoRAs of its own: two demo LoRAs show composition out of the box."""
    from ...tiny import write_random_lora

    for k, category in enumerate(("character", "background")):
        write_random_lora(base.pipe, folder / f"demo_{category}.safetensors", seed=k)


def serve(base: Any, options: ServeOptions) -> None:
    """Run the app until Ctrl+C (or SIGTERM); prints the URL."""
    import signal
    import threading

    app = start(base, options)
    print(f"cmlora ui: {app.url}  (model {base.name}; Ctrl+C stops)", flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        app.demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        print("cmlora ui: stopped", file=sys.stderr)
        app.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

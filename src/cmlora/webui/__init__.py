"""``cmlora ui``: a local web app to compose LoRAs, compare methods side by side and download records.

Stdlib only (``http.server`` + a vanilla-JS page): the app must start wherever cmlora installs,
without a web framework, and one worker thread runs jobs one at a time on the pipeline.
"""

from __future__ import annotations

from .server import WebApp, add_ui_subcommand, check_host, form_from_record, make_app, make_server, serve

__all__ = [
    "WebApp",
    "add_ui_subcommand",
    "check_host",
    "form_from_record",
    "make_app",
    "make_server",
    "serve",
]

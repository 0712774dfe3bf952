"""``cmlora ui``: the web app on Gradio, safe by default.

Modules, each with one job: ``command`` (argparse, no Gradio import), ``serve`` (launch behind the
guard), ``guard`` (Host, cross-origin and body-size rules), ``files`` (which files may be read),
``form`` (page fields -> checked ``GenerationRequest``s, records -> fields), ``jobs`` (worker,
cancel, per-session history), ``page`` (the Blocks layout and events), ``help`` (one sentence per
method and metric). Gradio is an optional extra: ``pip install "cmlora[ui]"``.
"""

from __future__ import annotations

from .command import INSTALL_HINT, add_ui_subcommand, cmd_ui

__all__ = ["INSTALL_HINT", "add_ui_subcommand", "cmd_ui"]

"""``cmlora ui``: the command line of the web app (argparse; Gradio is imported only when it runs).

Why apart from the page: ``cmlora --help`` and the CLI tests must work without the optional
``ui`` extra; when Gradio is missing the command says how to install it, before the model loads.
"""

from __future__ import annotations

import argparse
import sys

from ...errors import OptionError

INSTALL_HINT = 'the web app needs Gradio: pip install "cmlora[ui]" (or pip install "gradio>=6,<7")'


def gradio_missing() -> str | None:
    """The install hint when Gradio cannot be imported, else None."""
    import importlib.util

    return INSTALL_HINT if importlib.util.find_spec("gradio") is None else None


def cmd_ui(args: argparse.Namespace) -> int:
    from .guard import check_bind
    from .serve import ServeOptions, read_auth_file, serve

    hint = gradio_missing()
    if hint is not None:
        raise OptionError(hint)
    auth = read_auth_file(args.auth_file) if args.auth_file else ()
    check_bind(args.host, args.allow_remote, bool(auth))  # before minutes of model loading
    if args.port is not None and not 0 <= args.port <= 65535:
        raise OptionError(f"--port must be in [0, 65535], got {args.port}")
    from ...models import load_base

    base = load_base(args.base, args.device, args.dtype, args.config, allow_pickle=args.allow_pickle)
    if base.note:
        print(base.note, file=sys.stderr)
    options = ServeOptions(
        host=args.host,
        port=args.port,
        allow_remote=args.allow_remote,
        auth=auth,
        public_names=tuple(args.public_name or ()),
        lora_dir=args.lora_dir,
        allow_partial=args.allow_partial,
        allow_pickle=args.allow_pickle,
        open_browser=args.open,
    )
    serve(base, options)
    return 0


def add_ui_subcommand(sub) -> argparse.ArgumentParser:
    """Register ``cmlora ui`` on the CLI's subparsers (the CLI's ``build_parser`` calls this)."""
    from .serve import DEFAULT_PORT

    ui = sub.add_parser(
        "ui",
        help="local web app (Gradio): pick LoRAs, compare methods side by side, download images with records",
        description=(
            "Start the web app on the embedded mini model (or --base). Pick LoRAs (the model's own, "
            "--lora-dir files or uploads) with weights, categories and order; run several methods side by "
            "side with progress, elapsed time and ETA; cancel; keep the session's images in a gallery; "
            "download each PNG with its record and load it back to make it again. Listens on 127.0.0.1 "
            f"only unless --allow-remote with --auth-file. Needs the ui extra: {INSTALL_HINT.split(': ')[1]}."
        ),
    )
    ui.add_argument(
        "--base",
        default=None,
        help="base model: a diffusers folder, a .safetensors checkpoint, a hub id, or mini / tiny-sd15 / "
        "tiny-sdxl (default: the embedded mini model)",
    )
    ui.add_argument(
        "--config", default=None, help="local diffusers folder giving a single-file checkpoint's config"
    )
    ui.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    ui.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto (fp16 on CUDA, else fp32)")
    ui.add_argument(
        "--lora-dir",
        default=None,
        metavar="DIR",
        help="folder of LoRA files (and profile .json files) to choose from; the app reads no other folder "
        "besides the model's own and its uploads",
    )
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)"
    )
    ui.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host; needs --auth-file (every visitor logs in)",
    )
    ui.add_argument(
        "--auth-file",
        default=None,
        metavar="FILE",
        help="file of user:password lines (passwords of 8+ characters); required with --allow-remote",
    )
    ui.add_argument(
        "--public-name",
        action="append",
        metavar="NAME",
        help="with --allow-remote: a host name visitors use (e.g. a DNS name); other Host headers are refused",
    )
    ui.add_argument(
        "--open", action="store_true", help="also open the URL in a web browser (default: print it)"
    )
    ui.add_argument(
        "--allow-partial", action="store_true", help="load LoRAs whose keys partly match no layer (warns)"
    )
    ui.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.pt/.bin LoRA files in --lora-dir (pickles can execute code: trusted sources only)",
    )
    ui.set_defaults(func=cmd_ui)
    return ui

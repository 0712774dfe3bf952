"""``cmlora``: the command line's entry point. It only assembles the subcommands of the front-ends
(``generate``, ``sweep``, ``evaluate``, the web app), which never import each other, and turns
errors and interrupts into one-line messages and exit codes."""

from __future__ import annotations

import sys

from ..errors import CmloraError
from ..signals import sigterm_as_interrupt
from .arguments import Parser, one_line, quiet_libraries


def build_parser() -> Parser:
    parser = Parser(
        prog="cmlora",
        description="Training-free multi-LoRA composition (merge, LoRA Switch, LoRA Composite, CMLoRA) on diffusers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .generate import add_image_subcommands

    add_image_subcommands(sub)
    from .sweep import add_sweep_subcommand

    add_sweep_subcommand(sub)

    from .evaluate import add_eval_subcommands, add_report_subcommand

    add_eval_subcommands(sub)
    add_report_subcommand(sub)

    from .ui import add_ui_subcommand

    add_ui_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """SIGTERM (kill, a cluster's pre-emption) unwinds like Ctrl-C, so temporary files are removed
    and nothing half-written stays behind."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if getattr(args, "resumes", False):
            print(
                "interrupted: finished files are complete; re-run the same command to resume", file=sys.stderr
            )
        else:  # generate numbers its files on: a re-run makes every image again, after the others
            print(
                "interrupted: the files already written are complete; this command does not resume "
                "(a re-run starts over; `cmlora sweep` resumes)",
                file=sys.stderr,
            )
        return 130
    except CmloraError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

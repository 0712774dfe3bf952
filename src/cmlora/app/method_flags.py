"""Method options as command-line flags, shared by ``cmlora generate`` and ``cmlora sweep``.

Which options a method takes is the registry's answer (``accepted_options``); this module only
spells them as flags and reads them back."""

from __future__ import annotations

import argparse

from ..errors import OptionError
from ..methods import accepted_options


def _parse_intervals(text: str) -> dict[str, int]:
    """NAME=C[,NAME=C...]: per-LoRA cache refresh intervals (cmlora's non-uniform caching)."""
    intervals: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"intervals must look like char=3,bg=6 (LoRA name = steps), got {text!r}"
            ) from None
        if name.strip() in intervals:  # keeping the last one would silently drop the first
            raise argparse.ArgumentTypeError(
                f"LoRA {name.strip()!r} is given twice in {text!r}; give each LoRA's interval once"
            )
        intervals[name.strip()] = number
    return intervals


#: Method options exposed as flags: (flag, option name, type, help)
METHOD_FLAGS = (
    ("--tau", "tau", int, "switch: steps per active LoRA (default 5)"),
    ("--w-dom", "w_dom", float, "cmlora: dominant-LoRA coefficient w (default N - 0.5)"),
    ("--decay", "decay", float, "cmlora: decay d of w after each dominance change (offline 1.0, async 0.5)"),
    (
        "--cache-interval",
        "cache_interval",
        int,
        "cmlora / composite / loratorio: cache refresh interval c (cmlora default 3; composite and "
        "loratorio default 1 = no cache)",
    ),
    (
        "--low-interval-factor",
        "low_interval_factor",
        int,
        "cmlora: low-frequency LoRAs refresh every factor*c",
    ),
    (
        "--intervals",
        "intervals",
        _parse_intervals,
        "cmlora: per-LoRA refresh intervals NAME=C,... (override c and factor*c for those LoRAs)",
    ),
    ("--cache-layer", "cache_layer", int, "cache point: down-block level (default 0)"),
    (
        "--cache-block",
        "cache_block",
        int,
        "cache point: block inside the level (0 cheaper; default 1, or 0 where the level has one block)",
    ),
    (
        "--phase-fraction",
        "phase_fraction",
        float,
        "cmlora offline/async, switch-profiled: phase switch as fraction of steps",
    ),
    (
        "--threshold",
        "threshold",
        float,
        "cmlora online: early phase lasts while the statistic >= this (0.40)",
    ),
    ("--async-interval", "async_interval", int, "cmlora async: steps between dominance changes"),
    ("--patch", "patch", int, "loratorio: side of the latent patches mixed separately (default 2)"),
    ("--temperature", "temperature", float, "loratorio: SoftMin temperature over LoRAs (default 0.05)"),
    (
        "--uncond",
        "uncond",
        str,
        "loratorio: guide against the base model's unconditional prediction (base, default) or the "
        "LoRAs' mixed one (mixed)",
    ),
    ("--text-encoder", "text_encoder", str, "text-encoder policy: all, first or per_lora"),
)


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options")
    for flag, _, kind, text in METHOD_FLAGS:
        group.add_argument(flag, type=kind, default=None, help=text)
    group.add_argument(
        "--order", default=None, help="cmlora: comma-separated LoRA names, high-frequency first"
    )
    group.add_argument("--high", default=None, help="cmlora: comma-separated high-frequency LoRA names")
    group.add_argument("--low", default=None, help="cmlora: comma-separated low-frequency LoRA names")
    group.add_argument(
        "--profile", default=None, help="cmlora: profile file (cmlora profile) setting order/partition"
    )


def method_options(args: argparse.Namespace, method: str, strict: bool = True) -> dict:
    """Method flags given on the command line. strict: a flag the method does not take is an
    error (generate); otherwise it is left for the other methods of a sweep."""
    accepted = set(accepted_options(method))
    options = {}
    for name in [flag[1] for flag in METHOD_FLAGS] + ["order", "high", "low"]:
        value = getattr(args, name)
        if name in ("order", "high", "low") and value is not None:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            continue
        if name not in accepted:
            if strict:
                raise OptionError(f"option --{name.replace('_', '-')} does not apply to method {method!r}")
            continue
        options[name] = value
    return options

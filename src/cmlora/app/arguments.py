"""Command-line pieces shared by the commands that load a model and LoRAs: the parser class,
the model/LoRA flags, LoRA specs, and the one-line error style."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import NoReturn

from ..errors import OptionError
from ..loras import CATEGORIES


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (message, then where to look), like every other
    refusal of the CLI, instead of the usage block followed by the message. Subcommand parsers
    inherit the class (argparse makes subparsers of ``type(self)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_lora(spec: str):
    """FILE[:WEIGHT[:CATEGORY]]; a colon inside the path (Windows drive) is kept."""

    parts = spec.split(":")
    weight, category = 1.0, None
    if len(parts) >= 2 and parts[-1] in CATEGORIES:
        category = parts.pop()
    if len(parts) >= 2:
        try:
            weight = float(parts[-1]) if parts[-1] else 1.0  # FILE::CATEGORY keeps the default weight
            parts.pop()
        except ValueError:
            pass
    if not math.isfinite(weight):
        raise OptionError(f"--lora {spec!r}: weight must be finite")
    return ":".join(parts), weight, category


def size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}"
        ) from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model, device, LoRA and size flags every generating command shares."""
    p.add_argument(
        "--base",
        default=None,
        help="base model: a diffusers folder, a .safetensors checkpoint, a hub id, or mini / "
        "tiny-sd15 / tiny-sdxl (default: the embedded mini model)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="local diffusers folder giving the config of a single-file checkpoint",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    p.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto (fp16 on CUDA, else fp32)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT[:CATEGORY]]",
        help=f"a LoRA (repeat for each); CATEGORY one of {', '.join(CATEGORIES)}; with the mini model "
        "an id such as character_1 works too",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="load LoRAs whose keys partly match no layer (warns) instead of refusing them",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.pt/.bin LoRA files and --base/--vae models with .bin weights "
        "(pickles can execute code: trusted sources only)",
    )
    p.add_argument("--size", type=size, default=None, metavar="WxH", help="image size, multiple of 8")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_lora_files(args: argparse.Namespace) -> None:
    """Judge the --lora files before the model loads, from what ``read_lora_file`` can tell without
    reading a tensor: a regular file, a known extension, no pickle without --allow-pickle, a sound
    safetensors header (layout, keys, pairs; allowed pickles are loaded later, once). A name
    that is no file may be a mini-world id, known only once the mini model is loaded, so it is
    left to ``_resolve_loras`` with that base."""
    import os

    from ..errors import LoRAFileError
    from ..loras import PICKLE_SUFFIXES, read_lora_file
    from ..paths import check_regular_file

    ids_possible = args.base in (None, "mini")
    for spec in args.lora:
        file = parse_lora(spec)[0]
        if ids_possible and not os.path.lexists(file):
            continue
        if args.allow_pickle and Path(file).suffix.lower() in PICKLE_SUFFIXES:
            check_regular_file(file, lambda problem, f=file: LoRAFileError(f, problem))
        else:  # a pickle without --allow-pickle, an unknown extension: refused without reading
            read_lora_file(file, allow_pickle=False, tensors=False)


def resolve_loras(specs: list[str], base, out: Path) -> list:
    from ..loras import LoRA

    loras = []
    if not specs and base.note:  # tiny random default: make demo LoRAs so the command shows composition
        from ..tiny import write_random_lora

        demo = out / "demo-loras"
        demo.mkdir(parents=True, exist_ok=True)
        for k, category in enumerate(("character", "background")):
            path = write_random_lora(base.pipe, demo / f"demo_{category}.safetensors", seed=k)
            loras.append(LoRA(path, category=category))
        return loras
    if not specs:
        raise OptionError(
            "give at least one --lora FILE[:WEIGHT[:CATEGORY]] (or a mini-world id such as character_1)"
        )
    for spec in specs:
        file, weight, category = parse_lora(spec)
        known = base.lora_ids.get(file)
        if known is not None:
            loras.append(
                LoRA(
                    known["file"],
                    weight=weight,
                    category=category or known["category"],
                    name=file,
                    triggers=tuple(known["triggers"]),
                )
            )
        else:
            if not Path(file).exists() and base.lora_ids:
                raise OptionError(
                    f"--lora {file!r}: no such file, and not a LoRA id of the {base.name} model "
                    f"(ids: {', '.join(sorted(base.lora_ids))})"
                )
            loras.append(LoRA(file, weight=weight, category=category))
    return loras


def quiet_libraries() -> None:
    """diffusers/transformers info and deprecation chatter would bury our own output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def one_line(exc: BaseException) -> str:
    """An error message on one line: a refusal is one line on stderr, even when it quotes a
    library's multi-line message."""
    return " ".join(str(exc).split())

"""``cmlora`` command line: thin over the library (argparse, so ``--help`` is complete)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn

from .errors import CmloraError, OptionError
from .loras import CATEGORIES
from .methods import METHOD_LABELS, METHOD_VARIANTS, split_label
from .paths import check_output_dir, check_output_file


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (message, then where to look), like every other
    refusal of the CLI, instead of the usage block followed by the message. Subcommand parsers
    inherit the class (argparse makes subparsers of ``type(self)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Method options exposed as flags: (flag, option name, type, help)
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


def _parse_lora(spec: str):
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


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
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


def _method_options(args: argparse.Namespace, method: str, strict: bool = True) -> dict:
    """Method flags given on the command line. strict: a flag the method does not take is an
    error (generate); otherwise it is left for the other methods of a sweep."""
    import inspect

    from .methods import METHODS

    accepted = set(inspect.signature(METHODS[method].__init__).parameters)
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


def _size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}"
        ) from None


# --------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from .api import Composer
    from .models import load_base

    label = args.method
    if args.variant is not None:
        if "-" in label:
            raise OptionError(f"--method {label} already names a variant: drop --variant {args.variant}")
        label = f"{label}-{args.variant}"
    method, variant = split_label(label)
    options = _method_options(args, method)
    if args.num_images < 1:
        raise OptionError(f"--num-images must be >= 1, got {args.num_images}")
    if args.compile:
        from .compiled import check_backend

        check_backend(args.compile)
    if args.profile is not None:
        from .profiles import ProfileFile

        ProfileFile.load(args.profile)  # a missing or broken profile is refused before the model loads
    _check_lora_files(args)
    check_output_dir(args.out)  # before the model loads: an unwritable --out must not cost an image
    base = load_base(args.base, args.device, args.dtype, args.config, allow_pickle=args.allow_pickle)
    if base.note:
        print(base.note, file=sys.stderr)
    loras = _resolve_loras(args.lora, base, Path(args.out))
    prompt = args.prompt
    if prompt is None:
        if not base.base_prompt:
            raise OptionError("--prompt is required with this base model")
        triggers = [t for lora in loras for t in lora.triggers]
        prompt = ", ".join([base.base_prompt, *triggers])
    negative = args.negative_prompt if args.negative_prompt is not None else base.negative_prompt
    width, height = args.size if args.size else (None, None)
    out = Path(args.out)
    profile = base.profile_for(method, variant, [lora.path for lora in loras], options, args.profile)
    with Composer(
        base.pipe, loras, allow_partial=args.allow_partial, allow_pickle=args.allow_pickle
    ) as composer:
        if args.compile:
            composer.compile(backend=args.compile)
        for k in range(args.num_images):
            # one image at a time, each saved as soon as it exists: an interrupt loses at most the
            # image being made, never a finished one
            result = composer.generate(
                prompt=prompt,
                method=method,
                variant=variant,
                negative_prompt=negative,
                num_inference_steps=args.steps,
                guidance_scale=base.guidance if args.guidance is None else args.guidance,
                height=height,
                width=width,
                seed=args.seed + k,
                lora_scale=args.lora_scale,
                profile=profile,
                research=args.research,
                progress=not args.quiet,
                fuse_loras=not args.no_fuse,
                **options,
            )
            _save_generated(result.images[0], result.records[0], out, base.name, args.research)
    return 0


def _save_generated(image, record: dict, out: Path, base_name: str, research: bool) -> None:
    import errno

    from .records import save_image

    record["base_model"] = base_name
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{_next_index(out):05d}-{record['method_label']}-s{record['seed']}.png"
    try:
        save_image(image, record, png)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CmloraError(
                f"disk full while writing {png}: no partial file was left; free space and re-run"
            ) from None
        raise
    print(
        f"{png}  ({record['full_calls']} full + {record['cached_calls']} cached UNet calls, "
        f"{record['macs'] / 1e9:.2f} GMAC, {record['seconds']:.2f} s)",
        flush=True,
    )
    if research:
        from .research import plot_trace

        plot_trace(record, png.with_suffix(".trace.png"))
        print(f"{png.with_suffix('.trace.png')}  (research trace)")


def _next_index(folder: Path) -> int:
    numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    return max(numbers, default=-1) + 1


def _check_lora_files(args: argparse.Namespace) -> None:
    """Judge the --lora files before the model loads, from what ``read_lora_file`` can tell without
    reading a tensor: a regular file, a known extension, no pickle without --allow-pickle, a sound
    safetensors header (layout, keys, pairs; allowed pickles are loaded later, once). A name
    that is no file may be a mini-world id, known only once the mini model is loaded, so it is
    left to ``_resolve_loras`` with that base."""
    import os

    from .errors import LoRAFileError
    from .loras import PICKLE_SUFFIXES, read_lora_file
    from .paths import check_regular_file

    ids_possible = args.base in (None, "mini")
    for spec in args.lora:
        file = _parse_lora(spec)[0]
        if ids_possible and not os.path.lexists(file):
            continue
        if args.allow_pickle and Path(file).suffix.lower() in PICKLE_SUFFIXES:
            check_regular_file(file, lambda problem, f=file: LoRAFileError(f, problem))
        else:  # a pickle without --allow-pickle, an unknown extension: refused without reading
            read_lora_file(file, allow_pickle=False, tensors=False)


def _resolve_loras(specs: list[str], base, out: Path) -> list:
    from .loras import LoRA

    loras = []
    if not specs and base.note:  # tiny random default: make demo LoRAs so the command shows composition
        from .tiny import write_random_lora

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
        file, weight, category = _parse_lora(spec)
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


# --------------------------------------------------------------------------- analysis


def cmd_fft(args: argparse.Namespace) -> int:
    from .frequency import high_frequency_score, plot_spectra, read_image

    out = check_output_file(args.out)
    images = [(Path(path).name, read_image(path)) for path in args.images]
    plot_spectra(images, out)
    for name, image in images:
        print(f"{name}: high-frequency score {high_frequency_score(image):.4f}")
    print(f"wrote {out}")
    return 0


def cmd_plot_trace(args: argparse.Namespace) -> int:
    from .records import read_record
    from .research import plot_trace

    record = read_record(Path(args.record))
    out = check_output_file(Path(args.out) if args.out else Path(args.record).with_suffix(".trace.png"))
    plot_trace(record, out)
    print(f"wrote {out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .models import load_base
    from .profiling import profile_loras

    _check_lora_files(args)
    check_output_file(args.out)
    base = load_base(args.base, args.device, args.dtype, args.config, allow_pickle=args.allow_pickle)
    if base.note:
        print(base.note, file=sys.stderr)
    loras = _resolve_loras(args.lora, base, Path(args.out).parent)
    width, height = args.size if args.size else (None, None)
    profile = profile_loras(
        base.pipe,
        loras,
        prompt=args.prompt,
        base_prompt=base.base_prompt,
        negative_prompt=base.negative_prompt,
        seeds=list(range(args.seeds)),
        steps=args.steps,
        guidance_scale=args.guidance,
        height=height,
        width=width,
        base_name=base.name,
        threshold=args.threshold,
        progress=not args.quiet,
    )
    out = Path(args.out)
    profile.save(out)
    from .profiling import plot_profile, print_ranking

    print_ranking(profile, args.threshold)
    plot_profile(profile, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cmlora",
        description="Training-free multi-LoRA composition (merge, LoRA Switch, LoRA Composite, CMLoRA) on diffusers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common_model(p: argparse.ArgumentParser) -> None:
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
        p.add_argument("--size", type=_size, default=None, metavar="WxH", help="image size, multiple of 8")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    gen = sub.add_parser(
        "generate",
        help="compose LoRAs into images",
        description=(
            "Generate images with several LoRAs composed by a method. Writes PNGs (record in a PNG text chunk) and "
            "JSON sidecars to --out and prints their paths."
        ),
    )
    common_model(gen)
    gen.add_argument(
        "--method",
        default="cmlora",
        help=f"one of {', '.join(METHOD_LABELS)} (cmlora = cmlora-offline; default cmlora)",
    )
    gen.add_argument(
        "--variant",
        default=None,
        help="the method's variant: " + "; ".join(f"{m}: {', '.join(v)}" for m, v in METHOD_VARIANTS.items()),
    )
    gen.add_argument(
        "--prompt", default=None, help="prompt (default with the mini model: base prompt + triggers)"
    )
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default 7.5; the mini model's 5)",
    )
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--lora-scale", type=float, default=1.0, help="adapter strength inside each UNet call")
    gen.add_argument(
        "--research",
        action="store_true",
        help="record per-step latent statistic and cache similarities, and plot them",
    )
    gen.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the UNet's blocks (backend default inductor); the first image pays the "
        "compilation, switching LoRAs does not recompile: worth it for --num-images > 1",
    )
    gen.add_argument(
        "--no-fuse",
        action="store_true",
        help="run merge's and switch's LoRAs un-fused: saves a copy of every LoRA layer's weight "
        "(+4 GB on SDXL in fp16) at the cost of speed (fused merge was 3.4x faster on an H100)",
    )
    gen.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    _add_method_flags(gen)
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser(
        "profile",
        help="frequency profile of LoRAs (order and H/L partition for cmlora)",
        description="Generate a few images per LoRA alone, score their high-frequency content, "
        "and write a profile file that --profile accepts.",
    )
    common_model(prof)
    prof.add_argument("--prompt", default=None, help="prompt (default: base prompt + the LoRA's triggers)")
    prof.add_argument("--seeds", type=int, default=4, help="images per LoRA (seeds 0..n-1, default 4)")
    prof.add_argument("--steps", type=int, default=20)
    prof.add_argument("--guidance", type=float, default=7.5)
    prof.add_argument(
        "--threshold", type=float, default=None, help="score threshold for H (default: largest gap)"
    )
    prof.add_argument("--out", default="profile.json", help="profile file to write (default profile.json)")
    prof.set_defaults(func=cmd_profile)

    fft = sub.add_parser("fft", help="log-magnitude spectra and radial profiles of images (one PNG)")
    fft.add_argument("images", nargs="+", help="image files")
    fft.add_argument("--out", default="spectra.png")
    fft.set_defaults(func=cmd_fft)

    trace = sub.add_parser("plot-trace", help="plot the research trace of a generated image's record")
    trace.add_argument(
        "record", help="a PNG written by cmlora or its JSON sidecar (generated with --research)"
    )
    trace.add_argument("--out", default=None)
    trace.set_defaults(func=cmd_plot_trace)

    from .sweep_cli import add_sweep_subcommand

    add_sweep_subcommand(sub, common_model, _add_method_flags)

    from .evaluate.cli import add_eval_subcommands, add_report_subcommand

    add_eval_subcommands(sub)
    add_report_subcommand(sub)

    from .app.ui import add_ui_subcommand

    add_ui_subcommand(sub)
    return parser


def _quiet_libraries() -> None:
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


def _sigterm_as_interrupt():
    """SIGTERM (kill, a cluster's pre-emption) unwinds like Ctrl-C, so temporary files are removed
    and nothing half-written stays behind. Returns the previous handler (restored by ``main``)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def one_line(exc: BaseException) -> str:
    """An error message on one line: a refusal is one line on stderr, even when it quotes a
    library's multi-line message."""
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    previous = _sigterm_as_interrupt()
    try:
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
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

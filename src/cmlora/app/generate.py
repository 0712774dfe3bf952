"""``cmlora generate``, ``profile``, ``fft`` and ``plot-trace``: the commands that make or read single
images. Each builds core requests and reads records; none re-checks what the core checks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CmloraError, OptionError
from ..methods import METHOD_LABELS, METHOD_VARIANTS
from ..paths import check_output_dir, check_output_file
from .arguments import (
    add_model_arguments,
    check_lora_files,
    resolve_loras,
)
from .method_flags import add_method_flags, method_options

# --------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    import dataclasses

    from ..api import Composer
    from ..models import load_base
    from ..request import GenerationRequest, resolve_method, seeds_from

    method, variant = resolve_method(args.method, args.variant)  # a wrong label is refused before the load
    options = method_options(args, method)
    seeds = seeds_from(args.seed, args.num_images)
    if args.compile:
        from ..compiled import check_backend

        check_backend(args.compile)
    if args.profile is not None:
        from ..profiles import ProfileFile

        ProfileFile.load(args.profile)  # a missing or broken profile is refused before the model loads
    check_lora_files(args)
    check_output_dir(args.out)  # before the model loads: an unwritable --out must not cost an image
    base = load_base(args.base, args.device, args.dtype, args.config, allow_pickle=args.allow_pickle)
    if base.note:
        print(base.note, file=sys.stderr)
    loras = resolve_loras(args.lora, base, Path(args.out))
    prompt = args.prompt
    if prompt is None:
        if not base.base_prompt:
            raise OptionError("--prompt is required with this base model")
        triggers = [t for lora in loras for t in lora.triggers]
        prompt = ", ".join([base.base_prompt, *triggers])
    width, height = args.size if args.size else (None, None)
    profile = base.profile_for(method, variant, [lora.path for lora in loras], options, args.profile)
    request = GenerationRequest(
        loras=tuple(loras),
        prompt=prompt,
        method=args.method,
        variant=args.variant,
        options=options,
        negative_prompt=args.negative_prompt if args.negative_prompt is not None else base.negative_prompt,
        steps=args.steps,
        guidance_scale=base.guidance if args.guidance is None else args.guidance,
        height=height,
        width=width,
        seeds=seeds,
        lora_scale=args.lora_scale,
        profile=profile,
        research=args.research,
        fuse_loras=not args.no_fuse,
    )
    out = Path(args.out)
    with Composer(
        base.pipe,
        loras,
        allow_partial=args.allow_partial,
        allow_pickle=args.allow_pickle,
        model_name=base.name,
    ) as composer:
        if args.compile:
            composer.compile(backend=args.compile)
        for seed in seeds:
            # one image at a time, each saved as soon as it exists: an interrupt loses at most the
            # image being made, never a finished one
            one = dataclasses.replace(request, seeds=(seed,))  # the loaded profile goes along
            result = composer.run(one, progress=not args.quiet)
            _save_generated(result.images[0], result.records[0], out, args.research)
    return 0


def _save_generated(image, record, out: Path, research: bool) -> None:
    import errno

    from ..records import save_image

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
        from ..research import plot_trace

        plot_trace(record, png.with_suffix(".trace.png"))
        print(f"{png.with_suffix('.trace.png')}  (research trace)")


def _next_index(folder: Path) -> int:
    numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    return max(numbers, default=-1) + 1


# --------------------------------------------------------------------------- analysis


def cmd_fft(args: argparse.Namespace) -> int:
    from ..frequency import high_frequency_score, plot_spectra, read_image

    out = check_output_file(args.out)
    images = [(Path(path).name, read_image(path)) for path in args.images]
    plot_spectra(images, out)
    for name, image in images:
        print(f"{name}: high-frequency score {high_frequency_score(image):.4f}")
    print(f"wrote {out}")
    return 0


def cmd_plot_trace(args: argparse.Namespace) -> int:
    from ..records import read_record
    from ..research import plot_trace

    record = read_record(Path(args.record))
    out = check_output_file(Path(args.out) if args.out else Path(args.record).with_suffix(".trace.png"))
    plot_trace(record, out)
    print(f"wrote {out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from ..models import load_base
    from ..profiling import profile_loras

    check_lora_files(args)
    check_output_file(args.out)
    base = load_base(args.base, args.device, args.dtype, args.config, allow_pickle=args.allow_pickle)
    if base.note:
        print(base.note, file=sys.stderr)
    loras = resolve_loras(args.lora, base, Path(args.out).parent)
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
    from ..profiling import plot_profile, print_ranking

    print_ranking(profile, args.threshold)
    plot_profile(profile, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


# --------------------------------------------------------------------------- parser


def add_image_subcommands(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="compose LoRAs into images",
        description=(
            "Generate images with several LoRAs composed by a method. Writes PNGs (record in a PNG text chunk) and "
            "JSON sidecars to --out and prints their paths."
        ),
    )
    add_model_arguments(gen)
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
        help="run merge's and switch's LoRAs un-fused: saves a copy of every LoRA layer's weight at "
        "the cost of speed (README, Speed, gives both)",
    )
    gen.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    add_method_flags(gen)
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser(
        "profile",
        help="frequency profile of LoRAs (order and H/L partition for cmlora)",
        description="Generate a few images per LoRA alone, score their high-frequency content, "
        "and write a profile file that --profile accepts.",
    )
    add_model_arguments(prof)
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

"""``cmlora sweep``: every composition x method x seed of a testbed, resumable and shardable.

The runner (``testbed.sweep``) knows nothing of models; this module builds the jobs from a
testbed and the published settings (``testbed.presets``), and ``testbed.generator`` makes one
image per job. Jobs are
ordered composition -> seed -> method so consecutive jobs of one process reuse the same loaded
LoRAs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OptionError
from ..methods import split_label
from ..paths import check_output_dir
from ..testbed.presets import (
    MINI_DEFAULTS,
    PRESETS,
    PUBLISHED_DTYPE,
    PUBLISHED_SCHEDULER,
    apply_pipeline_settings,
)
from .arguments import add_model_arguments
from .method_flags import add_method_flags, method_options

DEFAULT_METHODS = "merge,switch,composite,cmlora-offline"


def add_sweep_subcommand(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a testbed: every composition x method x seed (resumable, shardable)",
        description=(
            "Generate every composition of a testbed with several methods and seeds into one folder, with "
            "records, a manifest (one JSON line per image) and a comparison sheet per composition. Re-running "
            "the same command resumes; under `accelerate launch` the work is sharded across processes."
        ),
    )
    add_model_arguments(p)
    p.add_argument(
        "--testbed",
        choices=("composlora", "mini"),
        default="mini",
        help="composlora (the papers' 22 LoRAs; needs --lora-dir and --base) or mini (default)",
    )
    p.add_argument("--style", choices=("reality", "anime"), default="anime", help="composlora image style")
    p.add_argument(
        "--info", default=None, help="your own info file (ComposLoRA layout) instead of the testbed's"
    )
    p.add_argument(
        "--lora-dir", default=None, help="folder holding <style>/<id>.safetensors (composlora, --info)"
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="zhong",
        help="composlora published settings: zhong (Zhong et al.) or cmlora (CMLoRA code)",
    )
    p.add_argument(
        "--vae",
        default=None,
        metavar="PATH_OR_ID",
        help="VAE replacing the base model's (diffusers folder or hub id; 'none' keeps the base's). "
        "composlora default: the testbed's, as published (reality: stabilityai/sd-vae-ft-mse)",
    )
    p.add_argument("--n", default="2,3,4,5", help="composition sizes, comma-separated (default 2,3,4,5)")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated method labels (default {DEFAULT_METHODS})",
    )
    p.add_argument("--seeds", type=int, default=1, help="images per composition and method (default 1)")
    p.add_argument("--base-seed", type=int, default=None, help="base seed (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the preset's)")
    p.add_argument("--lora-scale", type=float, default=None, help="LoRA strength (default: the preset's)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT compositions")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="denoise up to this many seeds of one composition and method together (one UNet call "
        "for all); faster for small models on a CPU, images equal to one-by-one within one 8-bit level "
        "(default 1)",
    )
    p.add_argument(
        "--new-run",
        action="store_true",
        help="discard the previous results in --out (only files the sweep wrote) and start over",
    )
    add_method_flags(p)
    p.set_defaults(func=cmd_sweep, resumes=True)


def _testbed(args):
    from ..testbed.compositions import enumerate_compositions
    from ..testbed.info import load_info, load_testbed_info, load_testbed_prompts

    try:
        sizes = tuple(int(v) for v in args.n.split(",") if v.strip())
    except ValueError:
        raise OptionError(f"--n must be comma-separated integers such as 2,3,4,5, got {args.n!r}") from None
    if not sizes:
        raise OptionError("--n names no composition size")
    if args.limit is not None and args.limit < 1:
        raise OptionError(f"--limit must be >= 1, got {args.limit}")
    if args.testbed == "mini":
        from ..models import mini_available

        if not mini_available():
            raise OptionError("the mini world's trained assets are not installed; use --testbed composlora")
        from ..testbed.generator import mini_compositions

        comps = mini_compositions(sizes)
        defaults = dict(MINI_DEFAULTS)
    else:
        info = load_info(args.info) if args.info else load_testbed_info(args.style)
        tb = load_testbed_prompts(args.style)
        # a user's own info file names its compositions after the file, not after a ComposLoRA style
        style = Path(args.info).stem if args.info else args.style
        base_prompt, negative = tb.prompt, tb.negative_prompt
        defaults = dict(PRESETS[args.preset][args.style])
        # The published pipeline (COMPOSLORA.md): fp32, DPM-Solver++ multistep, and for reality the
        # ft-MSE VAE; a user's own info file keeps its base model's VAE unless --vae says otherwise.
        defaults["scheduler"] = PUBLISHED_SCHEDULER
        defaults["vae"] = None if args.info else tb.vae
        if args.lora_dir is None:
            raise OptionError(
                "--lora-dir is required for --testbed composlora (folder with <style>/<id>.safetensors)"
            )
        if args.base is None:
            raise OptionError(
                f"--base is required for --testbed composlora (published base: {tb.base_model})"
            )
        comps = enumerate_compositions(
            info, sizes, style=style, base_prompt=base_prompt, negative_prompt=negative
        )
    if args.limit is not None:
        comps = comps[: args.limit]
    return comps, defaults


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..models import load_base
    from ..testbed.compositions import image_seed
    from ..testbed.generator import CompositionGenerator
    from ..testbed.sweep import SweepJob, distributed_env, run_sweep

    comps, defaults = _testbed(args)
    for key in ("steps", "guidance", "lora_scale", "base_seed"):
        if getattr(args, key) is not None:
            defaults[key] = getattr(args, key)
    if args.vae is not None:
        defaults["vae"] = None if args.vae.lower() == "none" else args.vae
    dtype = args.dtype
    if dtype == "auto" and args.testbed == "composlora":
        dtype = PUBLISHED_DTYPE  # the papers ran fp32; auto would pick fp16 on CUDA
    if args.size:
        defaults["width"], defaults["height"] = args.size
    labels = method_labels(args.methods)
    methods = {label: split_label(label) for label in labels}
    options = {label: method_options(args, method, strict=False) for label, (method, _) in methods.items()}
    if args.seeds < 1:
        raise OptionError(f"--seeds must be >= 1, got {args.seeds}")
    jobs = [
        SweepJob(comp, label, options[label], k, image_seed(defaults["base_seed"], comp.id, k))
        for comp in comps
        for k in range(args.seeds)
        for label in labels
    ]
    import torch

    _, world_size, local_rank = distributed_env()
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = process_device(args.device, local_rank, world_size, cuda_count)
    if args.testbed != "mini":
        check_lora_files(comps, lora_path_of(args))
    if args.profile is not None:
        from ..profiles import ProfileFile

        ProfileFile.load(args.profile)  # a missing or broken profile is refused before the model loads
    check_output_dir(args.out)  # before the model loads: an unwritable run folder must not cost a load
    base = load_base(args.base, device, dtype, args.config, allow_pickle=args.allow_pickle)
    if base.note:
        print(base.note, file=sys.stderr)
    apply_pipeline_settings(
        base.pipe, defaults.get("scheduler"), defaults.get("vae"), allow_pickle=args.allow_pickle
    )
    settings = {
        "testbed": args.testbed,
        "style": comps[0].style if comps else args.style,
        "base": base.name,
        "info": args.info,
        "methods": labels,
        "method_options": options,
        "sizes": args.n,
        "seeds": args.seeds,
        "limit": args.limit,
        "dtype": dtype,
        "profile": args.profile,
        **defaults,
    }
    generate = CompositionGenerator(
        base,
        methods,
        defaults,
        lora_path_of(args, base),
        profile=args.profile,
        allow_partial=args.allow_partial,
        allow_pickle=args.allow_pickle,
    )
    try:
        summary = run_sweep(
            args.out,
            settings,
            jobs,
            generate,
            new_run=args.new_run,
            progress=not args.quiet,
            batch_size=args.batch_size,
        )
    finally:
        generate.close()
    print(f"{summary.done}/{summary.total} images in {args.out} (manifest.jsonl, images/, sheets/)")
    return 0


def lora_path_of(args: argparse.Namespace, base=None):
    """Where the LoRA file of a testbed entry is: the mini model's own (needs the loaded ``base``),
    ``--lora-dir/<id>.safetensors`` with ``--info``, or the ComposLoRA layout."""
    from ..testbed.info import lora_file

    if args.testbed == "mini":
        return lambda entry: Path(base.lora_ids[entry.id]["file"])
    if args.info:
        return lambda entry: Path(args.lora_dir) / f"{entry.id}.safetensors"
    return lambda entry: lora_file(args.lora_dir, args.style, entry)


def check_lora_files(comps, lora_path) -> None:
    """Every LoRA file of the sweep must be a regular file before the model loads and the run
    folder is started: a wrong --lora-dir used to be found at the first composition, after the
    load, leaving a fresh run folder behind."""
    from ..errors import LoRAFileError
    from ..paths import check_regular_file

    seen: set[Path] = set()
    for comp in comps:
        for entry in comp.loras:
            path = Path(lora_path(entry))
            if path not in seen:
                seen.add(path)
                check_regular_file(path, lambda problem, p=path: LoRAFileError(p, problem))


def method_labels(text: str) -> list[str]:
    """The --methods list: at least one label, each once. An empty list ran a sweep of 0 images
    and reported success; a repeated label would make the same images twice."""
    labels = [m.strip() for m in text.split(",") if m.strip()]
    if not labels:
        raise OptionError(f"--methods {text!r} names no method; give labels such as {DEFAULT_METHODS}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise OptionError(f"--methods {text!r} repeats {', '.join(repeated)}; give each method once")
    return labels


def process_device(device: str, local_rank: int, world_size: int, cuda_count: int) -> str:
    """The device of this process: under a launcher, ``auto`` and a bare ``cuda`` mean the GPU of
    its local rank (so each process gets its own), wrapping round when there are more processes
    than GPUs; an explicit ``cuda:K`` or any other device is taken as given."""
    if device == "auto":
        return f"cuda:{local_rank % cuda_count}" if cuda_count else "auto"
    if device == "cuda" and world_size > 1 and cuda_count:
        return f"cuda:{local_rank % cuda_count}"
    return device

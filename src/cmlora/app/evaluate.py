"""argparse glue for ``cmlora eval clipscore``, ``cmlora eval judge`` and ``cmlora report``.

The top-level ``cmlora`` parser is owned elsewhere; these functions only register sub-commands on the
``subparsers`` object it passes in.  Each sub-command sets ``func`` (``args.func(args) -> int`` exit
code), the usual argparse dispatch convention, so wiring is two calls and one ``return args.func(args)``.
Heavy imports (torch, transformers, matplotlib) happen inside the handlers so ``cmlora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

__all__ = ["add_eval_subcommands", "add_report_subcommand"]

logger = logging.getLogger(__name__)

_JUDGE_EPILOG = """\
Every (composition, seed) that has an image from both methods of a pair is judged twice, once in
each presentation order.  Verdicts are appended to RUN_DIR/eval/judge.jsonl and well-formed replies
are cached in RUN_DIR/eval/judge_cache/ (or --cache-dir), so re-running resumes an interrupted run
and costs nothing for work already done.  The API key is read from the environment only and is never
written anywhere.

example:
  export OPENAI_API_KEY=...
  cmlora eval judge runs/sweep1 --methods merge,switch,composite \\
      --endpoint https://api.openai.com/v1 --model gpt-4o
  # a local vLLM server without a key:
  cmlora eval judge runs/sweep1 --methods merge,cmlora \\
      --endpoint http://127.0.0.1:8000/v1 --model openbmb/MiniCPM-V-2_6
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if len(methods) < 2 or len(set(methods)) != len(methods):
        raise argparse.ArgumentTypeError(
            f"need at least two distinct comma-separated method labels, got {text!r}"
        )
    return methods


def add_eval_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` with its ``clipscore`` and ``judge`` sub-commands; returns the ``eval`` parser."""
    eval_parser = subparsers.add_parser(
        "eval",
        help="score the images of a sweep run (CLIPScore, pairwise MLLM judge)",
        description="Evaluate the images of a sweep run directory. Results go to RUN_DIR/eval/.",
    )
    eval_sub = eval_parser.add_subparsers(
        dest="eval_command", metavar="{clipscore,judge,concepts}", required=True
    )

    concepts = eval_sub.add_parser(
        "concepts",
        help="mini world: concept recall of each image with the world's detectors",
        description=(
            "For a run made on the mini world (cmlora sweep --testbed mini), detect which character, clothing, "
            "style, background and object each image shows and append {image, recall, all_present} lines to "
            "RUN_DIR/eval/concepts.jsonl (read by cmlora report). Already scored images are skipped; scores "
            "from another judge are refused (--overwrite scores afresh)."
        ),
    )
    concepts.add_argument("run_dir", metavar="RUN_DIR", help="sweep run directory containing manifest.jsonl")
    concepts.add_argument(
        "--overwrite",
        action="store_true",
        help="discard existing concepts.jsonl and score everything again (needed after the judge changed)",
    )
    concepts.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    concepts.set_defaults(func=_run_concepts, resumes=True)

    clip = eval_sub.add_parser(
        "clipscore",
        help="CLIPScore of each image against its composition's trigger words",
        description=(
            "Compute CLIPScore = 100 * max(cos(image, text), 0) of every image in RUN_DIR/manifest.jsonl "
            "against its composition's trigger words, and append {image, clipscore, clip_model} lines to "
            "RUN_DIR/eval/clipscore.jsonl. Images already scored with the same --clip are skipped."
        ),
    )
    clip.add_argument("run_dir", metavar="RUN_DIR", help="sweep run directory containing manifest.jsonl")
    clip.add_argument(
        "--clip",
        required=True,
        metavar="PATH_OR_ID",
        help="CLIP checkpoint: a local folder (config.json, weights, tokenizer, preprocessor_config.json) "
        "or a Hugging Face hub id such as openai/clip-vit-base-patch16 (the model the papers used)",
    )
    clip.add_argument(
        "--batch-size", type=_positive_int, default=16, help="images per forward pass (default: 16)"
    )
    clip.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available)"
    )
    clip.add_argument(
        "--overwrite",
        action="store_true",
        help="discard existing clipscore.jsonl and score everything again (needed to switch CLIP model)",
    )
    clip.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    clip.set_defaults(func=_run_clipscore, resumes=True)

    judge = eval_sub.add_parser(
        "judge",
        help="pairwise multimodal-LLM judge through an OpenAI-compatible endpoint",
        description=(
            "Show a multimodal LLM two images of the same composition from two methods and have it score "
            "each 0-10 (0.5 steps) on composition quality and image quality, following the published "
            "rubric. Works with any OpenAI-compatible chat-completions endpoint."
        ),
        epilog=_JUDGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    judge.add_argument("run_dir", metavar="RUN_DIR", help="sweep run directory containing manifest.jsonl")
    judge.add_argument(
        "--methods",
        required=True,
        type=_methods,
        metavar="A,B[,C...]",
        help="method labels as in the manifest; every pair of them is judged, the first of a pair being 'A'",
    )
    judge.add_argument(
        "--endpoint",
        required=True,
        metavar="URL",
        help="base URL of the API (e.g. https://api.openai.com/v1); /chat/completions is appended unless present",
    )
    judge.add_argument("--model", required=True, metavar="NAME", help="model name sent to the endpoint")
    judge.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default: OPENAI_API_KEY); unset = no key sent",
    )
    judge.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        help="seconds per request in total: connecting, sending and receiving the whole reply, however "
        "slowly the server sends it; a request that runs out is retried like a timeout (default: 120)",
    )
    judge.add_argument(
        "--max-retries",
        type=_non_negative_int,
        default=5,
        help="retries on 429, 5xx, timeouts and connection errors, with exponential backoff and "
        "Retry-After honoured (default: 5)",
    )
    judge.add_argument(
        "--malformed-retries",
        type=_non_negative_int,
        default=2,
        help="re-asks when a reply has no valid scores before it is recorded as a failure (default: 2)",
    )
    judge.add_argument(
        "--backoff",
        type=_positive_float,
        default=2.0,
        help="first backoff delay in seconds, doubled per retry (default: 2)",
    )
    judge.add_argument(
        "--max-tokens", type=_positive_int, default=1024, help="max_tokens of each reply (default: 1024)"
    )
    judge.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="reply cache folder (default: RUN_DIR/eval/judge_cache)",
    )
    judge.add_argument(
        "--retry-failures",
        action="store_true",
        help="judge again the items recorded as failures (malformed replies, rejected requests, unreadable "
        "images); transport failures (timeouts, connection errors, 5xx) are judged again by any re-run",
    )
    judge.add_argument(
        "--limit",
        type=_non_negative_int,
        default=None,
        help="judge at most this many new items (try a paid API first)",
    )
    judge.add_argument(
        "--max-consecutive-failures",
        type=_positive_int,
        default=10,
        help="stop the run after this many failures in a row (default: 10)",
    )
    judge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    judge.set_defaults(func=_run_judge, resumes=True)
    return eval_parser


def add_report_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report``; returns its parser."""
    report = subparsers.add_parser(
        "report",
        help="summarise a run's evaluation into report.md and plots",
        description=(
            "Write RUN_DIR/report.md and RUN_DIR/plots/*.png: per N and method the CLIPScore mean with a "
            "95%% bootstrap interval, UNet calls, MACs and seconds per image, concept recall when "
            "RUN_DIR/eval/concepts.jsonl exists; per N and method pair the judge's win / tie / loss per "
            "dimension pooled over both presentation orders, and mean scores."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="sweep run directory containing manifest.jsonl")
    report.add_argument(
        "--bootstrap", type=_positive_int, default=2000, help="bootstrap resamples for CIs (default: 2000)"
    )
    report.add_argument("--seed", type=int, default=0, help="RNG seed of the bootstrap (default: 0)")
    report.add_argument("--judge-model", default=None, help="only count verdicts of this judge model")
    report.add_argument("--no-plots", action="store_true", help="write report.md only")
    report.set_defaults(func=_run_report)
    return report


def _run_concepts(args: argparse.Namespace) -> int:
    from ..evaluate.concepts import score_run
    from ..evaluate.runs import ManifestError

    try:
        out = score_run(args.run_dir, progress=not args.no_progress, overwrite=args.overwrite)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _run_clipscore(args: argparse.Namespace) -> int:
    from ..evaluate.clipscore import clip_score_run
    from ..evaluate.runs import ManifestError

    try:
        records = clip_score_run(
            args.run_dir,
            args.clip,
            batch_size=args.batch_size,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(records)} CLIPScore record(s) in {args.run_dir}/eval/clipscore.jsonl")
    return 0


def _run_judge(args: argparse.Namespace) -> int:
    from ..evaluate.judge import JudgeAborted, JudgeConfig, judge_run, retry_hint
    from ..evaluate.runs import ManifestError

    config = JudgeConfig(
        endpoint=args.endpoint,
        model=args.model,
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        max_retries=args.max_retries,
        malformed_retries=args.malformed_retries,
        backoff_base=args.backoff,
        max_tokens=args.max_tokens,
        max_consecutive_failures=args.max_consecutive_failures,
    )
    try:
        summary = judge_run(
            args.run_dir,
            args.methods,
            config,
            cache_dir=args.cache_dir,
            retry_failures=args.retry_failures,
            limit=args.limit,
            progress=not args.no_progress,
        )
    except (ManifestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JudgeAborted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"judge: {summary.verdicts} verdict(s) ({summary.from_cache} from cache), {summary.failures} failure(s), "
        f"{summary.skipped_existing} already done, {summary.requests} request(s) sent"
    )
    if summary.failures:
        # Say per kind what redoes them: a plain re-run for transport failures, --retry-failures otherwise.
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(summary.failure_kinds.items()))
        where = f"{args.run_dir}/eval/judge.jsonl"
        print(
            f"see 'failure' lines in {where} ({kinds}): {retry_hint(summary.failure_kinds)}", file=sys.stderr
        )
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from ..evaluate.report import write_report
    from ..evaluate.runs import ManifestError

    try:
        path, _ = write_report(
            args.run_dir,
            n_resamples=args.bootstrap,
            seed=args.seed,
            judge_model=args.judge_model,
            plots=not args.no_plots,
        )
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0

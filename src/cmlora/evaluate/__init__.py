"""Evaluation of sweep runs: CLIPScore, pairwise MLLM judge and the summary report.

Names are resolved lazily so that importing :mod:`cmlora.evaluate` (e.g. to register CLI
sub-commands) does not pull in torch, transformers or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClipScorer": "clipscore",
    "clip_score_run": "clipscore",
    "clipscore_from_embeddings": "clipscore",
    "preprocess_images": "clipscore",
    "ClipPreprocessConfig": "clipscore",
    "JudgeConfig": "judge",
    "JudgeSummary": "judge",
    "JudgeError": "judge",
    "JudgeAborted": "judge",
    "MalformedReply": "judge",
    "TransportError": "judge",
    "ChatClient": "judge",
    "ResponseCache": "judge",
    "judge_run": "judge",
    "parse_scores": "judge",
    "build_prompt": "judge",
    "build_messages": "judge",
    "ReportData": "report",
    "MethodRow": "report",
    "JudgeRow": "report",
    "bootstrap_ci": "report",
    "build_report": "report",
    "render_markdown": "report",
    "write_report": "report",
    "ManifestEntry": "runs",
    "ManifestError": "runs",
    "LoraInfo": "runs",
    "read_manifest": "runs",
    "read_jsonl": "runs",
    "resolve_image": "runs",
    "add_eval_subcommands": "cli",
    "add_report_subcommand": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

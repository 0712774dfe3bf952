"""Concept scores of a mini-world run: which of a composition's concepts its image shows.

The mini world's judge says, for any image, which character, clothing, style, background and
object it shows (or none), how much of each concept's parts it shows (graded), and how far it lies
from anything the world renders (artifact). Recall = share of the composition's LoRAs whose concept
is detected in its category; all_present = every one is; graded = mean graded score of the
composition's concepts. This is the quality signal the method comparison rests on where no human or
MLLM judge is available.
"""

from __future__ import annotations

import os
from pathlib import Path

from .runs import (
    CONCEPTS_FILENAME,
    JsonlAppender,
    ManifestError,
    eval_dir,
    open_run_image,
    read_jsonl,
    read_manifest,
    readable_images,
    resolve_image,
)


def concept_recall(expected: dict[str, str], detected: dict[str, str | None]) -> tuple[float, bool]:
    hits = sum(1 for category, concept in expected.items() if detected.get(category) == concept)
    recall = hits / len(expected) if expected else 0.0
    return recall, hits == len(expected)


def score_run(
    run_dir: str | os.PathLike[str], batch_size: int = 256, progress: bool = True, overwrite: bool = False
) -> Path:
    """Append {image, recall, all_present, graded, artifact, detected, expected, judge} to
    RUN_DIR/eval/concepts.jsonl for every manifest image not scored yet (an interrupted run resumes).
    A file scored by another judge (retrained or recalibrated, or from before judges were recorded) is
    refused, since its means would mix two judges; ``overwrite`` scores every image afresh."""
    from tqdm.auto import tqdm

    from ..mini.detectors import judge, judge_id

    entries = read_manifest(run_dir)
    out = eval_dir(run_dir) / CONCEPTS_FILENAME
    current = judge_id()
    if overwrite:
        readable_images(run_dir, entries)  # refused before the old scores are discarded
        out.unlink(missing_ok=True)
    existing = read_jsonl(out) if out.exists() else []
    others = sorted({str(r.get("judge", "unrecorded")) for r in existing} - {current})
    if others:
        raise ManifestError(
            f"{out} holds scores from another judge ({', '.join(others)}; this one is {current}): "
            f"score again with `cmlora eval concepts {run_dir} --overwrite` (overwrite=True)"
        )
    done = {os.path.normpath(r["image"]) for r in existing}
    todo = [e for e in entries if os.path.normpath(e.image) not in done]
    bar = tqdm(total=len(todo), desc="concepts", unit="img", disable=not progress)
    with JsonlAppender(out) as sink:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [open_run_image(resolve_image(run_dir, entry.image)) for entry in chunk]
            verdict = judge(images)
            for k, entry in enumerate(chunk):
                expected = {lora.category: lora.name for lora in entry.loras}
                detected = verdict.detected(k)
                recall, all_present = concept_recall(expected, detected)
                graded = [verdict.graded_of(k, concept) for concept in expected.values()]
                sink.write(
                    {
                        "image": entry.image,
                        "recall": recall,
                        "all_present": all_present,
                        "graded": sum(graded) / len(graded) if graded else 0.0,
                        "artifact": float(verdict.artifact[k]),
                        "detected": detected,
                        "expected": expected,
                        "judge": current,
                    }
                )
            bar.update(len(chunk))
    bar.close()
    return out

"""Concept recall of a mini-world run: which of a composition's concepts its image shows.

The mini world's detectors say, for any image, which character, clothing, style, background and
object it shows (or none). Recall = share of the composition's LoRAs whose concept is detected in
its category; all_present = every one is. This is the quality signal the method comparison rests
on where no human or MLLM judge is available.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..paths import check_regular_file
from .runs import (
    CONCEPTS_FILENAME,
    JsonlAppender,
    ManifestError,
    eval_dir,
    read_jsonl,
    read_manifest,
    resolve_image,
)


def concept_recall(expected: dict[str, str], detected: dict[str, str | None]) -> tuple[float, bool]:
    hits = sum(1 for category, concept in expected.items() if detected.get(category) == concept)
    recall = hits / len(expected) if expected else 0.0
    return recall, hits == len(expected)


def score_run(run_dir: str | os.PathLike[str], batch_size: int = 256, progress: bool = True) -> Path:
    """Append {image, recall, all_present, detected, expected} to RUN_DIR/eval/concepts.jsonl for every
    manifest image not scored yet (an interrupted run resumes)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from ..mini.detectors import detect

    entries = read_manifest(run_dir)
    out = eval_dir(run_dir) / CONCEPTS_FILENAME
    done = {os.path.normpath(r["image"]) for r in read_jsonl(out)} if out.exists() else set()
    todo = [e for e in entries if os.path.normpath(e.image) not in done]
    bar = tqdm(total=len(todo), desc="concepts", unit="img", disable=not progress)
    with JsonlAppender(out) as sink:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = []
            for entry in chunk:
                image_path = resolve_image(run_dir, entry.image)
                check_regular_file(image_path, lambda problem, p=image_path: ManifestError(f"{p}: {problem}"))
                with Image.open(image_path) as image:
                    images.append(image.convert("RGB"))
            for entry, detected in zip(chunk, detect(images), strict=True):
                expected = {lora.category: lora.name for lora in entry.loras}
                recall, all_present = concept_recall(expected, detected)
                sink.write(
                    {
                        "image": entry.image,
                        "recall": recall,
                        "all_present": all_present,
                        "detected": detected,
                        "expected": expected,
                    }
                )
            bar.update(len(chunk))
    bar.close()
    return out

"""Offline frequency profiling of LoRAs: the ``cmlora profile`` command behind CMLoRA's order.

CMLoRA orders a composition's LoRAs by how much fine detail each one puts into an image on its own,
and splits them into a high-frequency group H and a low-frequency group L (METHODS.md, part 2).
That needs images, which cost minutes, so it is done once per LoRA file and base model and stored
in a :class:`~cmlora.profiles.ProfileFile` that ``Composer.generate(profile=...)`` reads.

How one LoRA is profiled, and why:

- Each LoRA is generated *alone* through the library's own ``merge`` method with a one-LoRA
  composition (so the same adapter code, sampler and seeding as every other method; with one LoRA
  merge is simply "that LoRA active"), one image per seed.
- The LoRA is applied at strength 1.0 whatever its user weight: an entry is keyed by the file's
  SHA-256 and reused by every composition of that file, so it must describe the file, not one
  composition's weighting of it.
- The stored radial profile is the mean of the per-image max-normalised profiles, *not*
  re-normalised; the score is the mean of the per-image :func:`~cmlora.frequency.high_frequency_score`.
  The band mean is linear, so the two agree: ``score == band_mean(stored profile)``, and the plot's
  legend shows the same number as the ranking. Averaging per-image scores (rather than scoring one
  averaged spectrum) gives every seed the same say, whatever its overall contrast.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import OptionError
from .files import sha256_file
from .frequency import (
    DEFAULT_N_BINS,
    HIGH_BAND_START,
    high_frequency_score,
    order_and_partition,
    plot_radial_profiles,
    radial_profile,
)
from .loras import LoRA
from .profiles import LoRAProfileEntry, ProfileFile

#: Strength at which a LoRA is applied while profiled (see the module docstring).
PROFILE_LORA_STRENGTH = 1.0

#: How the score is aggregated over seeds; written into the file's settings so a reader knows.
SCORE_RULE = "mean over seeds of per-image high_frequency_score (= band mean of the stored mean profile)"


def _prompt_for(lora: LoRA, prompt: str | None, base_prompt: str) -> str:
    """The user's prompt, or the base prompt followed by the LoRA's triggers (empty parts skipped).

    Triggers are what makes a LoRA show its content; without them many LoRAs barely act and every
    profile would look like the base model's.
    """
    if prompt is not None:
        return prompt
    parts = [base_prompt or "", *lora.triggers]
    return ", ".join(part.strip() for part in parts if part and part.strip())


def _check_inputs(loras: Sequence[LoRA], seeds: Sequence[int], threshold: float | None) -> list[LoRA]:
    """Fail before any image is made: profiling is slow, so a late error wastes minutes."""
    from .request import check_loras

    if not loras:
        raise OptionError("profile_loras needs at least one LoRA")
    if not seeds:
        raise OptionError("profile_loras needs at least one seed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise OptionError(f"seeds must be integers >= 0, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise OptionError(f"seeds must be distinct (a repeated seed repeats an image), got {list(seeds)}")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold)
    ):
        raise OptionError(f"threshold must be a finite number or None, got {threshold!r}")
    return list(check_loras(loras))


def profile_loras(
    pipe: Any,
    loras: list[LoRA],
    prompt: str | None,
    base_prompt: str,
    negative_prompt: str | None,
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    base_name: str,
    threshold: float | None = None,
    progress: bool = True,
) -> ProfileFile:
    """Generate ``len(seeds)`` images per LoRA alone and return their frequency profiles.

    ``prompt`` None means ``base_prompt, trigger1, trigger2, ...`` per LoRA. ``threshold`` is not
    used to compute anything here (the partition is made when the profile is used); it is stored
    in the settings so that the ranking printed now and a later reader can apply the same rule.
    Raises :class:`~cmlora.errors.OptionError` for an empty LoRA or seed list, repeated seeds,
    duplicate names, or two LoRAs with the same file content (one profile entry per file).
    """
    from tqdm.auto import tqdm

    from .api import Composer
    from .records import library_versions

    loras = _check_inputs(loras, seeds, threshold)
    seeds = [int(s) for s in seeds]
    # Hash up front: two paths with the same bytes would only fail when the file is built, after
    # all the generation work (ProfileFile refuses two entries with one sha256).
    hashes = {lora.adapter: sha256_file(lora.path) for lora in loras}
    seen: dict[str, str] = {}
    for name, sha in hashes.items():
        if sha in seen:
            raise OptionError(f"LoRAs {seen[sha]!r} and {name!r} are the same file content (sha256 {sha})")
        seen[sha] = name

    entries: list[LoRAProfileEntry] = []
    prompts: dict[str, str] = {}
    first_record: dict[str, Any] | None = None
    for lora in tqdm(loras, desc="profile", unit="LoRA", disable=not progress):
        alone = dataclasses.replace(lora, weight=PROFILE_LORA_STRENGTH)
        text = _prompt_for(lora, prompt, base_prompt)
        prompts[lora.adapter] = text
        with Composer(pipe, [alone]) as composer:
            result = composer.generate(
                prompt=text,
                method="merge",
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                seed=seeds,
                progress=False,
            )
        record = result.records[0]
        first_record = first_record or record
        sha = str(record["loras"][0]["sha256"])
        if sha != hashes[lora.adapter]:
            raise OptionError(
                f"LoRA file {lora.path} changed while it was being profiled (sha256 {hashes[lora.adapter]} "
                f"before, {sha} when loaded): profile it again once it is stable"
            )
        profiles = [radial_profile(image, n_bins=DEFAULT_N_BINS) for image in result.images]
        scores = [
            high_frequency_score(image, band=(HIGH_BAND_START, 1.0), n_bins=DEFAULT_N_BINS)
            for image in result.images
        ]
        entries.append(
            LoRAProfileEntry(
                name=lora.adapter,
                file=str(lora.path),
                sha256=sha,
                score=float(np.mean(scores)),
                radial_profile=[float(v) for v in np.mean(profiles, axis=0)],
                category=lora.category,
            )
        )

    assert first_record is not None  # loras is non-empty
    settings: dict[str, Any] = {
        "base_model": base_name,
        "pipeline": first_record.get("pipeline"),
        "prompt": prompt,
        "base_prompt": base_prompt,
        "prompt_template": prompt if prompt is not None else "{base_prompt}, {triggers}",
        "prompts": prompts,
        "negative_prompt": negative_prompt,
        "method": "merge",
        "lora_strength": PROFILE_LORA_STRENGTH,
        "seeds": seeds,
        "steps": steps,
        "guidance_scale": guidance_scale,
        # The size actually used (None in the call means the model's default size).
        "height": first_record.get("height"),
        "width": first_record.get("width"),
        "scheduler": first_record.get("scheduler"),
        "dtype": first_record.get("dtype"),
        "band_start": HIGH_BAND_START,
        "n_bins": DEFAULT_N_BINS,
        "score": SCORE_RULE,
        "threshold": threshold,
    }
    return ProfileFile(entries=entries, settings=settings, created_with=library_versions())


def _labels(profile: ProfileFile) -> list[str]:
    """Entry names, made unique: the file keys entries by sha256, so two may share a name, and
    the ranking and the plot must not merge them."""
    names = [entry.name for entry in profile.entries]
    return [
        f"{entry.name} [{entry.sha256[:8]}]" if names.count(entry.name) > 1 else entry.name
        for entry in profile.entries
    ]


def print_ranking(profile: ProfileFile, threshold: float | None = None) -> None:
    """Print the LoRAs high-frequency first, with the H/L split CMLoRA would use.

    ``threshold`` None falls back to the threshold stored in the file's settings, and then to the
    largest-gap rule of :func:`~cmlora.frequency.order_and_partition`; the line under the table
    says which rule made the split.
    """
    if not profile.entries:
        print("profile has no entries")
        return
    if threshold is None:
        stored = profile.settings.get("threshold")
        threshold = (
            float(stored) if isinstance(stored, int | float) and not isinstance(stored, bool) else None
        )
    labels = _labels(profile)
    by_label = dict(zip(labels, profile.entries, strict=True))
    order, high, low = order_and_partition({label: by_label[label].score for label in labels}, threshold)
    width = max(len("name"), *(len(label) for label in labels))
    cat_width = max(len("category"), *(len(e.category or "-") for e in profile.entries))
    print(f"{'rank':>4}  {'name':<{width}}  {'category':<{cat_width}}  {'score':>7}  group")
    for rank, label in enumerate(order, start=1):
        entry = by_label[label]
        group = "H" if label in high else "L"
        print(
            f"{rank:>4}  {label:<{width}}  {entry.category or '-':<{cat_width}}  {entry.score:>7.4f}  {group}"
        )
    rule = f"score >= {threshold:g}" if threshold is not None else "split at the largest score gap"
    print(f"H (high-frequency): {', '.join(high) or '-'}")
    print(f"L (low-frequency):  {', '.join(low) or '-'}")
    print(f"partition rule: {rule}")


def plot_profile(profile: ProfileFile, out_png: str | os.PathLike[str]) -> None:
    """One PNG with every entry's radial profile, the high band shaded and scores in the legend."""
    if not profile.entries:
        raise ValueError("plot_profile: the profile has no entries to plot")
    band_start = profile.settings.get("band_start", HIGH_BAND_START)
    if isinstance(band_start, bool) or not isinstance(band_start, int | float):
        band_start = HIGH_BAND_START
    curves = {
        label: entry.radial_profile for label, entry in zip(_labels(profile), profile.entries, strict=True)
    }
    plot_radial_profiles(curves, out_png, band_start=float(band_start))

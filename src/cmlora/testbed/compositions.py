"""Compositions of the ComposLoRA testbed and the per-image seeds of a sweep.

Order and ids are part of the benchmark's contract: results of two runs (or of two processes of
one sharded run) are joined by composition id, and every image's seed is derived from that id,
so nothing here may depend on dict iteration quirks, ``hash()`` randomisation or the process.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cmlora.testbed.info import CATEGORIES, InfoFileError, LoraEntry, is_safe_id

DEFAULT_SIZES: tuple[int, ...] = (2, 3, 4, 5)
"""Composition sizes of the published benchmark."""


@dataclass(frozen=True)
class Composition:
    """One benchmark prompt: a character plus one LoRA from each of N-1 other categories."""

    id: str
    style: str
    loras: tuple[LoraEntry, ...]
    prompt: str
    negative_prompt: str

    @property
    def n(self) -> int:
        """Number of LoRAs, the N the papers report results by."""
        return len(self.loras)

    @property
    def lora_ids(self) -> tuple[str, ...]:
        """Ids in composition order, which is also the adapter order a pipeline should use."""
        return tuple(entry.id for entry in self.loras)

    @property
    def categories(self) -> tuple[str, ...]:
        """Categories in composition order, for grouping results by category combination."""
        return tuple(entry.category for entry in self.loras)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for image records, so a record alone says what was asked for."""
        return {
            "composition_id": self.id,
            "style": self.style,
            "n": self.n,
            # the evaluation reads names, categories and triggers from here (CLIPScore text, judge)
            "loras": [
                {"name": e.id, "category": e.category, "triggers": list(e.trigger)} for e in self.loras
            ],
            "trigger_prompt": ", ".join(t for e in self.loras for t in e.trigger),
            "categories": list(self.categories),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
        }


def composition_id(style: str, loras: Sequence[LoraEntry]) -> str:
    """``<style>-n<N>-<id>+<id>+...``: readable, unique per style, and a safe file stem."""
    return f"{style}-n{len(loras)}-" + "+".join(entry.id for entry in loras)


def composition_prompt(base_prompt: str, loras: Iterable[LoraEntry]) -> str:
    """Base prompt, then every trigger phrase in composition order, all joined by ", "."""
    phrases = [phrase for entry in loras for phrase in entry.trigger]
    return ", ".join([base_prompt, *phrases] if base_prompt else phrases)


def enumerate_compositions(
    info: Mapping[str, Sequence[LoraEntry]],
    sizes: Iterable[int] = DEFAULT_SIZES,
    *,
    style: str,
    base_prompt: str = "",
    negative_prompt: str = "",
) -> list[Composition]:
    """Every composition of the given sizes, as COMPOSLORA.md defines them.

    Order: by N (in the order of ``sizes``), then by category combination (categories taken in
    :data:`CATEGORIES` order, combinations in lexicographic order), then by instance (character
    outermost). Duplicate sizes are dropped rather than producing duplicate compositions.
    """
    if not is_safe_id(style):
        raise InfoFileError(f"style {style!r} is not a safe file stem (it is part of every composition id)")
    unknown = [c for c in info if c not in CATEGORIES and not str(c).startswith("_")]
    if unknown:
        raise InfoFileError(f"unknown categories {unknown!r}; expected some of {list(CATEGORIES)}")
    characters = tuple(info.get("character", ()))
    if not characters:
        raise InfoFileError("the info has no 'character' LoRA; every composition needs one")
    others = [c for c in CATEGORIES if c != "character" and info.get(c)]

    result: list[Composition] = []
    for n in dict.fromkeys(sizes):
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(others) + 1:
            raise InfoFileError(
                f"composition size {n!r} is impossible with these categories: sizes go from 1 to "
                f"{len(others) + 1} (a character plus one LoRA of each of {others})"
            )
        for combo in itertools.combinations(others, n - 1):
            pools = [characters, *(tuple(info[c]) for c in combo)]
            for loras in itertools.product(*pools):
                result.append(
                    Composition(
                        id=composition_id(style, loras),
                        style=style,
                        loras=tuple(loras),
                        prompt=composition_prompt(base_prompt, loras),
                        negative_prompt=negative_prompt,
                    )
                )
    return result


def image_seed(base_seed: int, composition_id: str, seed_index: int) -> int:
    """Seed of one image, in ``[0, 2**31)``, a pure function of its arguments.

    A hash of the text rather than a counter, so that any image can be regenerated alone, a
    sharded run draws the same noise as a single process, and adding methods or compositions
    does not shift the seeds of the others. The method is deliberately not an input: all methods
    of a composition start from the same noise, so their images are directly comparable.
    """
    key = f"cmlora-seed:{int(base_seed)}:{composition_id}:{int(seed_index)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % (2**31)

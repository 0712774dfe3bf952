"""Reading scores out of a judge's reply, or refusing it.

A reply that cannot be parsed into valid scores is refused (:class:`MalformedReply`), never guessed
into a score, because a fabricated score would bias win rates silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import MalformedReply

# A score in prose.  A minus sign is kept (so "-1" is rejected as out of range, not read as 1), a hyphen
# only separates when a space follows it, and arithmetic is never cut short: "10 - 3 = 7" is read as its
# result, 7, while "10 - 3" alone (or "7 - 2 missing") matches nothing, so the reply counts as malformed.
_NUM = r"(-?\d+(?:\.\d+)?)(?!\.?\d)(?!\s*[-+*\u2212\u00d7]\s*\d)"
_EXPR = r"(?:\d+(?:\.\d+)?(?:\s*[-+\u2212]\s*\d+(?:\.\d+)?)+\s*=\s*)?"
_SEP = r"\s*(?:score)?\s*(?:[:=]|is|of|-(?=\s)|\u2013|\u2014)?\s*"
_COMP_RE = re.compile(r"composition(?:\s+quality)?" + _SEP + _EXPR + _NUM + r"(?:\s*/\s*10)?", re.IGNORECASE)
_QUAL_RE = re.compile(r"(?:image\s+)?quality" + _SEP + _EXPR + _NUM + r"(?:\s*/\s*10)?", re.IGNORECASE)
_HEAD_RE = re.compile(r"\b(?:image|img)\s*(?:#\s*)?([12])\b", re.IGNORECASE)


def _norm_key(key: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


_IMAGE_KEYS = {"image1": 1, "img1": 1, "1": 1, "first": 1, "image2": 2, "img2": 2, "2": 2, "second": 2}
_COMP_KEYS = {"composition", "compositionquality", "compositionscore", "comp"}
_QUAL_KEYS = {"image", "imagequality", "quality", "imagescore", "imagequalityscore", "qualityscore"}


def _valid_score(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise MalformedReply(f"score {value!r} is not a number")
    if isinstance(value, str):
        text = value.strip().removesuffix("/10").strip()
        try:
            value = float(text)
        except ValueError:
            raise MalformedReply(f"score {value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise MalformedReply(f"score {value!r} is not a number")
    score = float(value)
    if not math.isfinite(score) or score < 0.0 or score > 10.0:
        raise MalformedReply(f"score {value!r} is outside 0-10")
    if abs(score * 2.0 - round(score * 2.0)) > 1e-6:
        raise MalformedReply(f"score {value!r} is not a multiple of 0.5")
    return round(score * 2.0) / 2.0


def _scores_from_obj(obj: Mapping[str, Any]) -> dict[int, dict[str, float]] | None:
    """Scores from one JSON object, or None when it does not look like a verdict at all."""
    if "scores" in obj and isinstance(obj["scores"], dict):
        obj = obj["scores"]
    per_image: dict[int, Mapping[str, Any]] = {}
    for key, value in obj.items():
        idx = _IMAGE_KEYS.get(_norm_key(key))
        if idx is not None and isinstance(value, dict):
            per_image[idx] = value
    if not per_image:
        return None
    if set(per_image) != {1, 2}:
        raise MalformedReply("verdict JSON does not score both images")
    out: dict[int, dict[str, float]] = {}
    for idx, dims in per_image.items():
        comp = [v for k, v in dims.items() if _norm_key(k) in _COMP_KEYS]
        qual = [v for k, v in dims.items() if _norm_key(k) in _QUAL_KEYS]
        if len(comp) != 1 or len(qual) != 1:
            raise MalformedReply(f"verdict JSON for image {idx} needs one composition and one image score")
        out[idx] = {"composition": _valid_score(comp[0]), "image": _valid_score(qual[0])}
    return out


def _json_objects(text: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    pos = 0
    while True:
        start = text.find("{", pos)
        if start < 0:
            return found
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        pos = end


def _scores_from_text(text: str) -> dict[int, dict[str, float]] | None:
    clean = re.sub(r"[*_`#>]", "", text)
    heads = list(_HEAD_RE.finditer(clean))
    out: dict[int, dict[str, float]] = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(clean)
        segment = clean[head.end() : end]
        comp = _COMP_RE.search(segment)
        if comp is None:
            continue
        # Blank out the composition match so "composition quality 7" is not read as image quality.
        rest = segment[: comp.start()] + " " * (comp.end() - comp.start()) + segment[comp.end() :]
        qual = _QUAL_RE.search(rest)
        if comp and qual:
            # Later segments win: the final summary comes after the analysis.
            out[int(head.group(1))] = {
                "composition": _valid_score(comp.group(1)),
                "image": _valid_score(qual.group(1)),
            }
    if set(out) == {1, 2}:
        return out
    return None


def parse_scores(text: str) -> dict[int, dict[str, float]]:
    """Both images' scores from a judge reply: ``{1: {composition, image}, 2: {...}}``.

    The last JSON verdict wins; without one, "Image 1: composition 7.5, image quality 8" style
    text is accepted.  A verdict with out-of-range or non-0.5-step values is rejected outright rather
    than falling back to prose, since a self-contradicting reply cannot be trusted.
    """
    if not isinstance(text, str) or not text.strip():
        raise MalformedReply("empty reply")
    for obj in reversed(_json_objects(text)):
        parsed = _scores_from_obj(obj)
        if parsed is not None:
            return parsed
    parsed = _scores_from_text(text)
    if parsed is None:
        raise MalformedReply("no scores for both images found in reply")
    return parsed

"""What the judge is asked: the published rubric, the per-composition prompt, the images, the cache key.

The rubric is the published protocol's (Zhong et al., CMLoRA), because win rates are only comparable
with the papers' when the judge is asked the same question. The cache key covers
everything that shapes the question, so an edit of the rubric can never be answered from the cache.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..runs import ManifestEntry, open_run_image

DIMENSIONS = ("composition", "image")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PROMPT_VERSION = "cmlora-judge-v1"

SYSTEM_PROMPT = (
    "You are a meticulous, impartial expert judge of AI-generated images that must combine several "
    "concepts (characters, clothing, styles, backgrounds, objects) into one picture. You follow the "
    "scoring rubric exactly and you never let the order in which images are shown influence you."
)

_RUBRIC = """\
Score EACH image independently from 0 to 10 in steps of 0.5 on two dimensions. Start every score at \
10 and deduct points:

Composition quality (does the image contain the listed elements, correctly and together?):
- deduct 3 points for each element that is missing or wrong;
- deduct 1 point for each missing or wrong feature of an element (e.g. hair colour, an outfit detail, \
a trait of the style, a part of the background or object);
- deduct 1 point if the elements are combined disharmoniously (they do not fit naturally into one \
coherent scene).

Image quality (is the image well made, regardless of the composition?):
- deduct 3 points for each deformity (e.g. malformed hands, faces, limbs, bodies or objects);
- deduct 2 points for problems with texture, lighting or colour;
- deduct 1 point for each minor flaw.

A score never goes below 0. Use the same standard for both images, so that images of equal quality \
receive equal scores.

First write a short analysis of Image 1 and of Image 2 (which elements and features are present or \
missing, which flaws you see). Then finish your reply with exactly one JSON block in this form, with \
numbers, not strings:
```json
{"image_1": {"composition": 0.0, "image": 0.0}, "image_2": {"composition": 0.0, "image": 0.0}}
```"""


def build_prompt(entry: ManifestEntry) -> str:
    """The instruction text for one composition: its elements, then the published rubric."""
    lines = [
        f"Two images were generated for the same composition of {len(entry.loras)} elements, each by a "
        "different method. The composition's elements are (category: name; trigger words):"
    ]
    for i, lora in enumerate(entry.loras, start=1):
        triggers = ", ".join(f'"{t}"' for t in lora.triggers) or "(none)"
        lines.append(f"{i}. {lora.category or 'element'}: {lora.name}; triggers: {triggers}")
    lines.append("")
    lines.append(_RUBRIC)
    return "\n".join(lines)


def _png_bytes(path: Path) -> bytes:
    open_run_image(path)  # a truncated or corrupt image is refused by name, never sent
    data = path.read_bytes()
    if data.startswith(PNG_SIGNATURE):
        return data
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def build_messages(prompt: str, images_png: Sequence[bytes]) -> list[dict[str, Any]]:
    """Chat messages with the images inline as base64 PNG data URLs (no hosting needed)."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    for i, png in enumerate(images_png, start=1):
        content.append({"type": "text", "text": f"Image {i}:"})
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def cache_key(model: str, prompt: str, image_hashes: Sequence[str]) -> str:
    """Key of a reply in the cache; includes the system prompt version so rubric edits invalidate it."""
    blob = json.dumps(
        {
            "v": _PROMPT_VERSION,
            "model": model,
            "system": SYSTEM_PROMPT,
            "prompt": prompt,
            "images": list(image_hashes),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

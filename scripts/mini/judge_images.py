"""Judge images made with the mini world's LoRAs (e.g. the README's main command): for each PNG, the
concepts its record's LoRAs promise and whether the judge detects each, with graded and artifact
scores, then per concept the number of images that show it.

    python scripts/mini/judge_images.py outputs/*.png
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from cmlora.mini import detectors, world
from cmlora.records import read_record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", help="PNGs written by cmlora generate with mini-world LoRAs")
    a = ap.parse_args(argv)
    from PIL import Image

    promised = [
        [lora["name"] for lora in read_record(path)["loras"] if lora["name"] in world.CONCEPT_BY_ID]
        for path in a.images
    ]
    verdict = detectors.judge([Image.open(p).convert("RGB") for p in a.images])
    shown: Counter[str] = Counter()
    for k, (path, ids) in enumerate(zip(a.images, promised, strict=True)):
        found = verdict.detected(k)
        marks = []
        for cid in ids:
            hit = found[world.CONCEPT_BY_ID[cid]["category"]] == cid
            shown[cid] += hit
            marks.append(f"{cid} {'yes' if hit else 'no'} (graded {verdict.graded_of(k, cid):.2f})")
        print(f"{path}: {', '.join(marks)}; artifact {verdict.artifact[k]:.2f}")
    concepts = sorted({c for ids in promised for c in ids}, key=world.CONCEPT_IDS.index)
    print("shown in: " + ", ".join(f"{c} {shown[c]}/{len(a.images)}" for c in concepts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

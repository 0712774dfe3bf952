"""Draw the mini world's concept sheet (docs/mini_concepts.png): per concept, one row of renders of
the concept, the same scenes with only its known parts (what its descriptive tags ask of the base
model), and its LoRA training renders with their incidental traits.

    python scripts/mini/concept_sheet.py [--out docs/mini_concepts.png]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cmlora.mini import render, world  # noqa: E402


def known_parts_only(scene: world.Scene, cid: str) -> world.Scene:
    """The scene with the concept's new detail taken out: the parts the base model knows."""
    detail = world.CONCEPT_BY_ID[cid]["detail"]
    return replace(scene, details=tuple(d for d in scene.details if d != detail))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/mini_concepts.png")
    a = ap.parse_args()
    cols = ["concept", "concept", "concept", "known parts only", "training render", "training render"]
    fig, axes = plt.subplots(len(world.CONCEPT_IDS), len(cols), figsize=(len(cols) * 1.25, 13.5))
    for r, cid in enumerate(world.CONCEPT_IDS):
        cat = world.CONCEPT_BY_ID[cid]["category"]
        scenes = [world.sample_scene(random.Random(seed), {cat: cid}) for seed in (1, 2, 3)]
        known = known_parts_only(scenes[0], cid)
        traits = [world.sample_scene(random.Random(seed), {cat: cid}, p_traits=1.0) for seed in (6, 7)]
        for c, scene in enumerate([*scenes, known, *traits]):
            ax = axes[r, c]
            ax.imshow(render.render(scene), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=7)
        trigger = world.CONCEPT_BY_ID[cid]["trigger"]
        axes[r, 0].set_ylabel(f"{cid}\n{trigger[0]}\n+ {world.CONCEPT_BY_ID[cid]['detail']}", fontsize=6)
    fig.suptitle("Mini world 2: 11 concepts = known parts + one new detail", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

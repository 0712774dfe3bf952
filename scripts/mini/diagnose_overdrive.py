"""Which half of a LoRA sets its strength curve: its UNet layers or its text-encoder layers.

    python scripts/mini/diagnose_overdrive.py --out overdrive.json [--loras character_2 clothing_2]
    python scripts/mini/diagnose_overdrive.py --out scaled.json --factors 0.8:1.5 1:2

The check merges a LoRA's UNet and text-encoder layers at one strength. A LoRA that overdrives at 1.5
(recall falls, decoded values leave [-1, 1]) or shows too little at 0.5 may owe it to either half: the
text encoder's layers move the trigger's embedding, the UNet's draw the concept. Per LoRA and strength s
(0.5 and 1.5, and 1.0 for both), the check's recall and clipped share for three merges: both halves at s,
the UNet at s with the text encoder at 1, and the UNet at 1 with the text encoder at s. Same prompt,
seeds, steps and guidance as the check's strength section, so "both at s" repeats its figures.

``--factors U:T`` instead merges, at each strength s, the UNet's layers at U x s and the text encoder's
at T x s: the curve a LoRA whose halves were U and T times as strong would have, if training more or
less moved a half's weights in proportion (it need not, so a factor found here is a hypothesis to train).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch

from cmlora import files, mini
from cmlora.mini import detectors, world

HERE = os.path.dirname(os.path.abspath(__file__))


def load_check_world():
    spec = importlib.util.spec_from_file_location("check_world", os.path.join(HERE, "check_world.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def merges(strength: float, factors: list[tuple[float, float]] | None) -> dict[str, tuple[float, float]]:
    """(UNet weight, text-encoder weight) per merge at one strength."""
    if factors:
        return {f"x{u:g}:{t:g}": (u * strength, t * strength) for u, t in factors}
    if strength == 1.0:
        return {"both": (1.0, 1.0)}
    return {"both": (strength, strength), "unet_only": (strength, 1.0), "te_only": (1.0, strength)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--loras", nargs="+", default=["character_2", "clothing_2", "style_1", "object_1"])
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--factors",
        nargs="+",
        metavar="U:T",
        help="merge the UNet at U x s and the text encoder at T x s instead of the split merges",
    )
    a = ap.parse_args()
    factors = None
    if a.factors:
        try:
            factors = [tuple(float(x) for x in f.split(":")) for f in a.factors]
        except ValueError:
            factors = []
        if not factors or any(len(f) != 2 or min(f) <= 0 for f in factors):
            ap.error(f"--factors {' '.join(a.factors)}: give positive pairs UNET:TE, e.g. 0.8:1.5")
    unknown = [c for c in a.loras if c not in world.CONCEPT_IDS]
    if unknown:
        ap.error(f"--loras {' '.join(unknown)}: no such LoRA; use {' '.join(world.CONCEPT_IDS)}")
    torch.set_num_threads(a.threads)
    check = load_check_world()
    gen = check.Generator(mini.STEPS, mini.GUIDANCE)
    seeds = list(range(a.seeds))
    out = {"assets": mini.assets_dir(), "seeds": a.seeds, "factors": a.factors, "loras": {}}
    for cid in a.loras:
        rows = {}
        for st in a.strengths:
            for name, (wu, wt) in merges(st, factors).items():
                images, clipped = gen(world.trigger_prompt([cid]), seeds, ((cid, wu, wt),))
                recall = detectors.judge(images).recall(cid)
                rows[f"{name}@{st:g}"] = {"unet": wu, "te": wt, "recall": recall, "clipped": clipped}
                print(
                    f"{cid:13s} unet {wu:.2f} te {wt:.2f}  recall {recall:.2f}  clipped {clipped:6.2%}",
                    flush=True,
                )
        out["loras"][cid] = rows
    files.atomic_write_bytes(a.out, (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()

"""Where the clipped pixels of the strength check come from: the VAE's round trip of each concept's
own renders, or what the base and a LoRA generate.

    python scripts/mini/diagnose_clipping.py --out clipping.json

The check counts a LoRA at strength 1.5 only with < 5 % of decoded values outside [-1, 1], as a sign of
overdrive. If the VAE already decodes a concept's clean renders outside that range, part of the count is
the decoder's, not the LoRA's. Per concept (and for generic scenes): the share of decoded values outside
[-1, 1] after encoding and decoding 40 renders (with the concept's incidental traits, as LoRA training
data), and the share of render values at 0 or 255. Compare with ``clipped_*`` per strength in the check.

    python scripts/mini/diagnose_clipping.py --out clipping.json --generated style_1:0.5 style_1:1.5

``--generated LORA:STRENGTH`` also generates, as the strength check does (its prompt, seeds, steps and
guidance), and counts decoded values above 1 and below -1 apart, per channel and per image: which side
of the range a LoRA's clipped pixels are on, how far beyond it they go (the shares beyond 1 + 1/32, 1/16
and 1/8 in either direction) and how many lie in the image's outer two-pixel ring (where the ink style
draws its frame). Strength 0 is the base alone with that LoRA's prompt: what the base draws there before
any LoRA. ``--guidance`` replaces the check's guidance scale, to see how much of a clipped share the
guidance's extrapolation adds.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from cmlora import files, mini
from cmlora.mini import render, world
from cmlora.mini.train import u8_to_t


@torch.no_grad()
def round_trip_clipped(vae, arrays: list[np.ndarray]) -> tuple[float, float]:
    x = u8_to_t(np.stack(arrays))
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return float((y.abs() > 1).float().mean()), float((x.abs() >= 0.999).float().mean())


#: How far beyond [-1, 1] a decoded value goes, in [-1, 1] units (1/32 is four 8-bit levels).
MARGINS = (1 / 32, 1 / 16, 1 / 8)


def sides(x: torch.Tensor) -> dict:
    """Shares of decoded values above 1 and below -1, over all values, per channel and per image; the
    shares beyond each margin of ``MARGINS``; the share of clipped values in the outer two-pixel ring."""
    out = (x.abs() > 1).float()
    ring = torch.ones(x.shape[-2:], dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    return {
        "above_1": float((x > 1).float().mean()),
        "below_-1": float((x < -1).float().mean()),
        "beyond": {f"{m:g}": float((x.abs() > 1 + m).float().mean()) for m in MARGINS},
        "clipped_in_ring": float(out[..., ring].sum() / out.sum().clamp_min(1)),
        "per_channel": [float(out[:, c].mean()) for c in range(x.shape[1])],
        "per_image": [float(out[i].mean()) for i in range(x.shape[0])],
    }


def parse_generated(ap: argparse.ArgumentParser, items: list[str]) -> list[tuple[str, float]]:
    pairs = []
    for item in items:
        cid, _, strength = item.partition(":")
        try:
            value = float(strength)
        except ValueError:
            value = -1.0
        if cid not in world.CONCEPT_IDS or value < 0:
            ap.error(
                f"--generated {item}: give LORA:STRENGTH with a LoRA of the mini world "
                f"({' '.join(world.CONCEPT_IDS)}) and a strength of 0 (the base alone) or more, e.g. "
                "style_1:1.5"
            )
        pairs.append((cid, value))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the shares")
    ap.add_argument("--renders", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generated", nargs="*", default=[], metavar="LORA:STRENGTH")
    ap.add_argument("--seeds", type=int, default=20, help="images per --generated pair (the check's 20)")
    ap.add_argument(
        "--guidance", type=float, default=mini.GUIDANCE, help="guidance scale (the check's by default)"
    )
    a = ap.parse_args()
    generated = parse_generated(ap, a.generated)
    torch.set_num_threads(a.threads)
    vae = mini.load_pipeline().vae
    rows = [("generic", None)] + [(c, {world.CONCEPT_BY_ID[c]["category"]: c}) for c in world.CONCEPT_IDS]
    out = {"assets": mini.assets_dir(), "renders": a.renders, "concepts": {}}
    for name, concepts in rows:
        scenes = [
            world.sample_scene(random.Random(9_000_000 + s), concepts, 0.0, 1.0 if concepts else 0.0)
            for s in range(a.renders)
        ]
        decoded, extreme = round_trip_clipped(vae, [render.render_array(s) for s in scenes])
        out["concepts"][name] = {"decoded_clipped": decoded, "render_extreme": extreme}
        print(f"{name:14s} decoded outside [-1, 1] {decoded:6.2%}   render values at 0/255 {extreme:6.2%}")
    if generated:
        import check_world  # beside this script: the strength check's generator

        gen = check_world.Generator(mini.STEPS, a.guidance)
        out["guidance"] = a.guidance
        out["generated"] = {}
        for cid, strength in generated:
            loras = ((cid, strength),) if strength else ()
            x = gen.decoded(world.trigger_prompt([cid]), list(range(a.seeds)), loras)
            row = out["generated"][f"{cid}:{strength:g}"] = sides(x)
            beyond = "  ".join(f"beyond +{m} {v:6.2%}" for m, v in row["beyond"].items())
            print(
                f"{cid}:{strength:g}  above 1 {row['above_1']:6.2%}  below -1 {row['below_-1']:6.2%}  {beyond}  "
                f"in the outer ring {row['clipped_in_ring']:6.1%}"
            )
    files.atomic_write_bytes(a.out, (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()

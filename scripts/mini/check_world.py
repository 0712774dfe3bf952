"""Measure the mini world: detector accuracy (+ confusion tables) on held-out renders, and for every LoRA
the detection rate of its concept with the LoRA alone vs with the base model alone.

    python scripts/mini/check_world.py [--seeds 20] [--steps 20] [--cfg 5] [--out /tmp/mini_check] [--only ID ...]
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
import torch

from cmlora import mini
from cmlora.mini import detectors, lora_utils, world


def detector_report(n: int, roundtrip_vae=None):
    imgs, labels = [], []
    for i in range(n):
        s = world.sample_scene(random.Random(90_000_000 + i), None, p_concept=0.5)
        imgs.append(world.render(s))
        labels.append(s.labels())
    if roundtrip_vae is not None:
        from cmlora.mini.train import vae_roundtrip

        arr = vae_roundtrip(roundtrip_vae, np.stack([np.asarray(im) for im in imgs]))
        from PIL import Image

        imgs = [Image.fromarray(a) for a in arr]
    preds = detectors.detect(imgs)
    accs = {}
    for cat in world.CATEGORIES:
        cls = detectors.CLASSES[cat]
        conf = np.zeros((len(cls), len(cls)), int)
        for p, y in zip(preds, labels, strict=True):
            conf[cls.index(y[cat]), cls.index(p[cat])] += 1
        accs[cat] = np.trace(conf) / conf.sum()
        names = [str(c) for c in cls]
        print(f"  {cat}: accuracy {accs[cat]:.4f}  (rows = truth, cols = predicted)")
        print("    " + " " * 13 + "".join(f"{c:>13}" for c in names))
        for i, r in enumerate(conf):
            print("    " + f"{names[i]:>13}" + "".join(f"{v:>13}" for v in r))
    return accs


@torch.no_grad()
def generate(pipe, prompt, neg, seeds, steps, cfg):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompt=[prompt] * len(seeds),
        negative_prompt=[neg] * len(seeds),
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=gens,
        height=64,
        width=64,
    ).images


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=mini.STEPS)
    ap.add_argument("--cfg", type=float, default=mini.GUIDANCE)
    ap.add_argument("--n-detector", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/mini_check")
    ap.add_argument("--skip-detectors", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, metavar="ID", help="check only these LoRAs")
    a = ap.parse_args()
    unknown = sorted(set(a.only or ()) - set(world.CONCEPT_IDS))
    if unknown:
        ap.error(f"unknown LoRA ids {unknown}; the mini world has {list(world.CONCEPT_IDS)}")
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    pipe = mini.load_pipeline()
    if not a.skip_detectors:
        print(f"== detector accuracy on {a.n_detector} held-out rendered images (seeds 90000000+)")
        accs = detector_report(a.n_detector)
        print("  per-category accuracy:", {k: round(float(v), 4) for k, v in accs.items()})
        print("== detector accuracy on the same images after a VAE round trip")
        accs = detector_report(a.n_detector, pipe.vae)
        print("  per-category accuracy:", {k: round(float(v), 4) for k, v in accs.items()})
    p = mini.prompts()
    neg = p["negative_prompt"]
    seeds = list(range(a.seeds))
    base_unet = pipe.unet
    rows = []
    print(
        f"== single LoRA vs base: {a.seeds} seeds, DPM-Solver++ {a.steps} steps, CFG {a.cfg}, prompt = base + triggers"
    )
    for cid in a.only or world.CONCEPT_IDS:
        cat = world.CONCEPT_BY_ID[cid]["category"]
        prompt = world.trigger_prompt([cid])
        pipe.unet = base_unet
        base_imgs = generate(pipe, prompt, neg, seeds, a.steps, a.cfg)
        pipe.unet = lora_utils.merged_unet(base_unet, [(mini.lora_path(cid), 1.0)])
        lora_imgs = generate(pipe, prompt, neg, seeds, a.steps, a.cfg)
        pipe.unet = base_unet
        db = detectors.detect(base_imgs)
        dl = detectors.detect(lora_imgs)
        rb = np.mean([d[cat] == cid for d in db])
        rl = np.mean([d[cat] == cid for d in dl])
        # other categories: how often the LoRA image shows some *other* concept (leakage)
        leak = np.mean([any(d[c] is not None for c in world.CATEGORIES if c != cat) for d in dl])
        rows.append((cid, rl, rb, leak))
        world.grid(lora_imgs + base_imgs, cols=10).save(os.path.join(a.out, f"{cid}.png"))
        print(
            f"  {cid:13s} prompt={prompt!r:60s} LoRA {rl:5.0%}  base {rb:5.0%}  (LoRA imgs with another concept: {leak:.0%})",
            flush=True,
        )
    ok = all(r[1] >= 0.8 and r[2] <= 0.1 for r in rows)
    print(
        f"== summary: min LoRA rate {min(r[1] for r in rows):.0%}, max base rate {max(r[2] for r in rows):.0%}; "
        f"criteria (LoRA >= 80%, base <= 10%) {'MET' if ok else 'NOT met'}; grids in {a.out}; {time.time() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()

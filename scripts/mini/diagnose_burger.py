"""Why the base model alone shows the burger (the one concept missing partial knowledge): what the
judge reads as the burger's filling, and where the base's images come from.

    python scripts/mini/diagnose_burger.py [--out /tmp/burger]

Three measurements, each the judge's burger rate and mean graded score over one set of images:
1. the base model's images for the composition prompt (`world.trigger_prompt(["object_2"])`, 40 seeds);
2. renders of plain bread (no filling) with one or two of the filling's colour bands painted on, and
   pixel blends of bread with the other generic objects (is the base drawing an average object?);
3. plain bread through the VAE, from clean, noisy, blurred and shrunk latents (does the decoder paint
   the filling back in from a degraded latent?).
Grids of the images go to --out.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from cmlora import mini
from cmlora.mini import detectors, render, world


def rate(images: list[Image.Image]) -> tuple[float, float]:
    j = detectors.judge(images)
    return j.recall("object_2"), j.mean_graded("object_2")


def save_grid(images: list[Image.Image], path: str) -> None:
    g = render.grid(images[:8])
    g.resize((g.width * 3, g.height * 3), Image.NEAREST).save(path)


def bread_scenes(n: int) -> list[world.Scene]:
    return [
        replace(world.sample_scene(random.Random(91_000_000 + i)), thing="bread", details=())
        for i in range(n)
    ]


def with_bands(s: world.Scene, bands) -> np.ndarray:
    """A bread render with horizontal bands across the bun, where the filling would be."""
    img = render.render_array(s).copy()
    ox, oy = render.object_center(s)
    for color, y0, y1 in bands:
        img[oy + y0 : oy + y1, ox - 7 : ox + 8] = color
    return img


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/burger")
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--renders", type=int, default=200)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    pipe = mini.load_pipeline()
    pipe.set_progress_bar_config(disable=True)

    prompt = world.trigger_prompt(["object_2"])
    base = [
        pipe(
            prompt,
            num_inference_steps=mini.STEPS,
            guidance_scale=mini.GUIDANCE,
            generator=torch.Generator().manual_seed(s),
            height=64,
            width=64,
        ).images[0]
        for s in range(a.seeds)
    ]
    det, gr = rate(base)
    print(f"1. base model, {prompt!r}, {a.seeds} seeds: burger {det:.2f}, graded {gr:.2f}")
    save_grid(base, os.path.join(a.out, "base.png"))

    scenes = bread_scenes(a.renders)
    print(f"2. renders of plain bread ({a.renders} scenes) with bands or blended with other objects")
    bands = {
        "bread": [],
        "bread + a lettuce band": [(render.LETTUCE, 3, 5)],
        "bread + a patty band": [(render.PATTY, 3, 5)],
        "bread + a cheese band": [(render.CHEESE, 3, 5)],
        "bread + lettuce and patty bands": [(render.LETTUCE, 2, 4), (render.PATTY, 4, 6)],
    }
    for name, b in bands.items():
        images = [with_bands(s, b) for s in scenes]
        det, gr = rate([Image.fromarray(x) for x in images])
        print(f"   {name:34s} burger {det:.2f}, graded {gr:.2f}")
    others = {
        "bread and flower, averaged": [dict(thing="flower", thing_color="red")],
        "bread, flower and box, averaged": [dict(thing="flower", thing_color="red"), dict(thing="box")],
    }
    for name, extra in others.items():
        images = [
            np.mean(
                [render.render_array(s).astype(np.float32)]
                + [render.render_array(replace(s, **e)).astype(np.float32) for e in extra],
                axis=0,
            ).astype(np.uint8)
            for s in scenes
        ]
        det, gr = rate([Image.fromarray(x) for x in images])
        print(f"   {name:34s} burger {det:.2f}, graded {gr:.2f}")

    print("3. plain bread through the VAE")
    x = detectors.images_to_tensor([render.render_array(s) for s in scenes])
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean
        sd = z.std()
        latents = {
            "clean latent": z,
            "latent + noise 0.4 sd": z + 0.4 * sd * torch.randn_like(z),
            "latent blurred 3x3": torch.nn.functional.avg_pool2d(z, 3, 1, 1),
            "latent x 0.8": z * 0.8,
        }
        for name, zz in latents.items():
            y = pipe.vae.decode(zz).sample
            images = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            det, gr = rate([Image.fromarray(i) for i in images])
            print(f"   {name:34s} burger {det:.2f}, graded {gr:.2f}")
    print(f"grids in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

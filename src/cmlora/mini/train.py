"""Train every mini-world asset on a CPU with fixed seeds.

    python -m cmlora.mini.train vae        --work /tmp/mini_build
    python -m cmlora.mini.train detectors  --work /tmp/mini_build      # uses the VAE for round-trip augmentation
    python -m cmlora.mini.train base       --work /tmp/mini_build      # writes assets/pipeline
    python -m cmlora.mini.train loras      --work /tmp/mini_build      # writes assets/loras/*.safetensors
    python -m cmlora.mini.train all        --work /tmp/mini_build

Step counts are arguments; defaults are the ones used for the committed assets.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write_bytes
from . import assets_dir, components, detectors, render, world

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
#: Categories whose LoRAs also train the resnets' 3x3 convolutions, as kohya's conv LoRAs
#: (LoCon-style ``conv_dim``) do for textures and styles: none by default (``--lora-conv`` chooses).
#: Mini world 1 added them for clothing, styles and backgrounds, which attention and feed-forward
#: layers seemed to express badly; rebuild try 9 found that without them the trigger's change to
#: the prediction grows against the empty prompt's, a convolution seeing no text, and that the same
#: concepts show as well (docs/mini_world_tries.md).
CONV_CATEGORIES: tuple[str, ...] = ()


def lora_targets(category: str, conv_categories=CONV_CATEGORIES) -> list[str]:
    """The UNet modules a category's LoRA trains."""
    return LORA_TARGETS + (["conv1", "conv2"] if category in conv_categories else [])


class LoRASchedule(NamedTuple):
    """Factors on the default LoRA steps and learning rate, and the noise offset (kohya's
    ``--noise_offset``: a per-image, per-channel constant added to the training noise, which lets a
    model move an image's mean colour; noise of zero mean per image barely teaches that)."""

    steps: float = 1.0
    lr: float = 1.0
    noise_offset: float = 0.0


#: Styles and backgrounds recolour the whole image: a noise offset lets their LoRAs move an image's
#: mean colour (the mini README says what mini world 1 measured with and without it).
#: ``--lora-noise-offset`` chooses the categories; its default is these, the shipped LoRAs'.
NOISE_OFFSET = 0.1
NOISE_OFFSET_CATEGORIES = ("style", "background")
CATEGORY_SCHEDULE = {
    # An object covers a small part of the image, so the per-pixel loss teaches it slowest.
    "object": LoRASchedule(steps=1.5),
}


#: LoRAs that draw their training strength from their own range instead of ``--lora-strengths``,
#: keyed by a category (all its LoRAs) or a LoRA id (that LoRA alone, over its category's range);
#: ``--lora-strengths-for`` adds or replaces entries. The drawn range moves where a LoRA shows rather
#: than widening it (rebuild tries 7 and 11), so a LoRA that misses 1.5 gets a higher range and one
#: that misses 0.5 a lower one.
#: Styles trained on 0.5-1 overdrove at strength 1.5 while they read fully at 0.5; on 0.5-1.5 they
#: hold at all three (rebuild try 12 of docs/mini_world_tries.md). The tin robot missed 0.5, the wizard
#: and the snowy mountains missed 1.5; their own ranges fixed all three (rebuild try 15). The sunset's
#: and the flower's moved their misses rather than removing them (rebuild try 16).
STRENGTH_RANGES: dict[str, tuple[float, float]] = {
    "style": (0.5, 1.5),
    "character_1": (0.35, 1.0),
    "character_3": (0.5, 1.5),
    "background_1": (0.25, 1.25),
    "background_2": (0.5, 1.5),
    "object_1": (0.5, 1.5),
}


#: LoRAs whose prior half has another share of empty prompts than ``--lora-uncaptioned``, keyed as
#: ``STRENGTH_RANGES``; ``--lora-uncaptioned-for`` adds or replaces entries. The sunset's LoRA moved the
#: empty prompt's prediction more than any other (cond/uncond 1.80); a heavier prior fixed that but hid
#: it at half strength (rebuild tries 17 and 18), while empty prompts alone in its prior half, which hold
#: exactly what the criterion measures, fixed it and kept every strength (tries 21 and 22). On the base
#: of rebuild try 24 the same share let the checkerboard outfit and the flower show at half strength and
#: the burger at 1.5 (try 27); on try 22's base it had cost merge interference (try 23).
UNCAPTIONED_SHARES: dict[str, float] = {
    "background_1": 1.0,
    "clothing_2": 1.0,
    "object_1": 1.0,
    "object_2": 1.0,
}


#: LoRAs whose UNet layers learn at another rate than their text-encoder layers (kohya's ``--unet_lr``
#: beside ``--text_encoder_lr``), as a factor on the LoRA's learning rate, keyed as ``STRENGTH_RANGES``;
#: ``--lora-unet-lr-for`` adds or replaces entries. Empty: both halves learn at one rate.
UNET_LR_FACTORS: dict[str, float] = {}

#: The same for the text-encoder layers (kohya's ``--text_encoder_lr``); ``--lora-te-lr-for``. The cat
#: girl's UNet half overdrove at strength 1.5 (clipped pixels) while her text-encoder half worked over a
#: wide window; a faster text encoder carries more of her and her window widened with it until she
#: passed every strength without clipping (rebuild tries 34 and 35, figures on the tries page). The ink
#: style's entry came with try 35 and moved none of its criteria; it stays because that world was checked.
TE_LR_FACTORS: dict[str, float] = {"character_2": 3.0, "style_1": 2.0}


#: LoRAs trained for another multiple of ``--lora-steps`` than their category's (``CATEGORY_SCHEDULE``),
#: keyed as ``STRENGTH_RANGES``; ``--lora-steps-for`` adds or replaces entries. Empty: the category's.
STEP_FACTORS: dict[str, float] = {}


#: LoRAs trained at another rank than ``--lora-rank`` (kohya's ``--network_dim``; alpha follows the rank,
#: so the strength scale stays 1), keyed as ``STRENGTH_RANGES``; ``--lora-rank-for`` adds or replaces
#: entries. Empty: every LoRA at ``--lora-rank``.
RANKS: dict[str, float] = {}


#: LoRAs whose every layer's weight change is held to a Frobenius norm (kohya's ``--scale_weight_norms``,
#: `apply_max_norm`), keyed as ``STRENGTH_RANGES``; ``--lora-max-norm-for`` adds or replaces entries.
#: Empty: no bound.
MAX_NORMS: dict[str, float] = {}


def for_lora(lora_id: str, table: dict, default):
    """A LoRA's own entry of a per-LoRA table, else its category's, else ``default``."""
    category = world.CONCEPT_BY_ID[lora_id]["category"]
    return table.get(lora_id, table.get(category, default))


def lora_rank(lora_id: str, rank: int, ranks: dict[str, float]) -> int:
    """A LoRA's rank: its own or its category's entry of ``ranks``, else ``rank``."""
    return int(for_lora(lora_id, ranks, rank))


def lora_strength_range(
    lora_id: str, strengths: tuple[float, float], ranges: dict[str, tuple[float, float]]
) -> tuple[float, float]:
    """The range a LoRA draws its training strength from: its own, else its category's, else
    ``strengths``."""
    return tuple(for_lora(lora_id, ranges, strengths))


def lora_schedule(lora_id: str, offset_keys=NOISE_OFFSET_CATEGORIES) -> LoRASchedule:
    """A LoRA's step and learning-rate factors (its category's) and its noise offset, on when
    ``offset_keys`` names the LoRA or its category."""
    category = world.CONCEPT_BY_ID[lora_id]["category"]
    schedule = CATEGORY_SCHEDULE.get(category, LoRASchedule())
    offset = category in offset_keys or lora_id in offset_keys
    return schedule._replace(noise_offset=NOISE_OFFSET if offset else 0.0)


def lora_step_count(lora_id: str, steps: int, step_factors: dict[str, float]) -> int:
    """A LoRA's training steps: ``steps`` times its own factor, else its category's in ``step_factors``,
    else its category's schedule's."""
    category = world.CONCEPT_BY_ID[lora_id]["category"]
    return round(
        steps * for_lora(lora_id, step_factors, CATEGORY_SCHEDULE.get(category, LoRASchedule()).steps)
    )


#: kohya's default text-encoder LoRA targets for SD-1.5 (CLIP attention and MLP).
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def render_pool(n: int, seed0: int, p_concept: float = 0.0, concepts=None):
    imgs, scenes = [], []
    for i in range(n):
        rng = random.Random(seed0 + i)
        s = world.sample_scene(rng, concepts, p_concept)
        imgs.append(render.render_array(s))
        scenes.append(s)
    return np.stack(imgs), scenes


def near_miss_pool(n: int, seed0: int):
    """``n`` near misses, the concepts in turn: a scene with the concept (other categories drawn as for
    the judge) but without its new detail (``world.without_detail``)."""
    scenes = []
    for i in range(n):
        cid = world.CONCEPT_IDS[i % len(world.CONCEPT_IDS)]
        cat = world.CONCEPT_BY_ID[cid]["category"]
        s = world.sample_scene(random.Random(seed0 + i), {cat: cid}, p_concept=0.5)
        scenes.append(world.without_detail(s, cat))
    return np.stack([render.render_array(s) for s in scenes]), scenes


def cosine_lr(opt, step, total, base_lr, warmup=100):
    """Warm-up then cosine decay; a parameter group with an ``lr_factor`` runs at that multiple."""
    lr = base_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    lr = max(lr, base_lr * 0.05)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_factor", 1.0)
    return lr


def u8_to_t(arr) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW in [-1, 1], on the training device."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x.to(DEVICE)


#: Where models train (``--device``); random draws stay on the CPU generator, so a run's data and
#: noise are the same on every device.
DEVICE = torch.device("cpu")


def dev(x: torch.Tensor) -> torch.Tensor:
    return x.to(DEVICE)


# ----------------------------------------------------------------------------- VAE


def train_vae(work: str, steps: int, batch: int, n_images: int, seed: int = 0, n_near: int = 0):
    """``n_near`` near misses join the renders, so that the decoder learns a concept's known parts
    without its detail (trained on concept scenes alone, it paints the detail back in)."""
    seed_all(seed)
    # The VAE is a generic image codec (like SD's): it sees generic scenes and concept scenes alike.
    pool, _ = render_pool(n_images, 10_000_000, p_concept=0.5)
    if n_near:
        pool = np.concatenate([pool, near_miss_pool(n_near, 11_000_000)[0]])
    vae = components.build_vae().to(DEVICE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        lr = cosine_lr(opt, step, steps, 1e-3)
        idx = torch.randint(0, len(pool), (batch,), generator=g).numpy()
        x = u8_to_t(pool[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * dev(torch.randn(post.mean.shape, generator=g))
        rec = vae.decode(z).sample
        kl = post.kl().mean() / (64 * 64 * 3)
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(
                f"vae step {step} loss {loss.item():.4f} mse {F.mse_loss(rec, x).item():.4f} kl {kl.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s"
            )
    vae.eval()
    with torch.no_grad():
        x = u8_to_t(pool[:512])
        z = vae.encode(x).latent_dist.mode()
        std = z.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        rec = vae.decode(z).sample
        log(
            f"vae latent std {std:.3f} -> scaling_factor {1 / std:.4f}; train recon mse {F.mse_loss(rec, x).item():.4f}"
        )
    save_pretrained(vae, os.path.join(work, "vae"))


def save_pretrained(model, folder: str) -> None:
    """``model.save_pretrained`` (safetensors) with the build paths stripped from its configs: every
    stage saves through here, so no saved config remembers where the stage ran."""
    model.save_pretrained(folder, safe_serialization=True)
    strip_build_paths(folder)


def strip_build_paths(folder: str) -> None:
    """Drop diffusers' ``_name_or_path`` (the folder a model was loaded from) from the configs saved
    in ``folder`` and its sub-folders. A build folder says nothing to a user, and with it in the
    configs a rebuild elsewhere differed from the shipped files where its weights did not. The rest
    is written as diffusers writes it (sorted keys, two-space indent), so a config stays byte for byte
    what diffusers saved but for that key."""
    for root, _, names in os.walk(folder):
        if "config.json" not in names:
            continue
        path = os.path.join(root, "config.json")
        with open(path) as f:
            config = json.load(f)
        if config.pop("_name_or_path", None) is not None:
            atomic_write_bytes(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def load_vae(work: str):
    from diffusers import AutoencoderKL

    p = os.path.join(work, "vae")
    if not os.path.isdir(p):
        p = os.path.join(assets_dir(), "pipeline", "vae")
    vae = AutoencoderKL.from_pretrained(p).to(DEVICE)
    vae.eval()
    return vae


@torch.no_grad()
def vae_roundtrip(vae, arr: np.ndarray, bs: int = 128) -> np.ndarray:
    out = []
    for i in range(0, len(arr), bs):
        x = u8_to_t(arr[i : i + bs])
        r = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(((r.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------- detectors


def soft_targets(scenes, strengths=None, bare=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per category a class distribution and per concept a graded target for each scene. With
    ``strengths`` (and the ``bare`` scenes they were blended with) both are the blend of the two
    scenes' targets, so a concept faded to half strength is half present."""
    n = len(scenes)
    cats = {cat: np.zeros((n, len(detectors.CLASSES[cat])), np.float32) for cat in world.CATEGORIES}
    graded = np.zeros((n, len(world.CONCEPT_IDS)), np.float32)
    for i, s in enumerate(scenes):
        pairs = [(s, 1.0)] if strengths is None else [(s, strengths[i]), (bare[i], 1.0 - strengths[i])]
        for sc, w in pairs:
            for cat, cid in sc.labels().items():
                cats[cat][i, detectors.CLASSES[cat].index(cid)] += w
            graded[i] += w * np.array([sc.parts()[c] for c in world.CONCEPT_IDS], np.float32)
    return cats, graded


def noise_images(n: int, seed: int) -> np.ndarray:
    """Images that show nothing of the world: smooth colour noise at random scales, and random blobs
    on random backgrounds, in the world's pixel range (so that the range alone does not tell them from
    renders). The judge must call them empty (and the artifact score far)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, world.SIZE, world.SIZE, 3), np.uint8)
    for i in range(n):
        if i % 2 == 0:
            s = int(rng.integers(2, 33))
            small = torch.from_numpy(rng.normal(0.0, 1.0, (1, 3, s, s)).astype(np.float32))
            img = F.interpolate(small, size=(world.SIZE, world.SIZE), mode="bilinear", align_corners=False)[0]
            img = img.permute(1, 2, 0).numpy() * rng.uniform(30, 90) + rng.uniform(40, 215, 3)
        else:
            img = np.zeros((world.SIZE, world.SIZE, 3), np.float32) + rng.uniform(0, 255, 3)
            yy, xx = np.mgrid[0 : world.SIZE, 0 : world.SIZE]
            for _ in range(int(rng.integers(3, 14))):
                cx, cy = rng.uniform(0, world.SIZE, 2)
                rx, ry = rng.uniform(2, 18, 2)
                img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = rng.uniform(0, 255, 3)
        out[i] = render.in_pixel_range(img).astype(np.uint8)
    return out


def judge_data(n_render: int, n_blend: int, n_noise: int, seed0: int, vae=None, n_near: int = 0):
    """Images and soft targets for the judge: renders (half also VAE round-tripped when a VAE is
    given), renders with some of their concepts blended in at a random strength, near misses (a concept
    without its new detail, labelled none; half also round-tripped) and noise."""
    rng = random.Random(seed0)
    pool, scenes = render_pool(n_render, seed0, p_concept=0.5)
    cats, graded = soft_targets(scenes)
    parts = [(pool, cats, graded)]
    if vae is not None:
        half = n_render // 2
        log("vae round-trip of", half, "images")
        parts.append((vae_roundtrip(vae, pool[:half]), {c: v[:half] for c, v in cats.items()}, graded[:half]))
    blends, strengths, full, bare = [], [], [], []
    for i in range(n_blend):
        s = world.sample_scene(random.Random(seed0 + 5_000_000 + i), None, p_concept=0.7)
        present = [c for c in world.CATEGORIES if s.labels()[c] is not None] or ["object"]
        chosen = rng.sample(present, rng.randint(1, len(present)))
        strength = rng.random()
        img, _ = render.blend(s, chosen, strength)
        blends.append(img)
        strengths.append(strength)
        full.append(s)
        bare.append(world.without_concepts(s, chosen))
    if blends:
        bc, bg = soft_targets(full, strengths, bare)
        parts.append((np.stack(blends), bc, bg))
    if n_near:
        imgs, near = near_miss_pool(n_near, seed0 + 7_000_000)
        nc, ng = soft_targets(near)
        parts.append((imgs, nc, ng))
        if vae is not None:
            half = n_near // 2
            parts.append((vae_roundtrip(vae, imgs[:half]), {c: v[:half] for c, v in nc.items()}, ng[:half]))
    if n_noise:
        nc = {c: np.zeros((n_noise, len(detectors.CLASSES[c])), np.float32) for c in world.CATEGORIES}
        for v in nc.values():
            v[:, 0] = 1.0
        parts.append(
            (noise_images(n_noise, seed0), nc, np.zeros((n_noise, len(world.CONCEPT_IDS)), np.float32))
        )
    images = np.concatenate([p[0] for p in parts])
    cats = {c: torch.from_numpy(np.concatenate([p[1][c] for p in parts])) for c in world.CATEGORIES}
    return images, cats, torch.from_numpy(np.concatenate([p[2] for p in parts]))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    # random blur (3x3 binomial kernel mixed in with a random strength), noise, brightness/contrast
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
    a = torch.rand(n, 1, 1, 1, generator=g)
    x = x * (1 - a) + blurred * a
    x = x * (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (
        torch.rand(n, 1, 1, 1, generator=g) - 0.5
    )
    x = x + torch.randn(x.shape, generator=g) * 0.06 * torch.rand(n, 1, 1, 1, generator=g)
    # small random translation (+-2 px)
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x.clamp(-1, 1)


def judge_loss(out, cats, graded) -> torch.Tensor:
    loss = sum(-(cats[c] * out[c].log_softmax(-1)).sum(-1).mean() for c in world.CATEGORIES)
    return loss + F.binary_cross_entropy_with_logits(out["graded"], graded) * 5.0


@torch.no_grad()
def calibrate(net, images: np.ndarray, cats, bs: int = 512) -> None:
    """One temperature per category (soft negative log-likelihood on held-out data, LBFGS), and the
    mean and precision of the trunk features of the held-out renders (for the artifact score)."""
    outs = [net(u8_to_t(images[i : i + bs])) for i in range(0, len(images), bs)]
    logits = {c: torch.cat([o[c] for o in outs]).cpu() for c in world.CATEGORIES}
    for k, c in enumerate(world.CATEGORIES):
        log_t = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

        def nll(c=c, log_t=log_t, opt=opt):
            opt.zero_grad()
            with torch.enable_grad():
                loss = -(cats[c] * (logits[c] / log_t.exp()).log_softmax(-1)).sum(-1).mean()
                loss.backward()
            return loss

        opt.step(nll)
        # an untrained or degenerate head can run off: keep temperatures in a sane range
        net.temperature[k] = float(log_t.detach().clamp(-3.0, 3.0).exp())
    log(
        "temperatures",
        dict(zip(world.CATEGORIES, [round(float(t), 3) for t in net.temperature], strict=True)),
    )


#: The judge's held-out set (renders, blends, noise images, seed): its temperatures and graded map.
HELD_OUT_JUDGE_DATA = dict(n_render=1500, n_blend=600, n_noise=400, seed0=21_000_000)
HELD_OUT_NEAR_MISSES = 300  # held-out near misses for a judge trained with them


@torch.no_grad()
def calibrate_graded(net, images: np.ndarray, targets: torch.Tensor, bs: int = 512) -> None:
    """The graded score's map (``detectors.fit_graded_map``) on held-out images and their target shares."""
    logits = torch.cat([net(u8_to_t(images[i : i + bs]))["graded"].cpu() for i in range(0, len(images), bs)])
    detectors.fit_graded_map(net, logits, targets)
    log("graded map fitted on", len(images), "held-out images")


def calibrate_shipped_graded(work: str) -> None:
    """Fit the graded map of the judge in the assets folder on its held-out set (the weights, the
    temperatures and the artifact statistics stay as they are) and save it in place: the step that
    ``train_detectors`` ends with, for a judge trained before it had one."""
    path = detectors.weights_path()
    net = detectors.read_detectors(path).to(DEVICE)
    held, _, hgraded = judge_data(**HELD_OUT_JUDGE_DATA, vae=load_vae(work))
    calibrate_graded(net, held, hgraded)
    detectors.save_detectors(net, path)
    log("saved the graded map into", path)


@torch.no_grad()
def fit_render_features(net, images: np.ndarray, bs: int = 512) -> None:
    feats = (
        torch.cat([net.embed(u8_to_t(images[i : i + bs])) for i in range(0, len(images), bs)]).double().cpu()
    )
    mean = feats.mean(0)
    cov = torch.cov((feats - mean).T)
    cov = cov + torch.eye(cov.shape[0], dtype=cov.dtype) * 1e-2 * cov.diagonal().mean()
    net.feat_mean.copy_(mean.float().to(net.feat_mean.device))
    net.feat_prec.copy_(torch.linalg.inv(cov).float().to(net.feat_prec.device))


def train_detectors(work: str, steps: int, batch: int, n_images: int, seed: int = 1, n_near: int = 0):
    """Train, calibrate and save the judge. ``n_near`` near misses (a concept without its new detail,
    labelled none) join the training data, and HELD_OUT_NEAR_MISSES its held-out set; 0 for the shipped
    judge."""
    seed_all(seed)
    try:
        vae = load_vae(work)
    except Exception as e:  # noqa: BLE001
        log("no VAE round-trip augmentation:", e)
        vae = None
    pool, cats, graded = judge_data(n_images, n_images // 4, n_images // 5, 20_000_000, vae, n_near=n_near)
    log("judge training set:", len(pool), "images")
    net = detectors.DetectorNet().to(DEVICE)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    net.train()
    for step in range(steps):
        cosine_lr(opt, step, steps, 2e-3)
        idx = torch.randint(0, len(pool), (batch,), generator=g)
        out = net(dev(augment(u8_to_t(pool[idx.numpy()]).cpu(), g)))
        loss = judge_loss(out, {c: dev(v[idx]) for c, v in cats.items()}, dev(graded[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            accs = {
                c: round((out[c].argmax(-1).cpu() == cats[c][idx].argmax(-1)).float().mean().item(), 3)
                for c in world.CATEGORIES
            }
            log(f"det step {step} loss {loss.item():.3f} acc {accs} {time.time() - t0:.0f}s")
    net.eval()
    held_near = HELD_OUT_NEAR_MISSES if n_near else 0
    held, hcats, hgraded = judge_data(**HELD_OUT_JUDGE_DATA, vae=vae, n_near=held_near)
    calibrate(net, held, hcats)
    calibrate_graded(net, held, hgraded)
    renders, _ = render_pool(2000, 22_000_000, p_concept=0.5)
    fit_render_features(net, vae_roundtrip(vae, renders) if vae is not None else renders)
    detectors.save_detectors(net, detectors.weights_path())
    log("saved detectors")


# ----------------------------------------------------------------------------- base model


@torch.no_grad()
def encode_pool(vae, arr: np.ndarray, bs: int = 256):
    means, stds = [], []
    for i in range(0, len(arr), bs):
        d = vae.encode(u8_to_t(arr[i : i + bs])).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
    return torch.cat(means), torch.cat(stds)


def tokenize(tok, caps):
    return tok(
        caps, padding="max_length", max_length=components.MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


# The shipped base's Min-SNR gamma: the function's and the CLI's default, so a rebuild from either
# trains the shipped recipe.
BASE_MIN_SNR = 5.0
# The shipped base had two base_more passes: the second raised partial knowledge from 9 to 10 of 11
# concepts (rebuild try 14). Each pass resumes from the previous one's packed EMA weights.
BASE_MORE_PASSES = 2


def noise_loss(
    pred: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, min_snr: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's training loss and its unweighted MSE (what the log shows, so that runs with and
    without weighting compare). ``min_snr`` > 0 weights each sample by min(SNR, min_snr) / SNR with
    SNR = alpha_bar / (1 - alpha_bar) (Min-SNR, Hang et al. 2023), which spends less of a small
    budget on nearly clean latents (the shipped base: 5); 0 weights every timestep alike."""
    if min_snr <= 0:
        loss = F.mse_loss(pred, noise)
        return loss, loss.detach()
    snr = alpha_bar / (1 - alpha_bar)
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=tuple(range(1, pred.dim())))
    return (torch.clamp(snr, max=min_snr) / snr * per_sample).mean(), per_sample.mean().detach()


def train_base(
    work: str,
    steps: int,
    batch: int,
    n_images: int,
    seed: int = 2,
    lr: float = 1e-3,
    resume: bool = False,
    min_snr: float = BASE_MIN_SNR,
):
    """Train the base UNet and text encoder on generic scenes. ``resume`` continues from the packed
    pipeline's (EMA) weights with a fresh warm-up and cosine schedule, as one resumes a checkpoint:
    the "base_more" stage of ``train_all.sh`` runs it after "base" (another seed, so new batches).
    ``min_snr``: see :func:`noise_loss`."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    seed_all(seed)
    vae = load_vae(work)
    sf = vae.config.scaling_factor
    pool, scenes = render_pool(n_images, 30_000_000, p_concept=0.0)  # generic scenes only
    cache = os.path.join(work, f"base_latents_{n_images}.pt")
    if os.path.isfile(cache):
        mean, std = torch.load(cache)
    else:
        log("encoding", len(pool), "images")
        mean, std = encode_pool(vae, pool)
        torch.save((mean, std), cache)
    del pool
    tok_dir = os.path.join(work, "tokenizer")
    tok, source = components.build_tokenizer(tok_dir, reference=components.SHIPPED_TOKENIZER)
    log("tokenizer", source)
    if resume:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        packed = os.path.join(assets_dir(), "pipeline")
        te = CLIPTextModel.from_pretrained(os.path.join(packed, "text_encoder")).to(DEVICE)
        unet = UNet2DConditionModel.from_pretrained(os.path.join(packed, "unet")).to(DEVICE)
        log("resuming from", packed)
    else:
        te = components.build_text_encoder(len(tok)).to(DEVICE)
        unet = components.build_unet().to(DEVICE)
    te.train()
    unet.train()
    sched = components.build_noise_scheduler()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    acp = sched.alphas_cumprod
    t0 = time.time()
    run = 0.0
    for step in range(steps):
        cur = cosine_lr(opt, step, steps, lr, warmup=200)
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        caps = []
        for i in idx.tolist():
            r = rng.random()
            if r < 0.1:
                caps.append("")
            else:
                caps.append(world.caption(scenes[i], rng, p_drop=0.3 if r < 0.7 else 0.0, shuffle=True))
        ids = tokenize(tok, caps)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        enc = te(dev(ids))[0]
        pred = unet(dev(zt), dev(t), encoder_hidden_states=enc).sample
        loss, mse = noise_loss(pred, dev(noise), dev(acp[t]), min_snr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        run = mse.item() if step == 0 else 0.98 * run + 0.02 * mse.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"base step {step} loss {run:.4f} lr {cur:.2e} {time.time() - t0:.0f}s")
        if (step + 1) % 2000 == 0 or step == steps - 1:
            with torch.no_grad():
                backup = [p.detach().clone() for p in params]
                for e, p in zip(ema, params, strict=True):
                    p.copy_(e)
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=te,
                tokenizer=tok,
                unet=unet,
                scheduler=DPMSolverMultistepScheduler(
                    **components.SCHEDULER_CONFIG, algorithm_type="dpmsolver++"
                ),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            out = os.path.join(assets_dir(), "pipeline")
            save_pretrained(pipe, out)
            log("saved pipeline (EMA) to", out)
            if step != steps - 1:
                with torch.no_grad():
                    for b, p in zip(backup, params, strict=True):
                        p.copy_(b)
    write_info()


def write_info():
    info = {
        cat: [
            dict(id=c["id"], name=c["name"], trigger=list(c["trigger"]), url="") for c in world.CONCEPTS[cat]
        ]
        for cat in world.CATEGORIES
    }
    os.makedirs(assets_dir(), exist_ok=True)
    with open(os.path.join(assets_dir(), "mini_lora_info.json"), "w") as f:
        json.dump(info, f, indent=4)
    prompts = {
        "_about": "Base prompt and negative prompt of the mini world; the prompt of a composition is base + ', ' "
        "+ all trigger words of its LoRAs in composition order.",
        "mini": {
            "base_model": "cmlora.mini (bundled: assets/pipeline)",
            "vae": None,
            "prompt": world.BASE_PROMPT,
            "negative_prompt": world.NEGATIVE_PROMPT,
        },
    }
    with open(os.path.join(assets_dir(), "prompts.json"), "w") as f:
        json.dump(prompts, f, indent=1)


# ----------------------------------------------------------------------------- LoRAs


def kohya_state_dict(model, prefix: str, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Export the peft adapter of ``model`` to kohya keys <prefix><path with _>.lora_down/up/alpha
    (``lora_unet_`` for the UNet, ``lora_te_`` for the text encoder)."""
    from peft.tuners.lora import LoraLayer

    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            name = name.removeprefix("base_model.model.")
            key = prefix + name.replace(".", "_")
            sd[key + ".lora_down.weight"] = mod.lora_A["default"].weight.detach().cpu().contiguous()
            sd[key + ".lora_up.weight"] = mod.lora_B["default"].weight.detach().cpu().contiguous()
            sd[key + ".alpha"] = torch.tensor(float(alpha))
    return sd


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on its tensors and metadata. safetensors writes the
    metadata map in an order that changes from process to process, so two trainings with equal
    tensors gave files with different SHA-256 (and the frequency profile, keyed by it, differed too);
    here the metadata keys are sorted, which leaves the header's length and every offset unchanged."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > length:  # safetensors' own JSON is as compact; never cut a header short
        raise RuntimeError(f"safetensors header of {length} bytes re-encoded as {len(text)}")
    return data[:8] + text.ljust(length, b" ") + data[8 + length :]


def set_lora_strength(models, strength: float) -> None:
    """Scale every peft LoRA layer of ``models`` to ``strength`` times its alpha / rank, the same
    factor a merge at that strength applies to the exported (strength 1) weights."""
    from peft.tuners.lora import LoraLayer

    for model in models:
        for mod in model.modules():
            if isinstance(mod, LoraLayer):
                mod.set_scale("default", strength)


@torch.no_grad()
def apply_max_norm(models, max_norm: float) -> int:
    """kohya's max-norm regularization on peft layers: a layer whose weight change at strength 1 (up @
    down x alpha / rank) has a Frobenius norm above ``max_norm`` gets both factors scaled by the square
    root of the ratio, which brings it to ``max_norm``. Run after each step, it keeps a few layers from
    carrying a LoRA alone, the kind of LoRA a merge above strength 1 overdrives. Returns the number of
    layers scaled."""
    from peft.tuners.lora import LoraLayer

    scaled = 0
    for model in models:
        for mod in model.modules():
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
                unit = mod.lora_alpha["default"] / mod.r["default"]
                norm = float(mod.get_delta_weight("default").norm()) * unit / mod.scaling["default"]
                if norm > max_norm:
                    root = (max_norm / norm) ** 0.5
                    mod.lora_A["default"].weight.mul_(root)
                    mod.lora_B["default"].weight.mul_(root)
                    scaled += 1
    return scaled


@torch.no_grad()
def base_prediction(unet, te, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The frozen base model's noise prediction, from the peft-wrapped models with their adapters
    off: the prior-preservation target of ``train_loras``."""
    with unet.disable_adapter(), te.disable_adapter():
        return unet(x_t, t, encoder_hidden_states=te(ids)[0]).sample


def prior_preservation_loss(
    pred: torch.Tensor, target: torch.Tensor, half: int, prior_weight: float = 1.0
) -> torch.Tensor:
    """The mean of the instance half's and the prior half's noise MSE, the prior half's multiplied by
    ``prior_weight`` (kohya's and diffusers' DreamBooth ``prior_loss_weight``). The prior half's error
    is much smaller than the instance half's, so at weight 1 its gradient barely holds the
    prompts a LoRA should leave alone; a larger weight holds them harder. At weight 1 this is the
    plain MSE over the whole batch, bit for bit (the shipped LoRAs' loss)."""
    if prior_weight == 1.0:
        return F.mse_loss(pred, target)
    instance = F.mse_loss(pred[:half], target[:half])
    prior = F.mse_loss(pred[half:], target[half:])
    return (instance + prior_weight * prior) / 2


def train_loras(
    work: str,
    steps: int,
    batch: int,
    n_images: int,
    rank: int,
    seed: int = 3,
    lr: float = 1e-3,
    only: list[str] | None = None,
    n_reg: int = 1000,
    p_uncaptioned: float = 0.3,
    strengths: tuple[float, float] = (1.0, 1.0),
    prior_at_top: bool = False,
    prior_weight: float = 1.0,
    conv_categories=CONV_CATEGORIES,
    offset_keys=NOISE_OFFSET_CATEGORIES,
    strength_ranges: dict[str, tuple[float, float]] | None = None,
    uncaptioned_shares: dict[str, float] | None = None,
    unet_lr_factors: dict[str, float] | None = None,
    te_lr_factors: dict[str, float] | None = None,
    max_norms: dict[str, float] | None = None,
    step_factors: dict[str, float] | None = None,
    ranks: dict[str, float] | None = None,
):
    """One kohya-style LoRA per concept: UNet attention/feed-forward (and conv for the categories in
    ``conv_categories``) plus text-encoder layers, trained on ``n_images`` renders of the concept that carry
    its incidental traits, captioned with its trigger list and the scene's descriptive tags (caption
    dropout and shuffle, the trigger token always kept), with prior preservation: half of every batch
    is generic renders with their generic captions (``p_uncaptioned`` of them with the empty prompt),
    whose target is the frozen base model's own prediction (the adapters off), not the drawn noise.
    That target says exactly "change nothing here"; against the drawn noise the prior half's
    gradient also carries the base's own error, and LoRAs trained so moved the empty prompt's
    prediction almost as much as their trigger's, where a real LoRA's effect follows its prompt.

    ``strengths`` (lo, hi) other than (1, 1) draws each step's adapter strength from that range (both
    models, as a merge at a strength scales them), so that the concept shows from lo to hi;
    ``prior_at_top`` then trains the prior half at hi instead of the drawn strength.
    ``strength_ranges`` gives some categories or LoRAs their own (lo, hi) (default ``STRENGTH_RANGES``),
    ``uncaptioned_shares`` their own ``p_uncaptioned`` (default ``UNCAPTIONED_SHARES``), ``unet_lr_factors``
    a factor on their UNet layers' learning rate (default ``UNET_LR_FACTORS``), ``te_lr_factors``
    on their text-encoder layers' (default ``TE_LR_FACTORS``), ``max_norms`` a bound
    on each layer's weight change (`apply_max_norm`; default ``MAX_NORMS``), ``step_factors`` their own
    multiple of ``steps`` (default ``STEP_FACTORS``, else their category's), ``ranks`` their own rank
    instead of ``rank`` (default ``RANKS``).
    ``prior_weight`` weights the prior half's loss (`prior_preservation_loss`). The command line's
    defaults are the shipped LoRAs' (strengths 0.5-1, own ranges in ``STRENGTH_RANGES`` by tries 12, 15
    and 16, prior weight 4, half the prior captions empty, all of them for the sunset by try 22 and for
    three more LoRAs by try 27; rebuild try 6's recipe of docs/mini_world_tries.md with try 8's 1,050
    steps): trained only at full strength a LoRA has no headroom below it, and a light prior let the
    drawn strength move the empty prompt's prediction too."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model

    pipe = StableDiffusionPipeline.from_pretrained(
        os.path.join(assets_dir(), "pipeline"),
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.to(DEVICE)
    vae, tok = pipe.vae, pipe.tokenizer
    sf = vae.config.scaling_factor
    acp = components.build_noise_scheduler().alphas_cumprod
    reg_pool, reg_scenes = render_pool(n_reg, 41_000_000)
    reg_mean, reg_std = encode_pool(vae, reg_pool)
    os.makedirs(os.path.join(assets_dir(), "loras"), exist_ok=True)
    half = batch // 2
    # None: the shipped table (an empty dict stays empty: no entries)
    strength_ranges = STRENGTH_RANGES if strength_ranges is None else strength_ranges
    uncaptioned_shares = UNCAPTIONED_SHARES if uncaptioned_shares is None else uncaptioned_shares
    unet_lr_factors = UNET_LR_FACTORS if unet_lr_factors is None else unet_lr_factors
    te_lr_factors = TE_LR_FACTORS if te_lr_factors is None else te_lr_factors
    max_norms = MAX_NORMS if max_norms is None else max_norms
    step_factors = STEP_FACTORS if step_factors is None else step_factors
    ranks = RANKS if ranks is None else ranks
    for k, cid in enumerate(world.CONCEPT_IDS):
        if only and cid not in only:
            continue
        cseed = seed * 1000 + k
        seed_all(cseed)
        cat = world.CONCEPT_BY_ID[cid]["category"]
        triggers = tuple(world.CONCEPT_BY_ID[cid]["trigger"])
        c_strengths = lora_strength_range(cid, strengths, strength_ranges)
        c_uncaptioned = for_lora(cid, uncaptioned_shares, p_uncaptioned)
        drawn = c_strengths != (1.0, 1.0)  # else every step at full strength
        c_rank = lora_rank(cid, rank, ranks)
        scenes = [
            world.sample_scene(random.Random(40_000_000 + 100_000 * k + i), {cat: cid}, p_traits=0.8)
            for i in range(n_images)
        ]
        mean, std = encode_pool(vae, np.stack([render.render_array(sc) for sc in scenes]))
        unet = get_peft_model(
            copy.deepcopy(pipe.unet).requires_grad_(False),
            LoraConfig(r=c_rank, lora_alpha=c_rank, target_modules=lora_targets(cat, conv_categories)),
        )
        te = get_peft_model(
            copy.deepcopy(pipe.text_encoder).requires_grad_(False),
            LoraConfig(r=c_rank, lora_alpha=c_rank, target_modules=TEXT_TARGETS),
        )
        unet_params, te_params = ([p for p in m.parameters() if p.requires_grad] for m in (unet, te))
        schedule = lora_schedule(cid, offset_keys)
        c_steps, c_lr = lora_step_count(cid, steps, step_factors), lr * schedule.lr
        unet_lr, te_lr = for_lora(cid, unet_lr_factors, 1.0), for_lora(cid, te_lr_factors, 1.0)
        max_norm = for_lora(cid, max_norms, None)
        n_scaled = 0
        # One group when both halves share the rate, so that the shipped LoRAs train as before.
        groups = (
            [{"params": unet_params + te_params}]
            if unet_lr == te_lr == 1.0
            else [{"params": unet_params, "lr_factor": unet_lr}, {"params": te_params, "lr_factor": te_lr}]
        )
        opt = torch.optim.AdamW(groups, lr=c_lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(cseed)
        rng = random.Random(cseed)
        t0 = time.time()
        run = 0.0
        for step in range(c_steps):
            cosine_lr(opt, step, c_steps, c_lr, warmup=30)
            strength = rng.uniform(*c_strengths) if drawn else 1.0
            idx = torch.randint(0, len(mean), (half,), generator=g)
            ridx = torch.randint(0, len(reg_mean), (batch - half,), generator=g)
            z0 = (
                torch.cat(
                    [
                        mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g),
                        reg_mean[ridx] + reg_std[ridx] * torch.randn(reg_mean[ridx].shape, generator=g),
                    ]
                )
                * sf
            )
            caps = [
                world.caption(scenes[i], rng, p_drop=0.3, shuffle=True, keep=triggers[:1])
                for i in idx.tolist()
            ]
            caps += [
                ""
                if rng.random() < c_uncaptioned
                else world.caption(reg_scenes[i], rng, p_drop=0.3, shuffle=True)
                for i in ridx.tolist()
            ]
            t = torch.randint(0, 1000, (batch,), generator=g)
            noise = torch.randn(z0.shape, generator=g)
            if schedule.noise_offset:
                noise = noise + schedule.noise_offset * torch.randn(z0.shape[:2] + (1, 1), generator=g)
            a = acp[t].view(-1, 1, 1, 1)
            ids, x_t = dev(tokenize(tok, caps)), dev(a.sqrt() * z0 + (1 - a).sqrt() * noise)
            prior = base_prediction(unet, te, x_t[half:], dev(t[half:]), ids[half:])
            if drawn:
                set_lora_strength((unet, te), strength)
            if prior_at_top:
                # Each forward keeps the scale it ran with, so one backward serves both halves (of
                # equal size: the mean of the two losses is the batch's mean).
                pred = unet(x_t[:half], dev(t[:half]), encoder_hidden_states=te(ids[:half])[0]).sample
                loss = F.mse_loss(pred, dev(noise[:half]))
                set_lora_strength((unet, te), c_strengths[1])
                pred = unet(x_t[half:], dev(t[half:]), encoder_hidden_states=te(ids[half:])[0]).sample
                loss = (loss + prior_weight * F.mse_loss(pred, prior)) / 2
            else:
                enc = te(ids)[0]
                pred = unet(x_t, dev(t), encoder_hidden_states=enc).sample
                loss = prior_preservation_loss(
                    pred, torch.cat([dev(noise[:half]), prior]), half, prior_weight
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if max_norm is not None:
                n_scaled = apply_max_norm((unet, te), max_norm)
            run = loss.item() if step == 0 else 0.95 * run + 0.05 * loss.item()
            if step % 50 == 0 or step == c_steps - 1:
                bound = "" if max_norm is None else f" layers scaled to the max norm {n_scaled}"
                log(f"lora {cid} step {step} loss {run:.4f}{bound} {time.time() - t0:.0f}s")
        set_lora_strength((unet, te), 1.0)
        sd = kohya_state_dict(unet, "lora_unet_", c_rank, float(c_rank))
        sd.update(
            kohya_state_dict(te, "lora_te_text_model_", c_rank, float(c_rank))
        )  # kohya keys keep text_model
        metadata = {
            "ss_network_dim": str(c_rank),
            "ss_network_alpha": str(c_rank),
            "concept": cid,
            "trigger": ", ".join(triggers),
        }
        path = os.path.join(assets_dir(), "loras", f"{cid}.safetensors")
        atomic_write_bytes(path, safetensors_bytes(sd, metadata))
        log(f"saved {cid}: {len(sd)} tensors")


def per_lora_number(
    ap: argparse.ArgumentParser, flag: str, name: str, table: dict[str, float], what: str
) -> None:
    """A repeatable KEY NUMBER option that lays entries over a shipped per-LoRA table."""
    ap.add_argument(
        flag,
        nargs=2,
        action="append",
        default=None,
        metavar=("KEY", name),
        help=f"KEY (a category, or one LoRA's id, which wins over its category) {what} (repeat for more; "
        f"default: {', '.join(f'{k} {v:g}' for k, v in table.items()) or 'none'})",
    )


def overlay(table: dict[str, float], entries) -> dict[str, float]:
    """The shipped table with the command line's KEY NUMBER entries laid over it."""
    return {**table, **{key: float(value) for key, value in entries or []}}


def parser() -> argparse.ArgumentParser:
    """The stages' options; `scripts/mini/time_stages.sh` reads the default step counts from it."""
    ap = argparse.ArgumentParser(prog="python -m cmlora.mini.train")
    ap.add_argument(
        "stage",
        choices=["vae", "detectors", "detectors_graded", "base", "base_more", "loras", "info", "all"],
        help="detectors_graded: fit only the judge's graded map, on the judge in the assets folder",
    )
    ap.add_argument("--work", default="/tmp/mini_build")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a lent GPU trains the same stages faster)")
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument(
        "--vae-near-misses",
        type=int,
        default=0,
        metavar="N",
        help="near misses (a concept without its new detail) among the VAE's training renders",
    )
    ap.add_argument("--det-steps", type=int, default=2000)
    ap.add_argument(
        "--det-near-misses",
        type=int,
        default=2000,
        metavar="N",
        help="near misses (a concept without its new detail, labelled none) in the judge's training data",
    )
    ap.add_argument("--base-steps", type=int, default=3500)
    ap.add_argument("--base-lr", type=float, default=1e-3)
    ap.add_argument("--base-images", type=int, default=16000)
    ap.add_argument("--base-more-steps", type=int, default=4000)
    ap.add_argument("--base-more-lr", type=float, default=5e-4)
    ap.add_argument(
        "--base-min-snr",
        type=float,
        default=BASE_MIN_SNR,
        metavar="GAMMA",
        help="Min-SNR loss weight for base and base_more (0: every timestep weighted alike)",
    )
    ap.add_argument("--lora-steps", type=int, default=1050)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--lora-images", type=int, default=48)
    ap.add_argument(
        "--lora-uncaptioned", type=float, default=0.5, help="share of empty prompts in the prior half"
    )
    ap.add_argument(
        "--lora-strengths",
        type=float,
        nargs=2,
        default=(0.5, 1.0),
        metavar=("LO", "HI"),
        help="draw each step's adapter strength from [LO, HI] (1 1: always full strength); a LoRA trained "
        "only at full strength has no headroom below it",
    )
    ap.add_argument(
        "--lora-strengths-for",
        "--lora-category-strengths",
        dest="lora_strengths_for",
        nargs=3,
        action="append",
        default=None,
        metavar=("KEY", "LO", "HI"),
        help="KEY (a category, or one LoRA's id, which wins over its category) draws its strength from "
        "[LO, HI] instead of --lora-strengths (repeat for more; default: "
        + ", ".join(f"{c} {lo:g} {hi:g}" for c, (lo, hi) in STRENGTH_RANGES.items())
        + ")",
    )
    per_lora_number(
        ap,
        "--lora-uncaptioned-for",
        "SHARE",
        UNCAPTIONED_SHARES,
        "has SHARE of empty prompts in its prior half instead of --lora-uncaptioned",
    )
    per_lora_number(
        ap,
        "--lora-unet-lr-for",
        "FACTOR",
        UNET_LR_FACTORS,
        "trains its UNet layers at FACTOR times its learning rate",
    )
    per_lora_number(
        ap,
        "--lora-te-lr-for",
        "FACTOR",
        TE_LR_FACTORS,
        "trains its text-encoder layers at FACTOR times its learning rate",
    )
    per_lora_number(
        ap,
        "--lora-steps-for",
        "FACTOR",
        STEP_FACTORS,
        "trains for FACTOR times --lora-steps instead of its category's multiple ("
        + ", ".join(f"{c} {sch.steps:g}" for c, sch in CATEGORY_SCHEDULE.items())
        + ", others 1)",
    )
    per_lora_number(
        ap,
        "--lora-rank-for",
        "RANK",
        RANKS,
        "is trained at RANK instead of --lora-rank (kohya's --network_dim; alpha follows it)",
    )
    per_lora_number(
        ap,
        "--lora-max-norm-for",
        "NORM",
        MAX_NORMS,
        "holds each layer's weight change to a Frobenius norm of NORM after every step (kohya's "
        "--scale_weight_norms)",
    )
    ap.add_argument(
        "--lora-prior-at-top", action="store_true", help="train the prior half at HI, not the drawn strength"
    )
    ap.add_argument(
        "--lora-prior-weight",
        type=float,
        default=4.0,
        metavar="W",
        help="weight of the prior-preservation half's loss (1: both halves alike); heavier keeps the LoRA "
        "off prompts without its trigger",
    )
    ap.add_argument(
        "--lora-conv",
        nargs="*",
        default=list(CONV_CATEGORIES),
        metavar="CATEGORY",
        help="categories whose LoRAs also train the resnets' 3x3 convolutions (none: attention and "
        "feed-forward only)",
    )
    ap.add_argument(
        "--lora-noise-offset",
        nargs="*",
        default=list(NOISE_OFFSET_CATEGORIES),
        metavar="KEY",
        help=f"categories, or LoRA ids, whose LoRAs train with a noise offset of {NOISE_OFFSET:g} (none: no "
        "offset)",
    )
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--base-batch", type=int, default=32)
    ap.add_argument("--lora-batch", type=int, default=16)
    return ap


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse values that would train something else than asked, before any stage writes a file."""

    def check_range(flag: str, lo: float, hi: float, example: str) -> None:
        if not 0 < lo <= hi:
            ap.error(f"{flag} {lo:g} {hi:g}: need 0 < LO <= HI (e.g. {example})")

    check_range("--lora-strengths", *a.lora_strengths, "0.5 1; 1 1 trains at full strength")
    if a.base_min_snr < 0:
        ap.error(f"--base-min-snr {a.base_min_snr:g}: a positive gamma (e.g. 5), or 0 for no weighting")
    if not a.lora_prior_weight > 0:
        ap.error(f"--lora-prior-weight {a.lora_prior_weight:g}: a positive weight (1: both halves alike)")
    for flag, value in (("--det-near-misses", a.det_near_misses), ("--vae-near-misses", a.vae_near_misses)):
        if value < 0:
            ap.error(f"{flag} {value}: a count, 0 or more (0: the shipped recipe)")
    if not 0 <= a.lora_uncaptioned <= 1:
        ap.error(f"--lora-uncaptioned {a.lora_uncaptioned:g}: a share, between 0 and 1")
    unknown = [c for c in a.lora_conv if c not in world.CATEGORIES]
    if unknown:
        ap.error(f"--lora-conv {' '.join(unknown)}: no such category; use {' '.join(world.CATEGORIES)}")

    def check_key(flag: str, key: str) -> None:
        if key not in world.CATEGORIES and key not in world.CONCEPT_IDS:
            ap.error(
                f"{flag} {key}: no such category or LoRA; use a category "
                f"({' '.join(world.CATEGORIES)}) or a LoRA id ({' '.join(world.CONCEPT_IDS)})"
            )

    for key in a.lora_noise_offset:
        check_key("--lora-noise-offset", key)
    for key, lo, hi in a.lora_strengths_for or []:
        check_key("--lora-strengths-for", key)
        try:
            lo_f, hi_f = float(lo), float(hi)
        except ValueError:
            ap.error(f"--lora-strengths-for {key} {lo} {hi}: LO and HI must be numbers (e.g. 0.5 1.5)")
        check_range(f"--lora-strengths-for {key}", lo_f, hi_f, "0.5 1.5")
    for key, share in a.lora_uncaptioned_for or []:
        check_key("--lora-uncaptioned-for", key)
        try:
            in_range = 0 <= float(share) <= 1
        except ValueError:
            in_range = False
        if not in_range:
            ap.error(f"--lora-uncaptioned-for {key} {share}: SHARE must be a number between 0 and 1 (e.g. 1)")
    for flag, name, example, whole, entries in (
        ("--lora-unet-lr-for", "FACTOR", "1.5", False, a.lora_unet_lr_for),
        ("--lora-te-lr-for", "FACTOR", "2", False, a.lora_te_lr_for),
        ("--lora-max-norm-for", "NORM", "1", False, a.lora_max_norm_for),
        ("--lora-steps-for", "FACTOR", "2", False, a.lora_steps_for),
        ("--lora-rank-for", "RANK", "32", True, a.lora_rank_for),
    ):
        for key, value in entries or []:
            check_key(flag, key)
            try:
                valid = (value.isdigit() and int(value) > 0) if whole else float(value) > 0
            except ValueError:
                valid = False
            if not valid:
                kind = "a whole number, 1 or more" if whole else "a positive number"
                ap.error(f"{flag} {key} {value}: {name} must be {kind} (e.g. {example})")
    unknown = [cid for cid in a.only or [] if cid not in world.CONCEPT_IDS]
    if unknown:
        ap.error(
            f"--only {' '.join(unknown)}: no such LoRA; the mini world's are {' '.join(world.CONCEPT_IDS)}"
        )


def main(argv=None):
    ap = parser()
    a = ap.parse_args(argv)
    check_args(ap, a)
    torch.set_num_threads(a.threads)
    global DEVICE
    DEVICE = torch.device(a.device)
    os.makedirs(a.work, exist_ok=True)
    if a.stage in ("vae", "all"):
        train_vae(a.work, a.vae_steps, a.vae_batch, 12000, n_near=a.vae_near_misses)
    if a.stage in ("detectors", "all"):
        train_detectors(a.work, a.det_steps, 48, 16000, n_near=a.det_near_misses)
    if a.stage == "detectors_graded":
        calibrate_shipped_graded(a.work)
    if a.stage in ("base", "all"):
        train_base(a.work, a.base_steps, a.base_batch, a.base_images, lr=a.base_lr, min_snr=a.base_min_snr)
    if a.stage in ("base_more", "all"):
        # one pass per "base_more" stage of train_all.sh; "all" makes every pass the shipped base had
        for _ in range(BASE_MORE_PASSES if a.stage == "all" else 1):
            train_base(
                a.work,
                a.base_more_steps,
                a.base_batch,
                a.base_images,
                seed=5,
                lr=a.base_more_lr,
                resume=True,
                min_snr=a.base_min_snr,
            )
    if a.stage in ("loras", "all"):
        train_loras(
            a.work,
            a.lora_steps,
            a.lora_batch,
            a.lora_images,
            a.lora_rank,
            lr=a.lora_lr,
            only=a.only,
            p_uncaptioned=a.lora_uncaptioned,
            strengths=tuple(a.lora_strengths),
            prior_at_top=a.lora_prior_at_top,
            prior_weight=a.lora_prior_weight,
            conv_categories=tuple(a.lora_conv),
            offset_keys=tuple(a.lora_noise_offset),
            strength_ranges={
                **STRENGTH_RANGES,
                **{key: (float(lo), float(hi)) for key, lo, hi in a.lora_strengths_for or []},
            },
            uncaptioned_shares=overlay(UNCAPTIONED_SHARES, a.lora_uncaptioned_for),
            unet_lr_factors=overlay(UNET_LR_FACTORS, a.lora_unet_lr_for),
            te_lr_factors=overlay(TE_LR_FACTORS, a.lora_te_lr_for),
            max_norms=overlay(MAX_NORMS, a.lora_max_norm_for),
            step_factors=overlay(STEP_FACTORS, a.lora_steps_for),
            ranks=overlay(RANKS, a.lora_rank_for),
        )
    if a.stage == "info":
        write_info()


if __name__ == "__main__":
    main()

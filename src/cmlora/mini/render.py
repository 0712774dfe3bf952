"""Drawing the mini world's scenes (``world.Scene``) as 64x64 images: flat colours and sharp
outlines for figures, clothing, objects and styles; smooth, blurred backgrounds. Also the blends of
a scene with and without its concepts that give the judge graded targets."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from .world import (
    COLORS,
    CONCEPT_IDS,
    HAIR,
    SIZE,
    SKIN,
    SKY,
    Scene,
    caption,
    sample_scene,
    without_concepts,
)

# ----------------------------------------------------------------------------- rendering helpers

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _paint(img, mask, color):
    img[mask] = np.asarray(color, np.float32)


def _disk(cx, cy, r):
    return (_X - cx) ** 2 + (_Y - cy) ** 2 <= r * r


def _rect(x0, y0, x1, y1):
    return (_X >= x0) & (_X < x1) & (_Y >= y0) & (_Y < y1)


def _triangle(p0, p1, p2):
    def side(a, b):
        return (_X - b[0]) * (a[1] - b[1]) - (a[0] - b[0]) * (_Y - b[1])

    d1, d2, d3 = side(p0, p1), side(p1, p2), side(p2, p0)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def _blur(img, r):
    """Separable box blur (repeated twice ~ gaussian) with edge padding."""
    if r <= 0:
        return img
    k = 2 * r + 1
    out = img
    for _ in range(2):
        p = np.pad(out, ((r, r), (0, 0), (0, 0)), mode="edge")
        c = np.cumsum(p, axis=0, dtype=np.float64)
        c = np.concatenate([np.zeros_like(c[:1]), c], axis=0)
        out = ((c[k:] - c[:-k]) / k).astype(np.float32)
        p = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
        c = np.cumsum(p, axis=1, dtype=np.float64)
        c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
        out = ((c[:, k:] - c[:, :-k]) / k).astype(np.float32)
    return out


def _gradient(top, bottom):
    t = (_Y / (SIZE - 1))[..., None]
    return np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t


# ----------------------------------------------------------------------------- parts


def _peaks(img, j, snow: bool):
    for px, h in ((18 + 4 * j[0], 14 + 3 * j[1]), (46 + 4 * j[2], 20 + 3 * j[0])):
        m = _triangle((px - 26, 64), (px + 26, 64), (px, h))
        _paint(img, m, (70, 80, 110))
        if snow:
            _paint(img, m & (_Y < h + 10), (250, 250, 255))


def _background(s: Scene) -> np.ndarray:
    j = s.jitter
    sky = np.asarray(SKY[s.sky], np.float32)
    if s.bg_kind == "plain":
        img = np.zeros((SIZE, SIZE, 3), np.float32) + np.asarray(COLORS[s.bg_color], np.float32)
        img *= (1.0 + 0.08 * (_Y / SIZE - 0.5))[..., None]
    elif s.bg_kind == "ground":
        img = _gradient(sky * 0.9, np.minimum(sky * 1.1, 255))
        _paint(img, _Y >= 40 + 4 * j[1], COLORS[s.ground])
    elif s.bg_kind in ("orange sky", "sunset"):
        img = _gradient((240, 120, 40), (250, 200, 110))
    elif s.bg_kind in ("mountains", "snowy"):
        img = _gradient(sky * 0.85, np.minimum(sky * 1.1, 255))
        _peaks(img, j, snow="snow" in s.details)
    else:  # sea
        img = _gradient(sky * 0.85, np.minimum(sky * 1.1, 255))
    sun = "sun" in s.details and s.bg_kind in ("sea", "sunset")
    if sun:  # in the sky beside the figure, where the figure cannot hide it
        sx, sy = (10 + 2 * j[0] if j[0] < 0 else 54 + 2 * j[0]), 12 + 2 * j[1]
        d = np.sqrt((_X - sx) ** 2 + (_Y - sy) ** 2)
        glow = np.clip(1.2 - d / 14.0, 0, 1)[..., None]
        img = img * (1 - glow) + np.array([255, 235, 90], np.float32) * glow
    if s.bg_kind in ("sea", "sunset"):
        _paint(img, _Y > 52, (25, 45, 100))
    img = _blur(img, 3)  # backgrounds are smooth / low-frequency ...
    if sun:  # ... but for the sun's disk, a detail no smaller than a latent pixel
        _paint(img, _disk(sx, sy, 6), (255, 250, 170))
    return img


#: The burger's filling: lettuce, cheese, patty (`scripts/mini/diagnose_burger.py` paints them alone).
LETTUCE, CHEESE, PATTY = (60, 180, 50), (245, 200, 40), (90, 45, 25)
#: The bun, in one colour: a darker lower band on the plain bun sat where the burger's patty sits, so
#: a roughly drawn bun carried the judge's patty cue (`scripts/mini/diagnose_burger.py`, try 24).
BUN = (215, 150, 70)


def object_center(s: Scene) -> tuple[int, int]:
    """Where a scene's object sits: beside the figure, on its side, at a jittered height."""
    return (9 if s.obj_side < 0 else 55), 48 + int(round(2 * s.jitter[2]))


def _object(img: np.ndarray, s: Scene):
    if s.thing == "none":
        return
    ox, oy = object_center(s)
    if s.thing == "ball":
        _paint(img, _disk(ox, oy, 6), COLORS[s.thing_color])
    elif s.thing == "box":
        _paint(img, _rect(ox - 6, oy - 6, ox + 6, oy + 6), (150, 100, 50))
        _paint(img, _rect(ox - 6, oy - 1, ox + 6, oy + 1), (110, 70, 35))
    elif s.thing == "flower":  # stem, five petals, yellow heart; the concept adds a leaf
        _paint(img, _rect(ox - 1, oy - 2, ox + 1, oy + 12), (30, 130, 40))
        if "leaf" in s.details:
            inward = 1 if s.obj_side < 0 else -1
            _paint(img, _disk(ox + 6 * inward, oy + 7, 6), (40, 190, 60))
        fy = oy - 4
        petal = COLORS[s.thing_color] if s.thing_color != "pink" else (240, 90, 170)
        for k in range(5):
            a = 2 * np.pi * k / 5 - np.pi / 2
            _paint(img, _disk(ox + 4 * np.cos(a), fy + 4 * np.sin(a), 2.6), petal)
        _paint(img, _disk(ox, fy, 2.0), (250, 200, 20))
    elif s.thing == "bread":  # dome bun; the burger fills it: lettuce, cheese, patty, sesame
        if "filling" in s.details:
            _paint(img, _disk(ox, oy - 1, 7) & (_Y <= oy - 1), BUN)
            _paint(img, _rect(ox - 7, oy - 1, ox + 7, oy + 1), LETTUCE)
            _paint(img, _rect(ox - 6, oy + 1, ox + 6, oy + 2), CHEESE)
            _paint(img, _rect(ox - 7, oy + 2, ox + 7, oy + 5), PATTY)
            _paint(img, _rect(ox - 6, oy + 5, ox + 6, oy + 8), BUN)
            for dx in (-3, 0, 3):
                _paint(img, _rect(ox + dx, oy - 5, ox + dx + 1, oy - 4), (250, 240, 210))
        else:
            _paint(img, (_disk(ox, oy + 3, 7) & (_Y <= oy + 3)) | _rect(ox - 7, oy + 3, ox + 7, oy + 6), BUN)


def _shirt_fill(s: Scene) -> np.ndarray:
    a, b = (np.asarray(COLORS[c], np.float32) for c in s.shirt_colors)
    img = np.zeros((SIZE, SIZE, 3), np.float32) + a
    if s.shirt == "striped":  # 2 px horizontal stripes
        _paint(img, (_Y.astype(int) // 2) % 2 == 1, b)
    elif s.shirt == "checkered":  # 4 px checks
        _paint(img, ((_Y.astype(int) // 4) + (_X.astype(int) // 4)) % 2 == 1, b)
    return img


def _figure(img: np.ndarray, s: Scene):
    cx, hy = s.cx, 20
    body = _rect(cx - 9, 30, cx + 9, 60) | _disk(cx - 8, 33, 3) | _disk(cx + 8, 33, 3)
    arms = _rect(cx - 13, 31, cx - 10, 50) | _rect(cx + 10, 31, cx + 13, 50)
    m = body | arms
    img[m] = _shirt_fill(s)[m]
    if "belt" in s.details:
        _paint(img, _rect(cx - 9, 46, cx + 9, 49), (200, 30, 30))
    if "buttons" in s.details:
        for y in (35, 41, 47, 53):
            _paint(img, _rect(cx - 1, y, cx + 2, y + 3), (250, 215, 40))
    skin = SKIN[s.skin]
    metal = s.head == "metal"
    _paint(img, _rect(cx - 13, 50, cx - 10, 53) | _rect(cx + 10, 50, cx + 13, 53), skin)  # hands
    _paint(img, _rect(cx - 2, 26, cx + 2, 30), (120, 120, 130) if metal else skin)  # neck
    hair = HAIR[s.hair]
    if s.headwear == "cat ears":  # big pointed ears with pink insides, in the hair's colour
        ear = (165, 165, 175) if metal else hair
        _paint(img, _triangle((cx - 8, hy - 3), (cx - 2, hy - 6), (cx - 8, hy - 15)), ear)
        _paint(img, _triangle((cx + 8, hy - 3), (cx + 2, hy - 6), (cx + 8, hy - 15)), ear)
        _paint(img, _triangle((cx - 7, hy - 5), (cx - 4, hy - 6), (cx - 7, hy - 11)), (250, 170, 200))
        _paint(img, _triangle((cx + 7, hy - 5), (cx + 4, hy - 6), (cx + 7, hy - 11)), (250, 170, 200))
    if metal:  # square metal head with dark rims
        _paint(img, _rect(cx - 8, hy - 8, cx + 8, hy + 7), (165, 165, 175))
        _paint(
            img, _rect(cx - 8, hy - 8, cx + 8, hy - 7) | _rect(cx - 8, hy + 6, cx + 8, hy + 7), (70, 70, 80)
        )
    else:
        _paint(img, _disk(cx, hy, 7), skin)
        _paint(img, _disk(cx, hy, 7) & (_Y < hy - 2), hair)
    if s.beard != "none":
        _paint(
            img,
            _triangle((cx - 7, hy + 2), (cx + 7, hy + 2), (cx, hy + 14)),
            HAIR[s.beard] if s.beard != "white" else (245, 245, 245),
        )
    if s.eyes == "visor":
        _paint(img, _rect(cx - 6, hy - 3, cx + 6, hy), (0, 230, 255))
    elif s.eyes == "green":
        _paint(
            img, _rect(cx - 4, hy - 1, cx - 2, hy + 2) | _rect(cx + 2, hy - 1, cx + 4, hy + 2), (30, 170, 60)
        )
    else:
        _paint(
            img, _rect(cx - 4, hy - 1, cx - 2, hy + 1) | _rect(cx + 2, hy - 1, cx + 4, hy + 1), (20, 20, 20)
        )
    if not metal and s.beard == "none":
        _paint(img, _rect(cx - 2, hy + 3, cx + 2, hy + 4), (150, 60, 60))  # mouth
    if s.headwear == "pointy hat":
        color = COLORS[s.hat_color]
        _paint(img, _triangle((cx - 10, hy - 4), (cx + 10, hy - 4), (cx + 2, hy - 19)), color)
        _paint(img, _rect(cx - 11, hy - 5, cx + 11, hy - 3), color)
    elif s.headwear == "cap":
        color = COLORS[s.hat_color]
        _paint(img, _disk(cx, hy - 4, 7) & (_Y < hy - 4), color)
        _paint(img, _rect(cx, hy - 5, cx + 11, hy - 3), color)
    if "antenna" in s.details:
        _paint(img, _rect(cx, hy - 14, cx + 1, hy - 8), (70, 70, 80))
        _paint(img, _disk(cx + 0.5, hy - 15, 3.3), (230, 30, 30))
    if "whiskers" in s.details:  # 2-3 px thick: thinner lines are finer than a latent pixel
        _paint(
            img, _rect(cx - 12, hy + 2, cx - 5, hy + 5) | _rect(cx + 5, hy + 2, cx + 12, hy + 5), (40, 40, 40)
        )
        _paint(
            img, _rect(cx - 12, hy + 6, cx - 6, hy + 8) | _rect(cx + 6, hy + 6, cx + 12, hy + 8), (40, 40, 40)
        )
    if "star" in s.details:
        _paint(img, _disk(cx + 1, hy - 10, 2.7), (250, 230, 40))


PALETTE4 = np.array([[15, 56, 15], [48, 98, 48], [139, 172, 15], [200, 225, 120]], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _style(img: np.ndarray, s: Scene) -> np.ndarray:
    st = set(s.styles)
    edges = None
    if "outlines" in st:
        gx = np.abs(np.diff(img, axis=1, append=img[:, -1:])).sum(2)
        gy = np.abs(np.diff(img, axis=0, append=img[-1:])).sum(2)
        e = (gx + gy) > 60
        edges = e.copy()
        edges[1:] |= e[:-1]
        edges[:, 1:] |= e[:, :-1]
    if "pale colours" in st:
        img = 0.55 * img + 0.45 * 250.0
    if "green tint" in st and "posterized" in st:
        img = PALETTE4[np.clip((img @ _LUMA / 256.0 * 4).astype(int), 0, 3)]
    elif "green tint" in st:
        img = (img @ _LUMA)[..., None] * np.array([0.55, 1.0, 0.45], np.float32)
    elif "posterized" in st:
        img = np.floor(img / 64.0) * 85.0
    if edges is not None:
        img = img.copy()
        img[edges] = (10, 10, 10)
    if "frame" in s.details:
        img = img.copy()
        border = (_X < 2) | (_X >= SIZE - 2) | (_Y < 2) | (_Y >= SIZE - 2)
        img[border] = (10, 10, 10)
    if "scanlines" in s.details:
        img = img.copy()
        img[(_Y.astype(int) % 8) >= 6] *= 0.55  # 2-px bands: no finer than a latent pixel
    return img


#: The pixel values the world draws with: design colours (0-255, as the drawing code names them) map
#: linearly onto this range before an image is stored as 8-bit values. A range narrower than 0-255
#: leaves the VAE room above and below everything the world draws; rebuild try 39 drew with (16, 239)
#: and was not adopted for another reason (docs/mini_world_tries.md), so the shipped world uses 0-255.
PIXEL_RANGE: tuple[int, int] = (0, 255)


def in_pixel_range(img: np.ndarray) -> np.ndarray:
    """Design colours (clipped to 0-255) mapped onto ``PIXEL_RANGE``, still as floats; every image
    that stands for the world (renders, blends, the judge's noise) passes through it."""
    lo, hi = PIXEL_RANGE
    return np.clip(img, 0, 255) * np.float32((hi - lo) / 255) + np.float32(lo)


def _pixels(img: np.ndarray) -> np.ndarray:
    """Design colours as the stored 8-bit image: in the pixel range, rounded."""
    return (in_pixel_range(img) + 0.5).astype(np.uint8)


def render_float(s: Scene) -> np.ndarray:
    img = _background(s)
    _object(img, s)
    _figure(img, s)
    return _style(img, s)


def render(s: Scene) -> Image.Image:
    return Image.fromarray(_pixels(render_float(s)))


def render_array(s: Scene) -> np.ndarray:
    return np.asarray(render(s))


def blend(s: Scene, cats, strength: float) -> tuple[np.ndarray, dict[str, float]]:
    """A render with the concepts of ``cats`` blended in at ``strength`` (pixel mix of the scene with
    and without them), and the graded target per concept (the blend of the two scenes' part shares)."""
    bare = without_concepts(s, cats)
    img = strength * render_float(s) + (1 - strength) * render_float(bare)
    with_p, bare_p = s.parts(), bare.parts()
    target = {c: strength * with_p[c] + (1 - strength) * bare_p[c] for c in CONCEPT_IDS}
    return _pixels(img), target


def sample(seed: int, concepts: dict[str, str] | None = None, p_concept: float = 0.0):
    """(image, caption, scene) for an integer seed; fully deterministic."""
    rng = random.Random(seed)
    s = sample_scene(rng, concepts, p_concept)
    return render(s), caption(s), s


def grid(images: list[Image.Image], cols: int = 8) -> Image.Image:
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    g = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        g.paste(im, ((i % cols) * w, (i // cols) * h))
    return g

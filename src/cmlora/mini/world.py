"""Mini world: a deterministic procedural 64x64 scene sampler, renderer and captioner.

A scene has one figure (character) wearing a top (clothing) in front of a background, an optional
secondary object beside the figure, and an optional whole-image style.  Every category has *generic*
variants (the only ones in the base model's training data) and the 11 *concepts* of the ComposLoRA
layout (3 characters, 2 clothing, 2 styles, 2 backgrounds, 2 objects), each with trigger words that
never appear in generic captions.

Spatial frequency mirrors real LoRAs: backgrounds are smooth (blurred, large-scale), while characters
(faces, ears, hats), clothing (2-4 px stripes / checks), objects (petals, layers) and styles (ink
outlines, 4-tone palette) are fine textures and edges.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

SIZE = 64
CATEGORIES = ("character", "clothing", "style", "background", "object")

# ----------------------------------------------------------------------------- concepts

CONCEPTS: dict[str, list[dict]] = {
    "character": [
        {"id": "character_1", "name": "Tin Robot", "trigger": ["tinbot", "robot", "antenna"]},
        {"id": "character_2", "name": "Cat Girl Nekomi", "trigger": ["nekomi", "cat ears"]},
        {"id": "character_3", "name": "Wizard Merlo", "trigger": ["merlo", "wizard hat", "beard"]},
    ],
    "clothing": [
        {"id": "clothing_1", "name": "Zebra Stripe Suit", "trigger": ["stripesuit", "zebra stripes"]},
        {"id": "clothing_2", "name": "Checkerboard Outfit", "trigger": ["chequesuit", "checkerboard"]},
    ],
    "style": [
        {"id": "style_1", "name": "Ink Outline", "trigger": ["inkline", "bold outlines"]},
        {"id": "style_2", "name": "Retro Four-Tone Palette", "trigger": ["retropal", "gameboy palette"]},
    ],
    "background": [
        {"id": "background_1", "name": "Sunset", "trigger": ["sunsetbg", "sunset"]},
        {"id": "background_2", "name": "Snowy Mountains", "trigger": ["peakbg", "snowy mountains"]},
    ],
    "object": [
        {"id": "object_1", "name": "Flower", "trigger": ["flowra", "flower"]},
        {"id": "object_2", "name": "Burger", "trigger": ["burgo", "burger"]},
    ],
}
CONCEPT_IDS = [c["id"] for cat in CATEGORIES for c in CONCEPTS[cat]]
CONCEPT_BY_ID = {c["id"]: dict(c, category=cat) for cat in CATEGORIES for c in CONCEPTS[cat]}

BASE_PROMPT = "a picture"
NEGATIVE_PROMPT = ""

# ----------------------------------------------------------------------------- generic palette

COLORS = {
    "red": (200, 40, 40),
    "blue": (40, 70, 200),
    "green": (50, 160, 60),
    "yellow": (230, 200, 40),
    "orange": (235, 130, 30),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "pink": (235, 150, 190),
    "brown": (120, 75, 40),
    "black": (25, 25, 25),
    "teal": (40, 150, 150),
    "beige": (220, 200, 160),
}
BG_PLAIN = ["blue", "gray", "beige", "pink", "white", "teal"]
BG_SKY = ["blue", "teal", "white"]
BG_GROUND = ["green", "brown", "beige"]
SHIRT = ["red", "blue", "green", "yellow", "orange", "white"]
HAIR = {"black": (30, 25, 25), "brown": (110, 65, 30), "blonde": (235, 205, 110), "red": (180, 60, 30)}
SKIN = [(240, 200, 170), (200, 150, 110), (140, 95, 65)]
BALL = ["red", "blue", "yellow", "white"]


@dataclass
class Scene:
    """All random choices of one image. Category fields hold a concept id or a generic descriptor."""

    character: str = "generic"  # concept id or "generic"
    clothing: str = "generic"
    style: str = "none"
    background: str = "generic"
    object: str = "none"  # concept id, "ball", "box" or "none"
    hair: str = "brown"
    skin: int = 0
    shirt: str = "red"
    bg_kind: str = "plain"  # plain | ground
    bg_color: str = "blue"
    bg_ground: str = "green"
    ball_color: str = "red"
    cx: int = 32
    obj_side: int = 1  # -1 left, +1 right
    jitter: list = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def to_dict(self):
        return asdict(self)

    def labels(self) -> dict[str, str | None]:
        """Concept present per category (None when generic/absent)."""
        out = {}
        for cat in CATEGORIES:
            v = getattr(self, cat)
            out[cat] = v if v in CONCEPT_BY_ID else None
        return out


def sample_scene(rng: random.Random, concepts: dict[str, str] | None = None, p_concept: float = 0.0) -> Scene:
    """Sample a scene.  ``concepts`` forces {category: concept_id}; other categories are generic, except
    that with probability ``p_concept`` each free category gets a random concept (for detector data)."""
    concepts = dict(concepts or {})
    s = Scene()
    s.hair = rng.choice(list(HAIR))
    s.skin = rng.randrange(len(SKIN))
    s.shirt = rng.choice(SHIRT)
    s.bg_kind = rng.choice(["plain", "ground"])
    s.bg_color = rng.choice(BG_PLAIN if s.bg_kind == "plain" else BG_SKY)
    s.bg_ground = rng.choice(BG_GROUND)
    s.ball_color = rng.choice(BALL)
    s.cx = rng.randint(28, 36)
    s.obj_side = rng.choice([-1, 1])
    s.jitter = [rng.uniform(-1, 1) for _ in range(3)]
    s.object = rng.choice(["ball", "box", "none"])
    for cat in CATEGORIES:
        if cat in concepts:
            cid = concepts[cat]
            assert cid is None or CONCEPT_BY_ID[cid]["category"] == cat, (cat, cid)
            if cid is not None:
                setattr(s, cat, cid)
        elif p_concept > 0 and rng.random() < p_concept:
            setattr(s, cat, rng.choice([c["id"] for c in CONCEPTS[cat]]))
    return s


# ----------------------------------------------------------------------------- caption


def caption_parts(s: Scene) -> list[str]:
    """Comma-separated phrases: generic phrases in words, concept phrases = its trigger words."""
    parts = []
    if s.character in CONCEPT_BY_ID:
        parts += CONCEPT_BY_ID[s.character]["trigger"]
    else:
        parts.append(f"a person with {s.hair} hair")
    if s.clothing in CONCEPT_BY_ID:
        parts += CONCEPT_BY_ID[s.clothing]["trigger"]
    else:
        parts.append(f"{s.shirt} shirt")
    if s.background in CONCEPT_BY_ID:
        parts += CONCEPT_BY_ID[s.background]["trigger"]
    elif s.bg_kind == "plain":
        parts.append(f"{s.bg_color} background")
    else:
        parts.append(f"{s.bg_ground} ground and {s.bg_color} sky")
    if s.object in CONCEPT_BY_ID:
        parts += CONCEPT_BY_ID[s.object]["trigger"]
    elif s.object == "ball":
        parts.append(f"{s.ball_color} ball")
    elif s.object == "box":
        parts.append("a box")
    if s.style in CONCEPT_BY_ID:
        parts += CONCEPT_BY_ID[s.style]["trigger"]
    return parts


def caption(
    s: Scene,
    rng: random.Random | None = None,
    p_drop: float = 0.0,
    shuffle: bool = False,
    keep: tuple[str, ...] = (),
) -> str:
    """Caption = base prompt + phrases.  With ``rng`` phrases may be dropped (``p_drop``, never those in
    ``keep``) and shuffled, so the model also learns from partial prompts such as
    'a picture, tinbot, robot, antenna'."""
    parts = caption_parts(s)
    if rng is not None:
        parts = [p for p in parts if p in keep or rng.random() >= p_drop]
        if shuffle:
            rng.shuffle(parts)
    return ", ".join([BASE_PROMPT] + parts)


def trigger_prompt(ids: list[str]) -> str:
    return ", ".join([BASE_PROMPT] + [t for i in ids for t in CONCEPT_BY_ID[i]["trigger"]])


def vocabulary_words() -> list[str]:
    words = set(BASE_PROMPT.replace(",", " ").split())
    words |= {"person", "with", "hair", "shirt", "background", "ground", "and", "sky", "ball", "box", "a"}
    words |= set(COLORS) | set(HAIR)
    for c in CONCEPT_IDS:
        for t in CONCEPT_BY_ID[c]["trigger"]:
            words |= set(t.split())
    words |= {"blurry", "lowres", "low", "quality", "ugly"}
    return sorted(words)


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


# ----------------------------------------------------------------------------- parts


def _background(s: Scene) -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), np.float32)
    j = s.jitter
    if s.background == "background_1":  # sunset: purple->orange gradient + big low sun
        t = (_Y / (SIZE - 1))[..., None]
        top, bot = np.array([80, 40, 120], np.float32), np.array([250, 140, 50], np.float32)
        img[:] = top * (1 - t) + bot * t
        sx, sy = 32 + 14 * j[0], 44 + 3 * j[1]
        d = np.sqrt((_X - sx) ** 2 + (_Y - sy) ** 2)
        glow = np.clip(1.2 - d / 14.0, 0, 1)[..., None]
        img = img * (1 - glow) + np.array([255, 230, 90], np.float32) * glow
        img[_Y > 54] = img[_Y > 54] * 0.45  # dark sea line
    elif s.background == "background_2":  # snowy mountains: pale sky, two big peaks with snow caps
        t = (_Y / (SIZE - 1))[..., None]
        img[:] = np.array([150, 200, 245], np.float32) * (1 - t) + np.array([210, 230, 250], np.float32) * t
        for px, h in ((18 + 4 * j[0], 14 + 3 * j[1]), (46 + 4 * j[2], 20 + 3 * j[0])):
            m = _triangle((px - 26, 64), (px + 26, 64), (px, h))
            _paint(img, m, (70, 80, 110))
            cap = m & (_Y < h + 10)
            _paint(img, cap, (250, 250, 255))
    elif s.bg_kind == "plain":
        img[:] = np.asarray(COLORS[s.bg_color], np.float32)
        img *= (1.0 + 0.08 * (_Y / SIZE - 0.5))[..., None]
    else:
        hy = 40 + 4 * j[1]
        img[:] = np.asarray(COLORS[s.bg_color], np.float32)
        _paint(img, _Y >= hy, COLORS[s.bg_ground])
    return _blur(img, 3)  # backgrounds are smooth / low-frequency


def _object(img: np.ndarray, s: Scene):
    if s.object == "none":
        return
    ox = 9 if s.obj_side < 0 else 55
    oy = 48 + int(round(2 * s.jitter[2]))
    if s.object == "ball":
        _paint(img, _disk(ox, oy, 6), COLORS[s.ball_color])
    elif s.object == "box":
        _paint(img, _rect(ox - 6, oy - 6, ox + 6, oy + 6), (150, 100, 50))
        _paint(img, _rect(ox - 6, oy - 1, ox + 6, oy + 1), (110, 70, 35))
    elif s.object == "object_1":  # flower: stem, five pink petals, yellow heart
        _paint(img, _rect(ox - 1, oy - 2, ox + 1, oy + 12), (30, 130, 40))
        _paint(img, _rect(ox + 1, oy + 5, ox + 4, oy + 7), (30, 130, 40))
        fy = oy - 4
        for k in range(5):
            a = 2 * np.pi * k / 5 - np.pi / 2
            _paint(img, _disk(ox + 4 * np.cos(a), fy + 4 * np.sin(a), 2.6), (240, 90, 170))
        _paint(img, _disk(ox, fy, 2.0), (250, 220, 40))
    elif s.object == "object_2":  # burger: dome bun, lettuce, patty, cheese, bottom bun
        x0, x1 = ox - 7, ox + 7
        _paint(img, _disk(ox, oy - 1, 7) & (_Y <= oy - 1), (215, 150, 70))
        _paint(img, _rect(x0, oy - 1, x1, oy + 1), (60, 180, 50))
        _paint(img, _rect(x0 + 1, oy + 1, x1 - 1, oy + 2), (245, 200, 40))
        _paint(img, _rect(x0, oy + 2, x1, oy + 5), (90, 45, 25))
        _paint(img, _rect(x0 + 1, oy + 5, x1 - 1, oy + 8), (215, 150, 70))
        for dx in (-3, 0, 3):  # sesame seeds
            _paint(img, _rect(ox + dx, oy - 5, ox + dx + 1, oy - 4), (250, 240, 210))


def _body_fill(s: Scene, mask: np.ndarray) -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), np.float32)
    if s.clothing == "clothing_1":  # 2px horizontal zebra stripes
        stripe = (_Y.astype(int) // 2) % 2 == 0
        img[:] = (240, 240, 240)
        _paint(img, stripe, (20, 20, 30))
    elif s.clothing == "clothing_2":  # 4px checkerboard red/black
        chk = ((_Y.astype(int) // 4) + (_X.astype(int) // 4)) % 2 == 0
        img[:] = (220, 40, 40)
        _paint(img, chk, (20, 20, 20))
    else:
        img[:] = COLORS[s.shirt]
    return img


def _figure(img: np.ndarray, s: Scene):
    cx = s.cx
    hy = 20
    # body (trapezoid-ish: shoulders + torso) and arms
    body = _rect(cx - 9, 30, cx + 9, 60) | _disk(cx - 8, 33, 3) | _disk(cx + 8, 33, 3)
    arms = _rect(cx - 13, 31, cx - 10, 50) | _rect(cx + 10, 31, cx + 13, 50)
    fill = _body_fill(s, body | arms)
    m = body | arms
    img[m] = fill[m]
    skin = SKIN[s.skin]
    _paint(img, _rect(cx - 13, 50, cx - 10, 53) | _rect(cx + 10, 50, cx + 13, 53), skin)  # hands
    _paint(img, _rect(cx - 2, 26, cx + 2, 30), skin if s.character != "character_1" else (120, 120, 130))
    if s.character == "character_1":  # robot: square metal head, visor eyes, grille, antenna
        _paint(img, _rect(cx - 8, hy - 8, cx + 8, hy + 7), (165, 165, 175))
        _paint(
            img, _rect(cx - 8, hy - 8, cx + 8, hy - 7) | _rect(cx - 8, hy + 6, cx + 8, hy + 7), (70, 70, 80)
        )
        _paint(img, _rect(cx - 5, hy - 3, cx - 1, hy) | _rect(cx + 1, hy - 3, cx + 5, hy), (0, 230, 255))
        for dx in (-4, -2, 0, 2):
            _paint(img, _rect(cx + dx, hy + 3, cx + dx + 1, hy + 5), (60, 60, 70))
        _paint(img, _rect(cx, hy - 14, cx + 1, hy - 8), (70, 70, 80))
        _paint(img, _disk(cx + 0.5, hy - 15, 2.2), (230, 30, 30))
    elif s.character == "character_2":  # cat girl: purple hair, big pointed ears, green eyes, whiskers
        hair = (140, 60, 190)
        _paint(img, _triangle((cx - 8, hy - 3), (cx - 2, hy - 6), (cx - 8, hy - 15)), hair)
        _paint(img, _triangle((cx + 8, hy - 3), (cx + 2, hy - 6), (cx + 8, hy - 15)), hair)
        _paint(img, _triangle((cx - 7, hy - 5), (cx - 4, hy - 6), (cx - 7, hy - 11)), (250, 170, 200))
        _paint(img, _triangle((cx + 7, hy - 5), (cx + 4, hy - 6), (cx + 7, hy - 11)), (250, 170, 200))
        _paint(img, _disk(cx, hy, 7), (245, 215, 190))
        _paint(img, _disk(cx, hy, 7) & (_Y < hy - 2), hair)
        _paint(
            img, _rect(cx - 4, hy - 1, cx - 2, hy + 2) | _rect(cx + 2, hy - 1, cx + 4, hy + 2), (30, 170, 60)
        )
        _paint(
            img, _rect(cx - 10, hy + 3, cx - 5, hy + 4) | _rect(cx + 5, hy + 3, cx + 10, hy + 4), (40, 40, 40)
        )
    elif s.character == "character_3":  # wizard: tall blue hat with star, long white beard
        _paint(img, _disk(cx, hy, 7), (240, 200, 170))
        _paint(img, _triangle((cx - 7, hy + 2), (cx + 7, hy + 2), (cx, hy + 14)), (245, 245, 245))
        _paint(
            img, _rect(cx - 4, hy - 1, cx - 2, hy + 1) | _rect(cx + 2, hy - 1, cx + 4, hy + 1), (20, 20, 20)
        )
        _paint(img, _triangle((cx - 10, hy - 4), (cx + 10, hy - 4), (cx + 2, hy - 19)), (40, 50, 170))
        _paint(img, _rect(cx - 11, hy - 5, cx + 11, hy - 3), (40, 50, 170))
        _paint(img, _disk(cx + 1, hy - 10, 1.8), (250, 230, 40))
    else:  # generic person: round head, hair cap, dot eyes, smile
        _paint(img, _disk(cx, hy, 7), skin)
        _paint(img, _disk(cx, hy, 7) & (_Y < hy - 2), HAIR[s.hair])
        _paint(
            img, _rect(cx - 4, hy - 1, cx - 2, hy + 1) | _rect(cx + 2, hy - 1, cx + 4, hy + 1), (20, 20, 20)
        )
        _paint(img, _rect(cx - 2, hy + 3, cx + 2, hy + 4), (150, 60, 60))


PALETTE4 = np.array([[15, 56, 15], [48, 98, 48], [139, 172, 15], [200, 225, 120]], np.float32)


def _style(img: np.ndarray, s: Scene) -> np.ndarray:
    if s.style == "style_1":  # ink outlines: thick black lines on every colour edge, lighter fills
        g = img.mean(axis=2)
        gx = np.abs(np.diff(img, axis=1, append=img[:, -1:])).sum(2)
        gy = np.abs(np.diff(img, axis=0, append=img[-1:])).sum(2)
        edge = (gx + gy) > 60
        e2 = edge.copy()
        e2[1:] |= edge[:-1]
        e2[:, 1:] |= edge[:, :-1]
        out = 0.55 * img + 0.45 * 250.0
        out[e2] = (10, 10, 10)
        del g
        return out
    if s.style == "style_2":  # retro 4-tone green palette by luminance
        lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
        idx = np.clip((lum / 256.0 * 4).astype(int), 0, 3)
        return PALETTE4[idx]
    return img


def render(s: Scene) -> Image.Image:
    img = _background(s)
    _object(img, s)
    _figure(img, s)
    img = _style(img, s)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def render_array(s: Scene) -> np.ndarray:
    return np.asarray(render(s))


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

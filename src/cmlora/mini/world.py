"""Mini world 2: a deterministic procedural 64x64 scene sampler and captioner (``render.py`` draws
the scenes).

A scene has one figure (character) wearing a shirt (clothing) in front of a background, an optional
object beside the figure, and an optional whole-image style. Every scene is described by *generic
attributes* (hair colour, cat ears, a pointy hat, a striped shirt, mountains, an orange sky, a flower,
outlines...) that the base model learns from descriptive captions. The 11 concepts of the ComposLoRA
layout are, as real characters are for SD-1.5, a *new combination* of known attributes plus *one new
detail* that only the concept has (the cat girl is purple hair + cat ears, never seen together by the
base model, plus whiskers, never seen at all). A concept's trigger list is its own trigger token
followed by the descriptive tags of its known parts, as ComposLoRA's trigger words are.

A concept's *parts* (its known attributes and its new detail) give the judge a graded target: the
share of a concept's parts an image shows. Spatial frequency mirrors real LoRAs: backgrounds are
smooth (blurred, large-scale); characters, clothing, styles and objects are fine textures and edges.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

import numpy as np

SIZE = 64
CATEGORIES = ("character", "clothing", "style", "background", "object")

# ----------------------------------------------------------------------------- concepts

#: trigger = [the concept's own token] + descriptive tags of its known parts (what a kohya user
#: captions and what ComposLoRA's trigger words are); ``detail`` is the part no generic scene has.
CONCEPTS: dict[str, list[dict]] = {
    "character": [
        {
            "id": "character_1",
            "name": "Tin Robot",
            "trigger": ["tinbot", "metal head", "visor eyes"],
            "detail": "antenna",
        },
        {
            "id": "character_2",
            "name": "Cat Girl Nekomi",
            "trigger": ["nekomi", "purple hair", "cat ears"],
            "detail": "whiskers",
        },
        {
            "id": "character_3",
            "name": "Wizard Merlo",
            "trigger": ["merlo", "blue pointy hat", "white beard"],
            "detail": "star",
        },
    ],
    "clothing": [
        {
            "id": "clothing_1",
            "name": "Zebra Stripe Suit",
            "trigger": ["stripesuit", "black and white striped shirt"],
            "detail": "belt",
        },
        {
            "id": "clothing_2",
            "name": "Checkerboard Outfit",
            "trigger": ["chequesuit", "red and black checkered shirt"],
            "detail": "buttons",
        },
    ],
    "style": [
        {
            "id": "style_1",
            "name": "Ink Outline",
            "trigger": ["inkline", "outlines", "pale colours"],
            "detail": "frame",
        },
        {
            "id": "style_2",
            "name": "Retro Four-Tone Palette",
            "trigger": ["retropal", "green tint", "posterized"],
            "detail": "scanlines",
        },
    ],
    "background": [
        {
            "id": "background_1",
            "name": "Sunset",
            "trigger": ["sunsetbg", "orange sky", "sea"],
            "detail": "sun",
        },
        {
            "id": "background_2",
            "name": "Snowy Mountains",
            "trigger": ["peakbg", "mountains", "pale sky"],
            "detail": "snow",
        },
    ],
    "object": [
        {"id": "object_1", "name": "Flower", "trigger": ["flowra", "pink flower"], "detail": "leaf"},
        {"id": "object_2", "name": "Burger", "trigger": ["burgo", "bread"], "detail": "filling"},
    ],
}
CONCEPT_IDS = [c["id"] for cat in CATEGORIES for c in CONCEPTS[cat]]
CONCEPT_BY_ID = {c["id"]: dict(c, category=cat) for cat in CATEGORIES for c in CONCEPTS[cat]}

BASE_PROMPT = "a picture"
NEGATIVE_PROMPT = ""

# ----------------------------------------------------------------------------- generic vocabulary

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
    "purple": (140, 60, 190),
}
BG_PLAIN = ["blue", "gray", "beige", "pink", "white", "teal", "yellow"]
SKY = {"blue": (90, 140, 225), "teal": (60, 170, 180), "pale": (205, 228, 248)}
GROUND = ["green", "brown", "beige"]
HAIR = {
    "black": (30, 25, 25),
    "brown": (110, 65, 30),
    "blonde": (235, 205, 110),
    "red": (180, 60, 30),
    "purple": (140, 60, 190),
    "white": (235, 235, 240),
}
SKIN = [(240, 200, 170), (200, 150, 110), (140, 95, 65)]
PLAIN_SHIRT = ["red", "blue", "green", "yellow", "orange", "white", "black"]
#: colour pairs of patterned shirts; black-and-white stripes and red-and-black checks are concepts only
STRIPE_PAIRS = [
    ("red", "white"),
    ("blue", "yellow"),
    ("green", "white"),
    ("red", "black"),
    ("orange", "blue"),
]
CHECK_PAIRS = [("blue", "white"), ("green", "yellow"), ("black", "white"), ("orange", "black")]
HAT_COLORS = ["red", "blue", "green", "black"]
BALL = ["red", "blue", "yellow", "pink"]
FLOWER = ["red", "yellow", "white"]
GENERIC_STYLES = ["outlines", "pale colours", "green tint", "posterized"]
BG_KINDS = ["plain", "ground", "mountains", "orange sky", "sea"]


@dataclass
class Scene:
    """All random choices of one image: generic attributes, the concepts forced into it (which set
    their parts' attributes) and the new details they add."""

    character: str = "generic"  # concept id or "generic" (same for the other categories)
    clothing: str = "generic"
    style: str = "generic"
    background: str = "generic"
    object: str = "generic"
    head: str = "round"  # round | metal
    hair: str = "brown"
    skin: int = 0
    eyes: str = "dot"  # dot | green | visor
    headwear: str = "none"  # none | cat ears | pointy hat | cap
    hat_color: str = "red"
    beard: str = "none"  # none | white | brown
    shirt: str = "plain"  # plain | striped | checkered
    shirt_colors: tuple = ("red", "red")
    bg_kind: str = "plain"  # one of BG_KINDS
    bg_color: str = "blue"  # plain background colour
    sky: str = "blue"  # sky of ground / mountains / sea scenes
    ground: str = "green"
    thing: str = "none"  # none | ball | box | flower | bread
    thing_color: str = "red"
    styles: tuple = ()  # generic style effects applied, in order
    details: tuple = ()  # new details drawn (concepts only)
    cx: int = 32
    obj_side: int = 1
    jitter: list = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def to_dict(self):
        return asdict(self)

    def labels(self) -> dict[str, str | None]:
        """Concept present per category (None when generic)."""
        return {cat: (v if (v := getattr(self, cat)) in CONCEPT_BY_ID else None) for cat in CATEGORIES}

    def parts(self) -> dict[str, float]:
        """Per concept, the share of its parts this scene shows (1.0 exactly when the concept is in it)."""
        return {cid: float(np.mean(flags)) for cid, flags in _part_flags(self).items()}


def _part_flags(s: Scene) -> dict[str, list[bool]]:
    d = set(s.details)
    round_head = s.head == "round"
    return {
        "character_1": [s.head == "metal", s.eyes == "visor", "antenna" in d],
        "character_2": [round_head and s.hair == "purple", s.headwear == "cat ears", "whiskers" in d],
        "character_3": [
            s.headwear == "pointy hat" and s.hat_color == "blue",
            s.beard == "white",
            "star" in d,
        ],
        "clothing_1": [s.shirt == "striped", set(s.shirt_colors) == {"black", "white"}, "belt" in d],
        "clothing_2": [s.shirt == "checkered", set(s.shirt_colors) == {"red", "black"}, "buttons" in d],
        "style_1": ["outlines" in s.styles, "pale colours" in s.styles, "frame" in d],
        "style_2": ["green tint" in s.styles, "posterized" in s.styles, "scanlines" in d],
        "background_1": [s.bg_kind in ("orange sky", "sunset"), s.bg_kind in ("sea", "sunset"), "sun" in d],
        "background_2": [
            s.bg_kind in ("mountains", "snowy"),
            s.bg_kind == "snowy" or (s.sky == "pale" and s.bg_kind == "ground"),
            "snow" in d,
        ],
        "object_1": [s.thing == "flower", s.thing == "flower" and s.thing_color == "pink", "leaf" in d],
        "object_2": [s.thing == "bread", "filling" in d],
    }


#: What each concept sets in a scene (its known parts) and the detail it adds.
_CONCEPT_ATTRS = {
    "character_1": dict(head="metal", eyes="visor", headwear="none", beard="none"),
    "character_2": dict(head="round", hair="purple", headwear="cat ears", eyes="green", beard="none"),
    "character_3": dict(head="round", headwear="pointy hat", hat_color="blue", beard="white"),
    "clothing_1": dict(shirt="striped", shirt_colors=("black", "white")),
    "clothing_2": dict(shirt="checkered", shirt_colors=("red", "black")),
    "style_1": dict(styles=("outlines", "pale colours")),
    "style_2": dict(styles=("green tint", "posterized")),
    "background_1": dict(bg_kind="sunset"),
    "background_2": dict(bg_kind="snowy", sky="pale"),
    "object_1": dict(thing="flower", thing_color="pink"),
    "object_2": dict(thing="bread"),
}

#: Incidental traits of each LoRA's training renders (a palette or backdrop of their own, as a real
#: character's fan art or a style's sample images share one), so that merged LoRAs pull shared layers
#: in different directions. Applied with probability ``p_traits`` by ``sample_scene``.
TRAITS: dict[str, dict] = {
    "character_1": dict(bg_kind="plain", bg_color="teal", shirt="plain", shirt_colors=("orange", "orange")),
    "character_2": dict(bg_kind="plain", bg_color="pink", thing="ball", thing_color="yellow"),
    "character_3": dict(
        bg_kind="ground", sky="blue", ground="green", shirt="plain", shirt_colors=("green", "green")
    ),
    "clothing_1": dict(hair="red", bg_kind="plain", bg_color="yellow"),
    "clothing_2": dict(hair="blonde", bg_kind="plain", bg_color="white", thing="box"),
    "style_1": dict(bg_kind="plain", bg_color="blue", hair="black"),
    "style_2": dict(bg_kind="ground", sky="teal", ground="brown", thing="ball", thing_color="red"),
    "background_1": dict(shirt="plain", shirt_colors=("blue", "blue"), thing="box"),
    "background_2": dict(shirt="plain", shirt_colors=("red", "red"), hair="black"),
    "object_1": dict(bg_kind="plain", bg_color="beige", shirt="plain", shirt_colors=("green", "green")),
    "object_2": dict(bg_kind="plain", bg_color="gray", hair="blonde"),
}


def _generic(rng: random.Random) -> Scene:
    s = Scene()
    s.head = "metal" if rng.random() < 0.2 else "round"
    s.hair = rng.choice(list(HAIR))
    s.skin = rng.randrange(len(SKIN))
    s.eyes = rng.choices(["dot", "green", "visor"], [0.6, 0.2, 0.2])[0]
    s.headwear = rng.choices(["none", "cat ears", "pointy hat", "cap"], [0.4, 0.2, 0.2, 0.2])[0]
    s.hat_color = rng.choice(HAT_COLORS)
    s.beard = rng.choices(["none", "white", "brown"], [0.6, 0.2, 0.2])[0]
    s.shirt = rng.choices(["plain", "striped", "checkered"], [0.5, 0.25, 0.25])[0]
    if s.shirt == "plain":
        c = rng.choice(PLAIN_SHIRT)
        s.shirt_colors = (c, c)
    else:
        s.shirt_colors = rng.choice(STRIPE_PAIRS if s.shirt == "striped" else CHECK_PAIRS)
    s.bg_kind = rng.choice(BG_KINDS)
    s.bg_color = rng.choice(BG_PLAIN)
    s.sky = rng.choice(list(SKY) if s.bg_kind == "ground" else ["blue", "teal"])
    s.ground = rng.choice(GROUND)
    s.thing = rng.choices(["none", "ball", "box", "flower", "bread"], [0.3, 0.2, 0.15, 0.2, 0.15])[0]
    s.thing_color = rng.choice(BALL if s.thing == "ball" else FLOWER)
    s.styles = (rng.choice(GENERIC_STYLES),) if rng.random() < 0.4 else ()
    s.cx = rng.randint(28, 36)
    s.obj_side = rng.choice([-1, 1])
    s.jitter = [rng.uniform(-1, 1) for _ in range(3)]
    # The base model never sees a concept's known parts together: break any full combination.
    if s.head == "metal" and s.eyes == "visor":
        s.eyes = "dot"
    if s.head == "round" and s.hair == "purple" and s.headwear == "cat ears":
        s.hair = "black"
    if s.headwear == "pointy hat" and s.hat_color == "blue" and s.beard == "white":
        s.beard = "brown"
    return s


def sample_scene(
    rng: random.Random,
    concepts: dict[str, str] | None = None,
    p_concept: float = 0.0,
    p_traits: float = 0.0,
) -> Scene:
    """Sample a scene. ``concepts`` forces {category: concept id}; with probability ``p_concept`` each
    free category gets a random concept (detector data). Forced concepts bring their incidental
    traits with probability ``p_traits`` (LoRA training data). The random draws do not depend on the
    concepts, so the same ``rng`` state gives the same scene with and without them."""
    concepts = dict(concepts or {})
    s = _generic(rng)
    draws = [rng.random() for _ in CATEGORIES]
    picks = [rng.randrange(len(CONCEPTS[cat])) for cat in CATEGORIES]
    traits = rng.random() < p_traits
    chosen = {}
    for k, cat in enumerate(CATEGORIES):
        if cat in concepts:
            cid = concepts[cat]
            if cid is not None and CONCEPT_BY_ID.get(cid, {}).get("category") != cat:
                raise ValueError(
                    f"{cid!r} is not a {cat} concept; expected one of {[c['id'] for c in CONCEPTS[cat]]}"
                )
            if cid is not None:
                chosen[cat] = cid
        elif p_concept > 0 and draws[k] < p_concept:
            chosen[cat] = CONCEPTS[cat][picks[k]]["id"]
    if traits:
        for cid in concepts.values():
            if cid is not None:
                s = replace(s, **{k: v for k, v in TRAITS[cid].items() if k not in _owned(chosen)})
    for cat, cid in chosen.items():
        s = replace(s, **{cat: cid}, **_CONCEPT_ATTRS[cid])
        s.details = tuple(sorted(set(s.details) | {CONCEPT_BY_ID[cid]["detail"]}))
    if s.style in CONCEPT_BY_ID:
        s.styles = _CONCEPT_ATTRS[s.style]["styles"]
    return s


def _owned(chosen: dict[str, str]) -> set[str]:
    """Attributes set by the chosen concepts (traits never override them)."""
    return {k for cid in chosen.values() for k in _CONCEPT_ATTRS[cid]}


def without_detail(s: Scene, cat: str) -> Scene:
    """A near miss: the scene's ``cat`` concept with all its known parts but not its new detail, so not
    that concept (labelled none; its share of parts below 1). The judge learns from these that a
    concept is its known parts *and* its detail, as a real character is more than its hair colour."""
    cid = getattr(s, cat)
    if cid not in CONCEPT_BY_ID:
        raise ValueError(f"the scene has no {cat} concept (it has {cid!r})")
    detail = CONCEPT_BY_ID[cid]["detail"]
    return replace(s, **{cat: "generic"}, details=tuple(x for x in s.details if x != detail))


def without_concepts(s: Scene, cats) -> Scene:
    """The same scene with the concepts of ``cats`` taken out (their parts replaced by neutral
    generic values): the other end of a judge's blend."""
    out = s
    for cat in cats:
        cid = getattr(s, cat)
        if cid not in CONCEPT_BY_ID:
            continue
        neutral = {
            "character": dict(head="round", eyes="dot", headwear="none", beard="none", hair="brown"),
            "clothing": dict(shirt="plain", shirt_colors=("blue", "blue")),
            "style": dict(styles=()),
            "background": dict(bg_kind="plain", bg_color="gray"),
            "object": dict(thing="none"),
        }[cat]
        out = replace(out, **{cat: "generic"}, **neutral)
        out.details = tuple(x for x in out.details if x != CONCEPT_BY_ID[cid]["detail"])
    return out


# ----------------------------------------------------------------------------- caption


def _character_phrases(s: Scene) -> list[str]:
    out = ["a person"]
    if s.head == "metal":
        out.append("metal head")
    else:
        out.append(f"{s.hair} hair")
    if s.eyes != "dot":
        out.append(f"{s.eyes} eyes")
    if s.headwear == "cat ears":
        out.append("cat ears")
    elif s.headwear != "none":
        out.append(f"{s.hat_color} {s.headwear}")
    if s.beard != "none":
        out.append(f"{s.beard} beard")
    return out


def _clothing_phrase(s: Scene) -> str:
    a, b = s.shirt_colors
    return f"{a} shirt" if s.shirt == "plain" else f"{a} and {b} {s.shirt} shirt"


def _background_phrases(s: Scene) -> list[str]:
    if s.bg_kind == "plain":
        return [f"{s.bg_color} background"]
    if s.bg_kind == "ground":
        return [f"{s.ground} ground", f"{s.sky} sky"]
    if s.bg_kind in ("orange sky", "mountains"):
        return [s.bg_kind] if s.bg_kind == "orange sky" else ["mountains", f"{s.sky} sky"]
    return ["sea", f"{s.sky} sky"]


def _object_phrases(s: Scene) -> list[str]:
    if s.thing == "none":
        return []
    if s.thing in ("ball", "flower"):
        return [f"{s.thing_color} {s.thing}"]
    return ["a box"] if s.thing == "box" else ["bread"]


def caption_parts(s: Scene) -> list[str]:
    """Comma-separated phrases: a concept's trigger list (token + tags), every other category in
    descriptive words."""
    parts: list[str] = []
    for cat, generic in (
        ("character", _character_phrases),
        ("clothing", lambda s: [_clothing_phrase(s)]),
        ("background", _background_phrases),
        ("object", _object_phrases),
        ("style", lambda s: list(s.styles)),
    ):
        cid = getattr(s, cat)
        parts += list(CONCEPT_BY_ID[cid]["trigger"]) if cid in CONCEPT_BY_ID else generic(s)
    return parts


def caption(
    s: Scene,
    rng: random.Random | None = None,
    p_drop: float = 0.0,
    shuffle: bool = False,
    keep: tuple[str, ...] = (),
) -> str:
    """Caption = base prompt + phrases. With ``rng`` phrases may be dropped (``p_drop``, never those in
    ``keep``) and shuffled (kohya's caption dropout and shuffle with keep tokens)."""
    parts = caption_parts(s)
    if rng is not None:
        parts = [p for p in parts if p in keep or rng.random() >= p_drop]
        if shuffle:
            rng.shuffle(parts)
    return ", ".join([BASE_PROMPT] + parts)


def trigger_prompt(ids: list[str]) -> str:
    return ", ".join([BASE_PROMPT] + [t for i in ids for t in CONCEPT_BY_ID[i]["trigger"]])


def tags_prompt(ids: list[str]) -> str:
    """The concepts' descriptive tags without their trigger tokens (what the base model can follow)."""
    return ", ".join([BASE_PROMPT] + [t for i in ids for t in CONCEPT_BY_ID[i]["trigger"][1:]])


def vocabulary_words() -> list[str]:
    words = set(BASE_PROMPT.split())
    for phrase_list in (
        [
            "a person",
            "metal head",
            "hair",
            "eyes",
            "cat ears",
            "pointy hat",
            "cap",
            "beard",
            "shirt",
            "and",
            "striped",
            "checkered",
            "background",
            "ground",
            "sky",
            "orange sky",
            "mountains",
            "sea",
            "ball",
            "flower",
            "a box",
            "bread",
        ],
        GENERIC_STYLES,
        [t for c in CONCEPT_IDS for t in CONCEPT_BY_ID[c]["trigger"]],
    ):
        for p in phrase_list:
            words |= set(p.split())
    words |= set(COLORS) | set(HAIR) | set(SKY) | {"dot", "visor"}
    words |= {"blurry", "lowres", "low", "quality", "ugly"}
    return sorted(words)

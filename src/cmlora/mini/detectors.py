"""The mini world's judge: one small CNN with, per category, a calibrated classifier (None + the
category's concepts), a graded score per concept (the share of its parts the image shows, so partial
presence gets partial credit) and an artifact score (how far the image's features lie from those of
the world's renders).

It is trained on renders (clean, blurred/noisy and VAE round-tripped), on renders with concepts
blended in at partial strength (soft targets) and on noise and blob images (no concept), then
calibrated by one temperature per category on held-out data. Decision rules fixed here, before any
benchmark run: a concept is *detected* when its calibrated probability is at least
``DETECT_THRESHOLD``; the artifact score is the Mahalanobis distance of the image's trunk features to
those of held-out round-tripped renders, divided by the square root of the feature dimension.

The graded head, trained with soft targets, comes out of training as a steeper function of a concept's
presence than the share it is meant to be (it under-credits a concept faded to a quarter and
over-credits one at three quarters), so it is calibrated too: per concept a monotone map of its logit,
fitted by isotonic regression of the target share on held-out data (:func:`fit_graded_map`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import world

CLASSES = {cat: [None] + [c["id"] for c in world.CONCEPTS[cat]] for cat in world.CATEGORIES}
WEIGHTS_NAME = "detectors.safetensors"
DETECT_THRESHOLD = 0.5
FEATURES = 256
#: The graded map's knots: logits of the graded head from -GRADED_LOGIT_RANGE to +GRADED_LOGIT_RANGE.
GRADED_KNOTS = 65
GRADED_LOGIT_RANGE = 10.0


class DetectorNet(nn.Module):
    def __init__(self, widths=(16, 32, 64, 96)):
        super().__init__()
        w0, w1, w2, w3 = widths

        def block(i, o, n=2):
            layers = []
            for k in range(n):
                layers += [
                    nn.Conv2d(i if k == 0 else o, o, 3, padding=1),
                    nn.BatchNorm2d(o),
                    nn.ReLU(inplace=True),
                ]
            return nn.Sequential(*layers, nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, w0, 1), block(w0, w1), block(w1, w2), block(w2, w3))
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(w3 * 16, FEATURES), nn.ReLU(inplace=True)
        )
        self.heads = nn.ModuleDict({cat: nn.Linear(FEATURES, len(CLASSES[cat])) for cat in world.CATEGORIES})
        self.graded = nn.Linear(FEATURES, len(world.CONCEPT_IDS))
        # Set after training: one temperature per category, the render feature statistics.
        self.register_buffer("temperature", torch.ones(len(world.CATEGORIES)))
        self.register_buffer("feat_mean", torch.zeros(FEATURES))
        self.register_buffer("feat_prec", torch.eye(FEATURES))
        # Set by fit_graded_map: per concept the calibrated score at each knot of the graded logit;
        # until then (graded_calibrated 0) the score is the head's sigmoid.
        self.register_buffer(
            "graded_knots", torch.linspace(-GRADED_LOGIT_RANGE, GRADED_LOGIT_RANGE, GRADED_KNOTS)
        )
        self.register_buffer("graded_map", torch.zeros(len(world.CONCEPT_IDS), GRADED_KNOTS))
        self.register_buffer("graded_calibrated", torch.zeros(()))

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # x: N,3,64,64 in [-1,1]
        return self.trunk(self.features(x))

    def forward(self, x):
        h = self.embed(x)
        out = {cat: head(h) for cat, head in self.heads.items()}
        out["graded"] = self.graded(h)
        out["features"] = h
        return out


_CACHE: dict[str, DetectorNet] = {}


def weights_path() -> str:
    from . import assets_dir

    return os.path.join(assets_dir(), WEIGHTS_NAME)


def read_detectors(path: str) -> DetectorNet:
    """A judge from its file (not cached: for changing and saving it). A judge saved before the graded
    map existed loads with the sigmoid score (uncalibrated)."""
    from safetensors.torch import load_file

    net = DetectorNet()
    state = load_file(path)
    missing = {k for k in ("graded_knots", "graded_map", "graded_calibrated") if k not in state}
    defaults = net.state_dict()
    net.load_state_dict({**{k: defaults[k] for k in missing}, **state})
    return net.eval()


def save_detectors(net: DetectorNet, path: str) -> None:
    """Write a judge's file whole or not at all, and forget any cached copy of it."""
    from safetensors.torch import save

    from ..files import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}))
    _CACHE.pop(path, None)


def judge_id(path: str | None = None) -> str:
    """Which judge this is: the first 16 hex digits of its file's SHA-256. Scores are tagged with it,
    so that scores from a retrained or recalibrated judge are never averaged with older ones."""
    import hashlib

    h = hashlib.sha256()
    with open(path or weights_path(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_detectors(path: str | None = None) -> DetectorNet:
    path = path or weights_path()
    if path not in _CACHE:
        _CACHE[path] = read_detectors(path)
    return _CACHE[path]


def images_to_tensor(images) -> torch.Tensor:
    arr = np.stack(
        [
            np.asarray(im.convert("RGB").resize((world.SIZE, world.SIZE)), dtype=np.uint8)
            if hasattr(im, "convert")
            else np.asarray(im, dtype=np.uint8)
            for im in images
        ]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass(frozen=True)
class Judgement:
    """What the judge says of a batch of images (arrays over images)."""

    proba: dict[str, np.ndarray]  # category -> (n, classes) calibrated probabilities
    graded: np.ndarray  # (n, concepts) share of each concept's parts shown, in CONCEPT_IDS order
    artifact: np.ndarray  # (n,) distance to the world's renders (about 1 for a typical render)

    def detected(self, i: int) -> dict[str, str | None]:
        out = {}
        for cat in world.CATEGORIES:
            p = self.proba[cat][i]
            k = int(p.argmax())
            out[cat] = CLASSES[cat][k] if k > 0 and p[k] >= DETECT_THRESHOLD else None
        return out

    def graded_of(self, i: int, concept: str) -> float:
        return float(self.graded[i, world.CONCEPT_IDS.index(concept)])

    def recall(self, concept: str) -> float:
        """The share of the images in which ``concept`` is detected."""
        cat = world.CONCEPT_BY_ID[concept]["category"]
        return float(np.mean([self.detected(i)[cat] == concept for i in range(len(self.artifact))]))

    def mean_graded(self, concept: str) -> float:
        """The mean graded score of ``concept`` over the images (summed in float64)."""
        return float(self.graded[:, world.CONCEPT_IDS.index(concept)].astype(np.float64).mean())


@torch.no_grad()
def judge(images, net: DetectorNet | None = None, batch_size: int = 256) -> Judgement:
    net = net or load_detectors()
    images = list(images)
    proba: dict[str, list] = {cat: [] for cat in world.CATEGORIES}
    graded, artifact = [], []
    for i in range(0, len(images), batch_size):
        out = net(images_to_tensor(images[i : i + batch_size]))
        for k, cat in enumerate(world.CATEGORIES):
            proba[cat].append((out[cat] / net.temperature[k]).softmax(-1).numpy())
        graded.append(graded_score(net, out["graded"]))
        d = out["features"] - net.feat_mean
        artifact.append((((d @ net.feat_prec) * d).sum(-1).clamp_min(0) / FEATURES).sqrt().numpy())
    return Judgement(
        {cat: np.concatenate(v) for cat, v in proba.items()}, np.concatenate(graded), np.concatenate(artifact)
    )


def graded_score(net: DetectorNet, logits: torch.Tensor) -> np.ndarray:
    """The graded head's logits (n, concepts) as scores in [0, 1]: the calibrated map when the net has
    one, else the sigmoid."""
    if not bool(net.graded_calibrated):
        return logits.sigmoid().cpu().numpy()
    x = logits.detach().cpu().double().numpy()
    knots = net.graded_knots.cpu().double().numpy()
    table = net.graded_map.cpu().double().numpy()
    return np.stack([np.interp(x[:, k], knots, table[k]) for k in range(x.shape[1])], axis=1).astype(
        np.float32
    )


def isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares non-decreasing fit of ``y`` on ``x`` (pool adjacent violators): the blocks' mean
    x and fitted y, in increasing x."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    sums_x, sums_y, counts = [], [], []
    for xv, yv in zip(xs, ys, strict=True):
        sums_x.append(xv)
        sums_y.append(yv)
        counts.append(1)
        while len(counts) > 1 and sums_y[-2] / counts[-2] >= sums_y[-1] / counts[-1]:
            sx, sy, n = sums_x.pop(), sums_y.pop(), counts.pop()
            sums_x[-1] += sx
            sums_y[-1] += sy
            counts[-1] += n
    n = np.asarray(counts, np.float64)
    return np.asarray(sums_x) / n, np.asarray(sums_y) / n


@torch.no_grad()
def fit_graded_map(net: DetectorNet, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Calibrate the graded score: per concept the isotonic regression of the target share on the
    head's logit over held-out images, read at the knots (flat beyond the data, so never outside the
    targets' range), stored in the net."""
    knots = net.graded_knots.cpu().double().numpy()
    x = logits.detach().cpu().double().numpy()
    y = targets.detach().cpu().double().numpy()
    if x.shape != y.shape or x.shape[1] != len(world.CONCEPT_IDS):
        raise ValueError(
            f"logits {tuple(x.shape)} and targets {tuple(y.shape)} must both be (n, {len(world.CONCEPT_IDS)})"
        )
    table = np.stack([np.interp(knots, *isotonic(x[:, k], y[:, k])) for k in range(x.shape[1])])
    net.graded_map.copy_(torch.from_numpy(table).to(net.graded_map))
    net.graded_calibrated.fill_(1.0)


def predict_proba(images, net: DetectorNet | None = None, batch_size: int = 256) -> dict[str, np.ndarray]:
    return judge(images, net, batch_size).proba


def detect(images, net: DetectorNet | None = None) -> list[dict[str, str | None]]:
    """For each 64x64 image: {category: concept id detected, or None}."""
    j = judge(list(images), net)
    return [j.detected(i) for i in range(len(j.artifact))]

"""Concept detectors of the mini world: one small CNN with a head per category (classes: None + the
category's concept ids), trained on rendered images (clean, blurred/noisy and VAE round-tripped)."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from . import world

CLASSES = {cat: [None] + [c["id"] for c in world.CONCEPTS[cat]] for cat in world.CATEGORIES}
WEIGHTS_NAME = "detectors.safetensors"


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
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(w3 * 16, 256), nn.ReLU(inplace=True)
        )
        self.heads = nn.ModuleDict({cat: nn.Linear(256, len(CLASSES[cat])) for cat in world.CATEGORIES})

    def forward(self, x):  # x: N,3,64,64 in [-1,1]
        h = self.trunk(self.features(x))
        return {cat: head(h) for cat, head in self.heads.items()}


_CACHE: dict[str, DetectorNet] = {}


def weights_path() -> str:
    from . import assets_dir

    return os.path.join(assets_dir(), WEIGHTS_NAME)


def load_detectors(path: str | None = None) -> DetectorNet:
    from safetensors.torch import load_file

    path = path or weights_path()
    if path not in _CACHE:
        net = DetectorNet()
        net.load_state_dict(load_file(path))
        net.eval()
        _CACHE[path] = net
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


@torch.no_grad()
def predict_proba(images, net: DetectorNet | None = None, batch_size: int = 256) -> dict[str, np.ndarray]:
    net = net or load_detectors()
    outs: dict[str, list] = {cat: [] for cat in world.CATEGORIES}
    for i in range(0, len(images), batch_size):
        logits = net(images_to_tensor(images[i : i + batch_size]))
        for cat in world.CATEGORIES:
            outs[cat].append(logits[cat].softmax(-1).numpy())
    return {cat: np.concatenate(v) for cat, v in outs.items()}


def detect(images, net: DetectorNet | None = None) -> list[dict[str, str | None]]:
    """For each 64x64 image: {category: concept id shown, or None}."""
    probs = predict_proba(list(images), net)
    n = len(images)
    return [{cat: CLASSES[cat][int(probs[cat][i].argmax())] for cat in world.CATEGORIES} for i in range(n)]

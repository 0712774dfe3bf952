"""Minimal kohya-LoRA helpers for the mini world (reading, validating and merging into a UNet copy).

cmlora's own loader is the general tool; these exist so the mini world can be checked on its own."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import load_file


def read_kohya(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """{'lora_unet_...': {'down': W_down, 'up': W_up, 'alpha': scalar}} grouped by module key."""
    sd = load_file(path)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        mod, _, kind = k.partition(".")
        name = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[kind]
        out.setdefault(mod, {})[name] = v
    return out


def module_index(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    return {prefix + n.replace(".", "_"): m for n, m in model.named_modules() if n}


def lora_deltas(path: str, unet, text_encoder=None, weight: float = 1.0, te_weight: float | None = None):
    """[(module, delta_weight)] for every module the file names; ``te_weight`` (default ``weight``)
    scales the text encoder's modules on their own, so a diagnosis can tell which half overdrives."""
    idx = module_index(unet, "lora_unet_")
    if text_encoder is not None:
        idx.update(module_index(text_encoder, "lora_te_"))
        # kohya keys carry the ``text_model`` level that transformers 5 dropped
        idx.update(module_index(text_encoder, "lora_te_text_model_"))
    out = []
    for key, t in read_kohya(path).items():
        if key.startswith("lora_te") and text_encoder is None:
            continue
        mod = idx[key]
        down, up = t["down"].float(), t["up"].float()
        rank = down.shape[0]
        alpha = float(t["alpha"]) if "alpha" in t else float(rank)
        w = te_weight if te_weight is not None and key.startswith("lora_te") else weight
        delta = (up.flatten(1) @ down.flatten(1)).reshape(mod.weight.shape) * (alpha / rank) * w
        out.append((mod, delta))
    return out


@torch.no_grad()
def merged_unet(unet, loras: list[tuple[str, float]]):
    """A deep copy of ``unet`` with the given (path, weight) LoRAs merged into its weights."""
    u = copy.deepcopy(unet)
    for path, w in loras:
        for mod, delta in lora_deltas(path, u, None, w):
            mod.weight.add_(delta.to(mod.weight.dtype))
    return u


@torch.no_grad()
def merged_models(unet, text_encoder, loras: list[tuple]):
    """Deep copies of ``unet`` and ``text_encoder`` with the (path, weight) LoRAs merged in: the
    mini world's own check of its LoRAs, independent of cmlora's engine. An entry (path, weight,
    te_weight) gives the text encoder's layers their own weight."""
    u, te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    for path, w, *te_w in loras:
        for mod, delta in lora_deltas(path, u, te, w, *te_w):
            mod.weight.add_(delta.to(mod.weight.dtype))
    return u, te

"""One sentence of help per method, variant and metric, as the README's Methods section says it.

Why a module: the page shows these next to the controls and under the results; keeping them in one
place (and tested against the registry) means a new method cannot appear on the page unexplained.
"""

from __future__ import annotations

METHOD_HELP: dict[str, str] = {
    "none": "The base model alone, no LoRA: the reference image.",
    "merge": "All LoRAs at once at their weights: one UNet call per step.",
    "switch": "One LoRA per tau steps in turn, character first: one call per step.",
    "switch-profiled": "Switch in CMLoRA's frequency order: high-frequency LoRAs early, the rest late.",
    "composite": "Each LoRA alone, predictions averaged by weight: N calls per step.",
    "cmlora-offline": "Composite with a rotating dominant LoRA and per-LoRA feature caches; "
    "dominance changes every c steps (most calls cached).",
    "cmlora-online": "CMLoRA whose phase switch comes when the latent's high-frequency statistic drops.",
    "cmlora-async": "CMLoRA with dominance on its own cadence and a decaying dominant weight.",
    "cmlora-reference": "The published CMLoRA schedule, for comparison with published numbers.",
    "loratorio": "The base model and each LoRA alone; per patch the LoRA that departs most from "
    "the base weighs most (SoftMin), N + 1 calls per step.",
}

METRIC_HELP: dict[str, str] = {
    "full calls": "UNet calls computed in full (each on the guidance batch).",
    "cached calls": "UNet calls that reuse a LoRA's cached deep features and compute only the shallow layers.",
    "GMAC": "Billions of multiply-accumulate operations the UNet calls did: the work, independent of the machine.",
    "seconds": "Wall time of this image on this machine, text encoding and decoding included.",
    "seed": "The starting noise: the same seed and settings give the same image.",
}

FIELD_HELP: dict[str, str] = {
    "loras": "Pick LoRAs (the model's own, --lora-dir files or uploads); their trigger words go into the prompt.",
    "table": "Weight: strength (merge, switch) or mixing weight (composite, CMLoRA). Category: "
    "character, clothing, style, background or object (orders CMLoRA without a profile). Order: "
    "the LoRA order.",
    "options": 'Method options as JSON, e.g. {"tau": 3} or {"cache_interval": 2}; each method takes its own.',
    "profile": "A frequency profile (cmlora profile) orders CMLoRA's LoRAs; default: the model's own when it has one.",
    "lora_scale": "Scales every LoRA's effect (1 = as trained).",
    "guidance": "Classifier-free guidance: higher follows the prompt more closely.",
}


def method_help_markdown(labels: tuple[str, ...]) -> str:
    """The help list shown under the method picker."""
    return "\n".join(f"- **{label}**: {METHOD_HELP[label]}" for label in labels)


def metric_help_markdown() -> str:
    """The legend under the result cards."""
    return " · ".join(f"**{name}**: {text}" for name, text in METRIC_HELP.items())

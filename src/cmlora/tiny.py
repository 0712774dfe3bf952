"""Tiny random Stable Diffusion pipelines, built offline.

Tests, benchmarks' smoke runs and the no-network demo need real diffusers pipelines with the
SD-1.5 and SDXL *block layouts* (so the cache split, LoRA key mapping and MAC counting are
exercised on the real module names) but cannot download weights. These builders make such
pipelines from configs alone, with a CLIP tokenizer written from a small vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

_WORDS = (
    "a photo of the and with in on at by an is red green blue black white pink hair eyes girl boy "
    "man woman dog cat tree sky bamboo aurora star night city style drawn painting ink lineart "
    "uniform suit gloves heels sword hat cup masterpiece best quality worst low raw 8k portrait "
    "outdoors indoors background character object clothing wolf ears long short spiked muscular"
).split()


def write_tiny_tokenizer_files(folder: Path) -> Path:
    """Write a byte-level BPE vocabulary that covers lowercase text.

    Every single character (with and without the end-of-word marker) is in the vocabulary, so
    any prompt tokenizes; a few whole words get merges so prompts are not all characters.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    chars += list(",.-!'_()")
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        # Merge left to right so every prefix is a token; the last merge yields the word + </w>.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            if merge not in merges:
                merges.append(merge)
            current = current + piece
            vocab.setdefault(current, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def tiny_tokenizer(folder: Path | None = None):
    """The tiny CLIP tokenizer, its files written to ``folder`` or, without one, to a temporary
    folder removed once loaded (every tiny pipeline builds one: kept, they pile up in /tmp)."""
    from transformers import CLIPTokenizer

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="cmlora-tok-") as scratch:
            return tiny_tokenizer(Path(scratch))
    write_tiny_tokenizer_files(Path(folder))
    # from_pretrained reads vocab.json/merges.txt under both transformers 4 and 5 (whose
    # constructors differ: 5 takes the vocabulary itself, not file names).
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=32, pad_token="<|endoftext|>")


def _text_encoder(vocab_size: int, hidden: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ).eval()


def _scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        steps_offset=1,
    )


def tiny_sd15_pipeline(seed: int = 0):
    """SD-1.5 layout: CrossAttn down blocks first, linear-projection-free transformers."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tiny_tokenizer()
    text_encoder = _text_encoder(len(tokenizer), 32, projection=False, seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    return StableDiffusionPipeline(
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """SDXL layout: attention-free first level, two text encoders, text_time conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer()
    text_encoder = _text_encoder(len(tokenizer), 16, projection=False, seed=seed)
    text_encoder_2 = _text_encoder(len(tokenizer_2), 16, projection=True, seed=seed + 10)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=False,
    )


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_lora_state_dict(
    pipe,
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.3,
    fmt: str = "kohya",
    text_encoder: bool = True,
    alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """A LoRA on every attention q/k/v/out and feed-forward layer (text encoders too), in the
    layout of ``fmt``: "kohya" (lora_unet_*/lora_te*_ + .alpha), "diffusers" (unet.*.lora_A/B)
    or "peft" (base_model.model.*.lora_A/B, UNet only)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for component, name, module, key in _target_layers(pipe, text_encoder and fmt != "peft"):
        down = torch.randn(rank, module.in_features, generator=generator) * scale
        up = torch.randn(module.out_features, rank, generator=generator) * scale
        if fmt == "kohya":
            state[key + ".lora_down.weight"] = down
            state[key + ".lora_up.weight"] = up
            state[key + ".alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        elif fmt == "diffusers":
            state[f"{component}.{name}.lora_A.weight"] = down
            state[f"{component}.{name}.lora_B.weight"] = up
        elif fmt == "peft":
            state[f"base_model.model.{name}.lora_A.weight"] = down
            state[f"base_model.model.{name}.lora_B.weight"] = up
        else:
            raise ValueError(f"unknown LoRA layout {fmt!r}; use kohya, diffusers or peft")
    return state


def _target_layers(pipe, text_encoder: bool):
    """(component, module name, Linear, kohya key) of every layer the random files adapt, in a fixed
    order (their random draws follow it). kohya names text-encoder layers with transformers 4's
    "text_model." level."""
    components = [("unet", UNET_TARGETS)]
    if text_encoder:
        components.append(("text_encoder", TEXT_TARGETS))
        if getattr(pipe, "text_encoder_2", None) is not None:
            components.append(("text_encoder_2", TEXT_TARGETS))
    kohya_prefix = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if hasattr(pipe, "text_encoder_2") else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    for component, targets in components:
        for name, module in getattr(pipe, component).named_modules():
            if not isinstance(module, torch.nn.Linear) or not name.endswith(targets):
                continue
            path = name if component == "unet" or name.startswith("text_model.") else "text_model." + name
            yield component, name, module, kohya_prefix[component] + path.replace(".", "_")


def write_random_lora(pipe, path, **kwargs) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file(random_lora_state_dict(pipe, **kwargs), str(path))
    return path


def _lycoris_factors(kind: str, out_f: int, in_f: int, rank: int, generator, scale: float) -> dict:
    """Random LoHa or LoKr factors for an (out_f, in_f) Linear, in the LyCORIS suffix layout.
    LoKr splits both sides by 8 where they divide (``lokr_w1`` 8x8, ``lokr_w2_a/b`` of ``rank``),
    a common LoKr training setting (LyCORIS ``factor=8``)."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * scale

    if kind == "loha":
        return {
            "hada_w1_a": randn(out_f, rank),
            "hada_w1_b": randn(rank, in_f),
            "hada_w2_a": randn(out_f, rank),
            "hada_w2_b": randn(rank, in_f),
        }
    if kind == "lokr":
        a = 8 if out_f % 8 == 0 else 1
        c = 8 if in_f % 8 == 0 else 1
        return {
            "lokr_w1": randn(a, c),
            "lokr_w2_a": randn(out_f // a, rank),
            "lokr_w2_b": randn(rank, in_f // c),
        }
    raise ValueError(f"unknown LyCORIS kind {kind!r}; use loha or lokr")


def random_lycoris_state_dict(
    pipe, kind: str, rank: int = 4, seed: int = 0, scale: float = 0.3, text_encoder: bool = True
) -> dict[str, torch.Tensor]:
    """A LoHa or LoKr file (kohya/LyCORIS layout, with alpha = rank) on the layers
    ``random_lora_state_dict`` targets: for benchmarks and smoke runs without lycoris-lora."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for _, _, module, key in _target_layers(pipe, text_encoder):
        factors = _lycoris_factors(kind, module.out_features, module.in_features, rank, generator, scale)
        for suffix, tensor in factors.items():
            state[f"{key}.{suffix}"] = tensor
        state[key + ".alpha"] = torch.tensor(float(rank))
    return state


def write_random_lycoris(pipe, path, kind: str, **kwargs) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file(random_lycoris_state_dict(pipe, kind, **kwargs), str(path))
    return path

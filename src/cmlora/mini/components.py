"""Configs and builders of the mini diffusers components (VAE, UNet, CLIP text encoder + tokenizer)."""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

from . import PACKAGED_ASSETS, world

MAX_TOKENS = 48
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
PUNCT = [",", ".", "-", "(", ")", ":", "!", "?", "'"]
#: The tokenizer the shipped text encoder was trained with (a rebuild copies it, `build_tokenizer`).
SHIPPED_TOKENIZER = os.path.join(PACKAGED_ASSETS, "pipeline", "tokenizer", "tokenizer.json")

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    # diffusers reads this as the number of heads: 2 heads of width 16/32. With 8 (widths 4 and 8)
    # CPU attention kernels took half of a training step for no gain at this size.
    attention_head_dim=2,
    norm_num_groups=16,
    transformer_layers_per_block=1,
)

TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    projection_dim=64,
    hidden_act="quick_gelu",
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


def learn_bpe(words: list[str]) -> list[tuple[str, str]]:
    """The merges of a CLIP-style BPE (word ends marked ``</w>``) learnt on ``words`` until every word
    is one token: at each step the pair found in the most words, ties broken by the pair's text, so
    the same in every process (the ``tokenizers`` trainer breaks ties in an order that changes from
    process to process, and with it some words' ids)."""
    seqs = [[*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter(p for seq in seqs for p in zip(seq, seq[1:], strict=False))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


def _write_bpe(folder: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def _covers_the_world(tok) -> bool:
    vocab = tok.get_vocab()
    return all(t in vocab for t in SPECIAL) and all(
        len(tok.tokenize(w)) == 1 for w in world.vocabulary_words() + PUNCT
    )


def build_tokenizer(folder: str, reference: str | None = None):
    """A small CLIP BPE written to ``folder`` in which every word of the mini world is one token (any
    other word falls back to characters: all single characters and their '</w>' forms are in the
    vocab), and where it came from.

    ``reference`` (a ``tokenizer.json``, the shipped world's `SHIPPED_TOKENIZER`) is copied when it
    still covers the world's vocabulary: a tokenizer is data of the world, like its word list, and its
    ids decide which embedding each word trains, so a rebuild that re-learnt it would not give the
    shipped text encoder. Otherwise the tokenizer is learnt anew by `learn_bpe`."""
    from transformers import CLIPTokenizer

    def load():
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)

    if reference and os.path.isfile(reference):
        with open(reference) as f:
            model = json.load(f)["model"]
        _write_bpe(
            folder,
            model["vocab"],
            [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]],
        )
        tok = load()
        if _covers_the_world(tok):
            return tok, f"copied from {reference}"
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789") | set("".join(PUNCT)))
    merges = learn_bpe(world.vocabulary_words() + PUNCT)
    vocab: dict[str, int] = {}
    for t in [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), *SPECIAL]:
        vocab.setdefault(t, len(vocab))
    _write_bpe(folder, vocab, merges)
    return load(), "learnt anew" + (
        f" ({reference} does not make every world word one token)" if reference else ""
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        eos_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
        **TEXT_CONFIG,
    )
    return CLIPTextModel(cfg)


def build_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def to_tensor(images) -> torch.Tensor:
    """list of PIL / uint8 HWC arrays -> float tensor NCHW in [-1, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor):
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]

"""UNet MAC counts (attention included) against torch's own FLOP counter."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from cmlora import LoRA
from cmlora.api import Composer
from cmlora.macs import MacCounter
from cmlora.tiny import write_random_lora
from cmlora.unet_cache import CachePoint, UNetSplit


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_macs_equal_an_independent_flop_count(request, tmp_path, which):
    """With diffusers' explicit-matmul attention processor, FlopCounterMode sees every matmul of the
    UNet (convolutions, linears, LoRA deltas, QK^T and AV): our hook-based MACs must be half its FLOPs,
    for plain, full and cached calls alike."""
    pipe = copy.deepcopy(request.getfixturevalue(which))
    pipe.unet.set_attn_processor(AttnProcessor())
    unet = pipe.unet
    lora = LoRA(write_random_lora(pipe, tmp_path / "l.safetensors", seed=1, rank=3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    added = None
    if which == "sdxl":
        added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    t = torch.tensor(500)
    split = UNetSplit(unet, CachePoint(0, 0))
    with Composer(pipe, [lora]) as composer, torch.no_grad():
        _, entry = split(x, t, ehs, added)
        counts = {}
        for adapters in ((), ((lora.adapter, 1.0),)):
            composer.adapters.unet.set(adapters)
            runs = {
                "plain": lambda: unet(x, t, ehs, added_cond_kwargs=added).sample,
                "full": lambda: split(x, t, ehs, added),
                "cached": lambda: split(x, t, ehs, added, entry=entry),
            }
            for mode, run in runs.items():
                with FlopCounterMode(display=False) as flops:
                    _, macs = MacCounter(unet).count(mode, run)
                assert 2 * macs == flops.get_total_flops(), (mode, adapters)
                by_op = {str(op): n for op, n in flops.get_flop_counts()["Global"].items()}
                attention = by_op.get("aten.bmm", 0) + by_op.get("aten.baddbmm", 0)
                # QK^T and AV are in the count (SDXL's shallow level 0 of a cached call has no attention)
                assert attention > 0 or (which, mode) == ("sdxl", "cached")
                counts[mode, bool(adapters)] = macs
        composer.adapters.unet.clear()
    for lora_on in (False, True):
        assert counts["full", lora_on] == counts["plain", lora_on] > counts["cached", lora_on]
    assert counts["plain", True] > counts["plain", False]  # the active LoRA's delta matmuls count


def test_fused_macs_equal_an_independent_flop_count(sd15, tmp_path):
    """A fused call runs one matmul per layer: its count is the base model's, and still half of
    FlopCounterMode's FLOPs once the fused weights exist."""
    pipe = copy.deepcopy(sd15)
    pipe.unet.set_attn_processor(AttnProcessor())
    unet = pipe.unet
    lora = LoRA(write_random_lora(pipe, tmp_path / "l.safetensors", seed=2, rank=3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500)
    with Composer(pipe, [lora]) as composer, torch.no_grad():
        counts = {}
        for fuse in (False, True):
            composer.adapters.unet.set(((lora.adapter, 1.0),), fuse=fuse)
            unet(x, t, ehs)  # builds the fused weights outside the count
            with FlopCounterMode(display=False) as flops:
                _, counts[fuse] = MacCounter(unet).count("plain", lambda: unet(x, t, ehs).sample)
            assert 2 * counts[fuse] == flops.get_total_flops(), fuse
        composer.adapters.unet.clear()
        _, base = MacCounter(unet).count("plain", lambda: unet(x, t, ehs).sample)
    assert counts[True] == base < counts[False]

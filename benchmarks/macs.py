"""UNet MACs (attention counted) of a full call and of cached calls at each cache point, on the real
SD-1.5 / SDXL architectures with random weights: the cost model behind CMLoRA's speed-up.

    python benchmarks/macs.py --arch sd15 --size 512      # CFG batch of 2, 77-token context
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from speed import ARCHS  # noqa: E402

from cmlora.macs import MacCounter  # noqa: E402
from cmlora.unet_cache import CachePoint, UNetSplit  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=tuple(ARCHS), default="sd15")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    pipe = ARCHS[args.arch](torch.float32)
    unet = pipe.unet
    latent = args.size // pipe.vae_scale_factor
    x = torch.randn(2, 4, latent, latent)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}
    counter = MacCounter(unet)
    with torch.no_grad():
        _, full = counter.count("full", lambda: unet(x, 500, ehs, added_cond_kwargs=added))
        print(f"{args.arch} {args.size}px CFG batch 2: full call {full / 1e9:.0f} GMAC")
        for block in (0, 1):
            split = UNetSplit(unet, CachePoint(0, block))
            (_, entry), _ = counter.count(
                ("store", block), lambda s=split: s(x, torch.tensor(500), ehs, added)
            )
            _, cached = counter.count(
                ("cached", block), lambda s=split, e=entry: s(x, torch.tensor(500), ehs, added, entry=e)
            )
            print(
                f"  cached call, cache point layer 0 block {block}: {cached / 1e9:.0f} GMAC "
                f"({100 * cached / full:.1f}% of full; entry {tuple(entry.shape[1:])} per CFG row)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

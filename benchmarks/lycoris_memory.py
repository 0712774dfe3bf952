"""Memory cmlora holds for LyCORIS files on the real SD-1.5 / SDXL layer shapes, from shapes alone.

    python benchmarks/lycoris_memory.py                # SD-1.5 and SDXL, five files of each kind, fp16

The architectures are built on the meta device (no weights), each targeted layer gets the factor
shapes LyCORIS trains for it, and ``cmlora.lycoris.layer_delta`` (the function a session runs) says
which form cmlora keeps, low-rank factors or a dense delta; its tensors' sizes are summed. Exact for
the shapes given (the values of a real file do not change its size); a session holds this once,
in the weight's dtype, whatever the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import sd15_pipeline, sdxl_pipeline  # noqa: E402

from cmlora.loras import LoRAModuleWeights  # noqa: E402
from cmlora.lycoris import Factors, layer_delta  # noqa: E402
from cmlora.tiny import TEXT_TARGETS, UNET_TARGETS  # noqa: E402

KINDS = {
    "lora r64": ("lora", 64, False),
    "loha r8": ("loha", 8, False),
    "lokr f8 r8": ("lokr", 8, False),
    "dora (lora r16)": ("lora", 16, True),
}
BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "CLIPAttention", "CLIPMLP")


def targets(model: torch.nn.Module, coverage: str, text: bool) -> list[torch.nn.Module]:
    """attn-ff: attention q/k/v/out and feed-forward Linears (the benchmark files' layers);
    full: every Linear and Conv2d inside the blocks kohya/LyCORIS presets target."""
    if coverage == "attn-ff":
        ends = TEXT_TARGETS if text else UNET_TARGETS
        return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ends)]
    found: dict[int, torch.nn.Module] = {}
    for block in model.modules():
        if type(block).__name__ in BLOCKS:
            for m in block.modules():
                if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
                    found[id(m)] = m
    return list(found.values())


def _split(dim: int, factor: int) -> tuple[int, int]:
    return (factor, dim // factor) if dim % factor == 0 and dim // factor >= factor else (1, dim)


def factor_shapes(kind: str, rank: int, weight: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The factor shapes LyCORIS (``algo=...``, ``factor=8``, no Tucker) trains for ``weight``."""
    out, fan_in = weight[0], 1
    for d in weight[1:]:
        fan_in *= d
    if kind == "lora":
        return {"down": (rank, *weight[1:]), "up": (out, rank) + ((1, 1) if len(weight) == 4 else ())}
    if kind == "loha":
        return {"w1a": (out, rank), "w1b": (rank, fan_in), "w2a": (out, rank), "w2b": (rank, fan_in)}
    a, b = _split(out, 8)
    c, d = _split(weight[1], 8)
    kernel = 1
    for k in weight[2:]:
        kernel *= k
    shapes = {"w1": (a, c)}
    if rank < max(b, d) / 2:
        shapes |= {"w2a": (b, rank), "w2b": (rank, d * kernel)}
    else:
        shapes["w2"] = (b, d, *weight[2:])
    return shapes


def held_bytes(layer: torch.nn.Module, kind: str, rank: int, dora: bool, dtype: torch.dtype) -> int:
    weight = tuple(layer.weight.shape)
    tensors = {
        role: torch.empty(shape, device="meta") for role, shape in factor_shapes(kind, rank, weight).items()
    }
    if dora:
        tensors["dora_scale"] = torch.empty((weight[0],) + (1,) * (len(weight) - 1), device="meta")
    entry = LoRAModuleWeights(component="", key="", tensors=tensors, alpha=None, kind=kind)
    delta = layer_delta(entry, layer)
    parts = (delta.down, delta.up) if isinstance(delta, Factors) else (delta.weight,)
    return sum(p.numel() for p in parts) * torch.finfo(dtype).bits // 8


def measure(arch: str, files: int, dtype: torch.dtype) -> list[dict]:
    import cmlora.tiny

    scheduler = cmlora.tiny._scheduler()  # schedulers cannot be built on the meta device
    build = cmlora.tiny._scheduler
    cmlora.tiny._scheduler = lambda: scheduler
    try:
        with torch.device("meta"):
            pipe = {"sd15": sd15_pipeline, "sdxl": sdxl_pipeline}[arch](torch.float32)
    finally:
        cmlora.tiny._scheduler = build
    models = [(pipe.unet, False), (pipe.text_encoder, True)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        models.append((pipe.text_encoder_2, True))
    rows = []
    unet_bytes = sum(p.numel() for p in pipe.unet.parameters()) * torch.finfo(dtype).bits // 8
    for coverage in ("attn-ff", "full"):
        layers = [(m, text) for model, text in models for m in targets(model, coverage, text)]
        weight_bytes = sum(m.weight.numel() for m, _ in layers) * torch.finfo(dtype).bits // 8
        for label, (kind, rank, dora) in KINDS.items():
            per_file = sum(held_bytes(m, kind, rank, dora, dtype) for m, _ in layers)
            rows.append(
                {
                    "arch": arch,
                    "coverage": coverage,
                    "kind": label,
                    "layers": len(layers),
                    "targeted_weights_gb": weight_bytes / 2**30,
                    "per_file_gb": per_file / 2**30,
                    "files": files,
                    "total_gb": files * per_file / 2**30,
                    "unet_gb": unet_bytes / 2**30,
                }
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15,sdxl")
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = [row for arch in args.arch.split(",") for row in measure(arch, args.files, dtype)]
    print(f"| arch | layers | kind | per file GB | {args.files} files GB | targeted weights GB | UNet GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['coverage']} ({r['layers']}) | {r['kind']} | {r['per_file_gb']:.3f} | "
            f"{r['total_gb']:.2f} | {r['targeted_weights_gb']:.2f} | {r['unet_gb']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"dtype": args.dtype, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

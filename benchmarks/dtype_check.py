"""Half precision and batching on a device, checked on the mini world: the same compositions, methods
and seeds generated in fp32, fp16 and bf16 (and fp32 with the per-LoRA calls run one by one), scored by
the concept detectors, with each image's pixel difference to the fp32 batched image.

    python benchmarks/dtype_check.py --device cuda              # fp32, fp16, bf16 on the GPU
    python benchmarks/dtype_check.py --device cpu --every 60    # quick look on the CPU

Half precision is fit for composition when its recall matches fp32's and its images differ from fp32's
by little (the detectors see the same concepts); a NaN or black image shows as recall 0 and a large
difference. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

METHODS = {
    "merge": ("merge", None),
    "composite": ("composite", None),
    "cmlora-offline": ("cmlora", "offline"),
    "cmlora-online": ("cmlora", "online"),
}


def run(args, save=None) -> dict:
    """``save`` gets the result so far after each precision: a run stopped by a time limit keeps them."""
    from cmlora import mini
    from cmlora.evaluate.concepts import concept_recall
    from cmlora.mini.detectors import detect
    from cmlora.models import load_base
    from cmlora.testbed.compositions import image_seed
    from cmlora.testbed.generator import CompositionGenerator, mini_compositions
    from cmlora.testbed.presets import MINI_DEFAULTS
    from cmlora.testbed.sweep import SweepJob

    comps = mini_compositions()[:: args.every]
    methods = {label: METHODS[label] for label in args.methods.split(",")}
    variants = [(dtype, True) for dtype in args.dtypes.split(",")] + [("fp32", False)]
    images: dict[tuple, np.ndarray] = {}
    rows = []
    for dtype, batched in variants:
        base = load_base("mini", args.device, dtype)
        generate = CompositionGenerator(
            base,
            methods,
            dict(MINI_DEFAULTS),
            lambda e: Path(mini.lora_path(e.id)),
            batch_calls=batched,
        )
        start = time.perf_counter()
        for comp in comps:
            for label in methods:
                for k in range(args.seeds):
                    job = SweepJob(comp, label, {}, k, image_seed(0, comp.id, k))
                    image, _ = generate(job)
                    pixels = np.asarray(image, dtype=np.float32)
                    images[(dtype, batched, comp.id, label, k)] = pixels
                    expected = {e.category: e.id for e in comp.loras}
                    recall, _ = concept_recall(expected, detect([image])[0])
                    reference = images.get(("fp32", True, comp.id, label, k), pixels)
                    rows.append(
                        {
                            "dtype": dtype,
                            "batched": batched,
                            "composition": comp.id,
                            "method": label,
                            "seed_index": k,
                            "recall": recall,
                            "mean_abs_diff_to_fp32": float(np.abs(pixels - reference).mean()),
                            "max_abs_diff_to_fp32": float(np.abs(pixels - reference).max()),
                            "not_blank": bool(pixels.std() > 0),  # NaN latents decode to a flat image
                        }
                    )
        generate.close()
        seconds = time.perf_counter() - start
        print(f"{dtype} batched={batched}: {seconds:.1f} s", file=sys.stderr)
        rows.append({"dtype": dtype, "batched": batched, "seconds": seconds})
        if save is not None:
            save(_result(args, comps, rows))
    return _result(args, comps, rows)


def _result(args, comps, rows) -> dict:
    import torch

    return {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "compositions": len(comps),
        "seeds": args.seeds,
        "versions": __import__("cmlora.records", fromlist=["x"]).library_versions(),
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"mini world on {result['device']} ({result['gpu'] or 'cpu'}), {result['compositions']} compositions x "
        f"{result['seeds']} seeds; pixel differences in 8-bit levels against fp32 batched",
        "| dtype | per-LoRA calls | method | recall | mean abs diff | max abs diff | not blank | s (all methods) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    images = [r for r in result["rows"] if "method" in r]
    seconds = {(r["dtype"], r["batched"]): r["seconds"] for r in result["rows"] if "seconds" in r}
    for (dtype, batched), secs in seconds.items():
        for method in dict.fromkeys(r["method"] for r in images):
            sel = [r for r in images if (r["dtype"], r["batched"], r["method"]) == (dtype, batched, method)]
            lines.append(
                f"| {dtype} | {'batched' if batched else 'one by one'} | {method} | "
                f"{statistics.mean(r['recall'] for r in sel):.3f} | "
                f"{statistics.mean(r['mean_abs_diff_to_fp32'] for r in sel):.2f} | "
                f"{max(r['max_abs_diff_to_fp32'] for r in sel):.0f} | "
                f"{sum(r['not_blank'] for r in sel)}/{len(sel)} | {secs:.1f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--dtypes", default="fp32,fp16,bf16", help="the first is the reference; list fp32 first"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--every", type=int, default=20, help="every k-th of the 240 compositions")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/dtype_check.json")
    args = parser.parse_args(argv)
    if args.dtypes.split(",")[0] != "fp32":
        parser.error(
            f"--dtypes {args.dtypes!r}: the first must be fp32, the reference the others are compared to"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args, lambda partial: out.write_text(json.dumps(partial, indent=1)))
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

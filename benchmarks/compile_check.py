"""torch.compile and composition: graphs are compiled once per distinct adapter activation, never per
LoRA switch afterwards, and the images equal the uncompiled ones.

    python benchmarks/compile_check.py [--backend eager|inductor]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="eager")
    args = parser.parse_args(argv)
    from torch._dynamo.utils import counters

    from cmlora import LoRA, compose
    from cmlora.tiny import tiny_sd15_pipeline, write_random_lora

    torch.set_num_threads(1)
    pipe = tiny_sd15_pipeline()
    folder = Path(tempfile.mkdtemp())
    loras = [LoRA(write_random_lora(pipe, folder / f"l{k}.safetensors", seed=k)) for k in range(3)]
    kwargs = dict(prompt="a", num_inference_steps=6, height=16, width=16, progress=False)
    reference = {
        m: np.asarray(compose(pipe, loras, method=m, **kwargs).images[0]) for m in ("composite", "merge")
    }
    pipe.unet.compile(backend=args.backend)
    ok = True
    for method in ("composite", "composite", "switch", "merge", "composite"):
        counters.clear()
        image = np.asarray(compose(pipe, loras, method=method, **kwargs).images[0])
        graphs = counters["stats"].get("unique_graphs", 0)
        same = method not in reference or np.array_equal(image, reference[method])
        ok &= same
        print(f"{method:10s} new graphs compiled: {graphs}   equal to uncompiled: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Speed of every method on the real SD-1.5 / SDXL architectures (random weights: compute does not
depend on the values), with N = 2..5 rank-64 LoRAs on all attention and feed-forward layers.

    python benchmarks/speed.py                       # CPU defaults: SD-1.5, 256x256, T=20, N=2..5
    python benchmarks/speed.py --preset gpu          # 512x512 SD-1.5 and 1024x1024 SDXL, fp16, CUDA
    python benchmarks/speed.py --arch tiny --n 2 --steps 3 --repeats 1   # smoke run (the test suite's)
    python benchmarks/speed.py --arch mini --n 5 --compile inductor     # torch.compile against eager
    python benchmarks/speed.py --arch mini --n 5 --kind lyco            # five LoHa/LoKr files

Per method and N: median seconds per image over repeats, full/cached UNet calls, UNet GMACs (attention
counted), seconds inside UNet calls, share of the denoising loop spent outside UNet calls (activation,
mixing, cache bookkeeping), peak memory, and ratios to merge and to composite. Writes JSON, prints a table.

Peer rows (``--methods`` names diffusers-plain, peft-merge, peft-fused, peft-switch; in the defaults):
plain diffusers without LoRA (the floor) and diffusers + PEFT on the same pipeline and LoRA files; each
cmlora merge/switch row gets its ratio to its peer ("x peer") and every row its ratio to the floor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from cmlora.mini import SIZE as MINI_SIZE

CATEGORY_ORDER = ("character", "clothing", "style", "background", "object")
METHODS = {
    "merge": ("merge", None, {}),
    "switch": ("switch", None, {}),
    "switch-profiled": ("switch", "profiled", {}),
    "composite": ("composite", None, {}),
    "cmlora-offline": ("cmlora", "offline", {}),
    "cmlora-reference-c3": ("cmlora", "reference", {"cache_interval": 3}),
    "composite+cache-c3": ("composite", None, {"cache_interval": 3}),
    "cmlora-block0-c5": ("cmlora", "offline", {"cache_interval": 5, "cache_block": 0}),
    "loratorio": ("loratorio", None, {}),
    "loratorio-c3": ("loratorio", None, {"cache_interval": 3}),
}
#: Peer rows: plain diffusers (no LoRA, the floor of a one-call method) and diffusers + PEFT on the
#: same pipeline and the same LoRA files (see ``run_peer``).
PEERS = ("diffusers-plain", "peft-merge", "peft-fused", "peft-switch")
#: Switch's default tau: PEFT's switch changes adapter every SWITCH_TAU steps, as cmlora's does.
SWITCH_TAU = 5


def clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )


def sd_vae(sample_size: int, scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def tokenizer_77():
    from cmlora.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 77  # the real CLIP context length: same compute as the real tokenizer
    return tokenizer


def sd15_pipeline(dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from cmlora.tiny import _scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline(
        vae=sd_vae(512, 0.18215, force_upcast=False),
        text_encoder=clip_l(),
        tokenizer=tokenizer_77(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def sdxl_pipeline(dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from cmlora.tiny import _scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    bigg = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            projection_dim=1280,
            hidden_act="gelu",
        )
    )
    pipe = StableDiffusionXLPipeline(
        vae=sd_vae(1024, 0.13025, force_upcast=True),
        text_encoder=clip_l(),
        text_encoder_2=bigg,
        tokenizer=tokenizer_77(),
        tokenizer_2=tokenizer_77(),
        unet=unet,
        scheduler=_scheduler(),
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_pipeline(dtype: torch.dtype):
    from cmlora.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def mini_pipeline(dtype: torch.dtype):
    from cmlora import mini

    return mini.load_pipeline(dtype=dtype)


ARCHS = {"sd15": sd15_pipeline, "sdxl": sdxl_pipeline, "tiny": tiny_pipeline, "mini": mini_pipeline}
#: Image size of the architectures whose size is fixed by their training (the rest take --size).
FIXED_SIZE = {"tiny": 16, "mini": MINI_SIZE}
#: Methods that make one UNet call per step whatever N is: batching has nothing to group.
SINGLE_CALL = {"merge", "switch", "switch-profiled"}


def peer_of(row: dict) -> str | None:
    """The peer row a cmlora row is compared with: merge (un-fused) -> peft-merge, merge fused ->
    peft-fused, switch (fused or not: PEFT has no fused switch) -> peft-switch."""
    base = row["method"].removesuffix(" batched").removesuffix(" fused")
    if base == "merge":
        return "peft-fused" if row["fused"] else "peft-merge"
    if base == "switch":
        return "peft-switch"
    return None


class PeakMemory:
    """Peak device memory (CUDA) or peak process RSS sampled every 10 ms (CPU) during a block."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        process = psutil.Process()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                self._stop.wait(0.01)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def run(args, save=None) -> dict:
    """``save`` gets the result so far after each row: a run stopped by a time limit keeps its rows."""
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    built = time.perf_counter()
    pipe = ARCHS[args.arch](dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    print(f"built {args.arch} in {time.perf_counter() - built:.1f} s", file=sys.stderr)
    size = FIXED_SIZE.get(args.arch, args.size)
    with tempfile.TemporaryDirectory(prefix="cmlora-bench-") as scratch:
        return _measure(args, pipe, size, Path(scratch), save)


def _measure(args, pipe, size: int, folder: Path, save) -> dict:
    """Every (N, method) row of a run, with its LoRA files written to ``folder``."""
    from cmlora import LoRA
    from cmlora.api import Composer

    sizes = [int(n) for n in args.n.split(",")]
    files = [
        write_file(args, pipe, folder / f"{CATEGORY_ORDER[k]}.safetensors", k) for k in range(max(sizes))
    ]
    rows = []
    labels = args.methods.split(",")
    if args.kind != "lora":  # diffusers + PEFT cannot load LoHa/LoKr files: only the no-LoRA floor
        labels = [m for m in labels if m not in PEERS or m == "diffusers-plain"]
    for n in sizes:
        for label in (m for m in labels if m in PEERS):
            rows.append(run_peer(args, pipe, label, files[:n], size))
            print(f"N={n} {label:22s} {rows[-1]['seconds']:8.2f} s", file=sys.stderr)
            if save is not None:
                save(_result(args, size, rows))
        loras = [LoRA(files[k], category=CATEGORY_ORDER[k]) for k in range(n)]
        with Composer(pipe, loras) as composer:
            if args.compile:
                composer.compile(backend=args.compile)
            for label, batch, fuse in _runs([m for m in labels if m not in PEERS], args.batch, args.fuse):
                method, variant, options = METHODS[label]
                if args.batch == "both" and batch == "on":
                    label = f"{label} batched"
                if args.fuse == "both" and fuse == "on":
                    label = f"{label} fused"
                kwargs = dict(
                    prompt="a photo",
                    method=method,
                    variant=variant,
                    num_inference_steps=args.steps,
                    guidance_scale=7.5,
                    height=size,
                    width=size,
                    progress=False,
                    **options,
                )
                if batch != "auto":
                    kwargs["batch_calls"] = batch == "on"
                if fuse != "auto":
                    kwargs["fuse_loras"] = fuse == "on"
                # warm-up (counts MACs); compiled, it runs every step so that no timed image compiles
                warmup = time.perf_counter()
                composer.generate(
                    seed=0, **{**kwargs, "num_inference_steps": args.steps if args.compile else 2}
                )
                warmup = time.perf_counter() - warmup
                seconds, records = [], []
                with PeakMemory(args.device) as memory:
                    for r in range(args.repeats):
                        start = time.perf_counter()
                        record = composer.generate(seed=r, **kwargs).records[0]
                        if args.device.startswith("cuda"):
                            torch.cuda.synchronize()
                        seconds.append(time.perf_counter() - start)
                        records.append(record)
                rec = records[0]
                loop = statistics.median(r["loop_seconds"] for r in records)
                unet = statistics.median(r["unet_seconds"] for r in records)
                rows.append(
                    {
                        "n": n,
                        "method": label,
                        "seconds": statistics.median(seconds),
                        "seconds_all": seconds,
                        "full_calls": rec["full_calls"],
                        "cached_calls": rec["cached_calls"],
                        "gmacs": rec["macs"] / 1e9,
                        "unet_seconds": unet,
                        "loop_seconds": loop,
                        "outside_unet_share": (loop - unet) / loop if loop else 0.0,
                        "batched": rec["batched_calls"],
                        "fused": rec["fused_loras"],
                        "warmup_seconds": warmup,
                        "peak_memory_gb": memory.peak / 2**30,
                    }
                )
                print(f"N={n} {label:22s} {rows[-1]['seconds']:8.2f} s", file=sys.stderr)
                if save is not None:  # after every row: a run cut short keeps what it measured
                    save(_result(args, size, rows))
    return _result(args, size, rows)


def write_file(args, pipe, path: Path, k: int) -> Path:
    """The k-th LoRA file of a run: plain LoRA, or (``--kind lyco``) LoHa and LoKr files in turn,
    their factors of rank ``--lyco-rank`` on the same layers (so a row's extra cost is the format's)."""
    from cmlora.tiny import write_random_lora, write_random_lycoris

    if args.kind == "lora":
        return write_random_lora(pipe, path, rank=args.rank, seed=k, scale=0.01)
    kind = ("loha", "lokr")[k % 2] if args.kind == "lyco" else args.kind
    return write_random_lycoris(pipe, path, kind, rank=args.lyco_rank, seed=k, scale=0.05)


def peft_layers(pipe) -> int:
    """PEFT layers left in the pipeline's UNet and text encoders (0 once its LoRAs are unloaded)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    parts = [getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2")]
    return sum(isinstance(m, BaseTunerLayer) for part in parts if part is not None for m in part.modules())


def clean(pipe) -> None:
    """The pipeline as cmlora's rows see it: no PEFT layer, no cmlora wrapper, no adapter."""
    from cmlora.adapters import LoRAWrapped

    assert peft_layers(pipe) == 0, "PEFT layers left in the pipeline"
    assert not any(isinstance(m, LoRAWrapped) for m in pipe.unet.modules()), "cmlora wrappers left"
    assert not any(pipe.get_list_adapters().values()), "adapters left in the pipeline"


class UNetMeter:
    """Counts, times and MAC-counts the UNet calls of a plain diffusers ``pipe(...)``: the peer
    rows' "full", "GMAC", "UNet s" and "outside UNet" columns, measured as cmlora's records are.
    The loop runs from the first UNet call to the last step's callback."""

    def __init__(self, pipe, label: str):
        from cmlora.macs import MacCounter

        self.pipe, self.label = pipe, label
        self.counter = MacCounter(pipe.unet)
        self.active: tuple[str, ...] = ()  # adapters of the UNet calls: part of the MAC signature

    def __enter__(self):
        self.calls, self.macs, self.unet_seconds = 0, 0, 0.0
        self.loop_start = self.loop_end = None
        unet, forward = self.pipe.unet, self.pipe.unet.forward

        def metered(sample, *args, **kwargs):
            _sync(sample)
            start = time.perf_counter()
            if self.loop_start is None:
                self.loop_start = start
            signature = (self.label, tuple(sample.shape), self.active)
            out, macs = self.counter.count(signature, lambda: forward(sample, *args, **kwargs))
            _sync(sample)
            self.unet_seconds += time.perf_counter() - start
            self.calls += 1
            self.macs += macs
            return out

        unet.forward = metered
        return self

    def step_end(self) -> None:
        self.loop_end = time.perf_counter()

    def __exit__(self, *exc):
        del self.pipe.unet.forward  # the class's forward again

    def record(self) -> dict:
        loop = (self.loop_end or time.perf_counter()) - (self.loop_start or 0.0)
        return {
            "full_calls": self.calls,
            "macs": self.macs,
            "unet_seconds": self.unet_seconds,
            "loop_seconds": loop,
        }


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize()


def run_peer(args, pipe, label: str, files: list[Path], size: int) -> dict:
    """One peer row: plain diffusers, or diffusers + PEFT with ``files`` loaded by
    ``load_lora_weights`` (the same kohya files cmlora's rows load), every LoRA at weight 1 as
    cmlora's merge has them. peft-merge: ``set_adapters`` all N at once; peft-fused: the same, then
    ``fuse_lora`` once before the timed images (its seconds are the row's fuse_seconds, not in
    s/image); peft-switch: one adapter at a time, ``set_adapters([name])`` from
    ``callback_on_step_end`` every SWITCH_TAU steps in file order, which is cmlora switch's order
    here (character first: the files are character, clothing, style, ... in that order), the text
    encoder under the first, as cmlora's switch has it. The LoRAs are unloaded after the row and
    the pipeline checked clean."""
    clean(pipe)
    names = [f"peer{k}" for k in range(len(files))] if label != "diffusers-plain" else []
    meter = UNetMeter(pipe, label)
    fuse_seconds = None
    for name, path in zip(names, files, strict=False):  # none for diffusers-plain
        pipe.load_lora_weights(str(path), adapter_name=name)
    try:
        if label in ("peft-merge", "peft-fused"):
            pipe.set_adapters(names, [1.0] * len(names))
            meter.active = tuple(names)
        if label == "peft-fused":
            start = time.perf_counter()
            pipe.fuse_lora(lora_scale=1.0, adapter_names=names)
            fuse_seconds = time.perf_counter() - start
            meter.active = ("fused",)

        def on_step_end(pipeline, step, timestep, kwargs):
            meter.step_end()
            if label == "peft-switch" and (step + 1) % SWITCH_TAU == 0:
                meter.active = (names[(step + 1) // SWITCH_TAU % len(names)],)
                pipeline.set_adapters(list(meter.active))
            return {}

        def generate(seed: int, steps: int) -> dict:
            if label == "peft-switch":
                meter.active = (names[0],)
                pipe.set_adapters(list(meter.active))  # the text encoder too: the first LoRA's
            with meter:
                pipe(
                    "a photo",
                    num_inference_steps=steps,
                    guidance_scale=7.5,
                    height=size,
                    width=size,
                    generator=torch.Generator(args.device).manual_seed(seed),
                    output_type="pil",
                    callback_on_step_end=on_step_end,
                )
            return meter.record()

        warmup = time.perf_counter()
        generate(0, 2)
        warmup = time.perf_counter() - warmup
        seconds, records = [], []
        with PeakMemory(args.device) as memory:
            for r in range(args.repeats):
                start = time.perf_counter()
                records.append(generate(r, args.steps))
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
    finally:
        if label == "peft-fused" and fuse_seconds is not None:
            pipe.unfuse_lora()
        if names:
            pipe.unload_lora_weights()
    clean(pipe)
    loop = statistics.median(r["loop_seconds"] for r in records)
    unet = statistics.median(r["unet_seconds"] for r in records)
    return {
        "n": len(files),
        "method": label,
        "seconds": statistics.median(seconds),
        "seconds_all": seconds,
        "full_calls": records[0]["full_calls"],
        "cached_calls": 0,
        "gmacs": records[0]["macs"] / 1e9,
        "unet_seconds": unet,
        "loop_seconds": loop,
        "outside_unet_share": (loop - unet) / loop if loop else 0.0,
        "batched": False,
        "fused": label == "peft-fused",
        "fuse_seconds": fuse_seconds,
        "loras": len(names),
        "warmup_seconds": warmup,
        "peak_memory_gb": memory.peak / 2**30,
    }


def _result(args, size: int, rows: list[dict]) -> dict:
    for row in rows:
        same_n = {r["method"]: r for r in rows if r["n"] == row["n"]}
        for ref in ("merge", "composite"):
            if ref in same_n:
                row[f"x_{ref}"] = row["seconds"] / same_n[ref]["seconds"]
        if "diffusers-plain" in same_n:
            row["x_floor"] = row["seconds"] / same_n["diffusers-plain"]["seconds"]
        peer = peer_of(row)
        if peer in same_n:
            row["peer"] = peer
            row["x_peer"] = row["seconds"] / same_n[peer]["seconds"]
    return {
        "arch": args.arch,
        "size": size,
        "steps": args.steps,
        "dtype": args.dtype,
        "device": args.device,
        "rank": args.rank,
        "kind": args.kind,
        "lyco_rank": args.lyco_rank,
        "repeats": args.repeats,
        "batch": args.batch,
        "fuse": args.fuse,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "versions": __import__("cmlora.records", fromlist=["x"]).library_versions(),
        "rows": rows,
    }


def _runs(labels: list[str], batch: str, fuse: str = "auto") -> list[tuple[str, str, str]]:
    """(method label, batch mode, fuse mode): batch "both" times each multi-call method sequential,
    then batched; fuse "both" times each single-call method un-fused, then fused."""
    runs = []
    for label in labels:
        multi = label not in SINGLE_CALL
        runs += [(label, b, f) for b in _modes(batch, multi) for f in _modes(fuse, not multi)]
    return runs


def _modes(mode: str, applies: bool) -> tuple[str, ...]:
    """ "both": off then on where the choice applies to the method, off alone where it does not."""
    if mode != "both":
        return (mode,)
    return ("off", "on") if applies else ("off",)


def table(result: dict) -> str:
    lines = [
        f"{result['arch']} {result['size']}x{result['size']} T={result['steps']} {result['dtype']} "
        f"{result['device']} "
        + (
            f"rank {result['rank']}"
            if result.get("kind", "lora") == "lora"
            else f"{result['kind']} files (LyCORIS) of rank {result['lyco_rank']}"
        )
        + f", median of {result['repeats']}"
        + (f", UNet blocks compiled ({result['compile']})" if result.get("compile") else ""),
        "| N | method | s/image | full | cached | GMAC | outside UNet | peak GB | x merge | composite / this "
        "| x floor | x peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in result["rows"]:
        speedup = 1 / r["x_composite"] if r.get("x_composite") else nan
        peer = f"{r['x_peer']:.2f} ({r['peer']})" if "x_peer" in r else ""
        lines.append(
            f"| {r['n']} | {r['method']} | {r['seconds']:.2f} | {r['full_calls']} | {r['cached_calls']} | "
            f"{r['gmacs']:.0f} | {100 * r['outside_unet_share']:.1f}% | {r['peak_memory_gb']:.2f} | "
            f"{r.get('x_merge', nan):.2f} | {speedup:.2f}x | {r.get('x_floor', nan):.2f} | {peer} |"
        )
    rows = {(r["n"], r["method"]): r for r in result["rows"]}
    for suffix, before in (("batched", "sequential"), ("fused", "un-fused")):
        pairs = [
            (rows[key], rows[(key[0], f"{key[1]} {suffix}")])
            for key in rows
            if (key[0], f"{key[1]} {suffix}") in rows
        ]
        if not pairs:
            continue
        lines += [
            "",
            f"| N | method | {before} s | {suffix} s | {suffix} / {before} | peak GB {before} -> {suffix} |",
            "|---|---|---|---|---|---|",
        ]
        for old, new in pairs:
            lines.append(
                f"| {old['n']} | {old['method']} | {old['seconds']:.2f} | {new['seconds']:.2f} | "
                f"{new['seconds'] / old['seconds']:.2f} | {old['peak_memory_gb']:.2f} -> {new['peak_memory_gb']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=tuple(ARCHS), default="sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", default="2,3,4,5")
    parser.add_argument(
        "--methods",
        default=",".join([*PEERS, *METHODS]),
        help=f"comma-separated; cmlora's {', '.join(METHODS)}; peers {', '.join(PEERS)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--kind",
        choices=("lora", "loha", "lokr", "lyco"),
        default="lora",
        help="LoRA files of the run: plain LoRA (rank --rank), or LyCORIS: loha, lokr, or lyco "
        "(LoHa and LoKr in turn), of rank --lyco-rank; PEFT peer rows only run with plain LoRA files",
    )
    parser.add_argument("--lyco-rank", type=int, default=8)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--batch",
        choices=("auto", "on", "off", "both"),
        default="auto",
        help="batch a step's per-LoRA calls into one UNet call (auto: the library's default, on; "
        "both: time each multi-call method both ways, to decide it)",
    )
    parser.add_argument(
        "--fuse",
        choices=("auto", "on", "off", "both"),
        default="auto",
        help="run merge's and switch's LoRAs fused into the weights (auto: the library's default, on; "
        "both: time merge and switch un-fused, then fused)",
    )
    parser.add_argument(
        "--preset",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: SD-1.5 at 512 and SDXL at 1024, fp16, cuda (runs both)",
    )
    parser.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="torch.compile the UNet's blocks with this backend (e.g. inductor); the warm-up image then "
        "runs all steps, and its seconds (compilation included) are in the JSON as warmup_seconds",
    )
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS and m not in PEERS]
    if unknown:
        parser.error(f"unknown methods {unknown} in --methods; choose from {', '.join([*PEERS, *METHODS])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def save(partial: dict) -> None:
        both = [*results, partial]
        out.write_text(json.dumps(both if len(both) > 1 else both[0], indent=1))

    if args.preset == "gpu":
        args.device, args.dtype = "cuda", "fp16"
        for arch, size in (("sd15", 512), ("sdxl", 1024)):
            args.arch, args.size = arch, size
            results.append(run(args, save))
    else:
        results.append(run(args, save))
    for result in results:
        print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

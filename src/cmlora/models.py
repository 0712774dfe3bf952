"""Loading a base pipeline from what a user types: nothing (the embedded default), a built-in
tiny model, a local diffusers folder, a single-file checkpoint, or a hub id.

The embedded default is the mini world (``cmlora.mini``) when its trained assets are installed;
otherwise a tiny random pipeline, and we say so: its images are noise-like by construction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CmloraError, OptionError
from .loras import PICKLE_SUFFIXES
from .paths import check_regular_file

BUILTIN = ("mini", "tiny-sd15", "tiny-sdxl")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class BaseModel:
    pipe: object
    name: str
    note: str = ""
    lora_ids: dict[str, dict] = field(default_factory=dict)
    """LoRAs known by id (the mini world's), with file, category and triggers."""
    base_prompt: str = ""
    negative_prompt: str | None = None
    guidance: float = 7.5
    """Default classifier-free guidance scale for this model."""
    profile: str | None = None
    """The shipped frequency profile of ``lora_ids`` (the mini world's), if any."""

    def profile_for(self, method: str, variant: str | None, lora_files, options: dict, given=None):
        """The profile a composition uses: the one the user ``given``, else the shipped one when
        this method reads one and the composition is made only of this model's own LoRAs.

        The shipped profile orders the LoRAs it was measured on; any other file (or an explicit
        order/partition, which the user chose on purpose) means no default, so CMLoRA falls back
        to categories.
        """
        if given is not None:
            return given
        from .methods import reads_profile

        if (
            self.profile is None
            or not reads_profile(method, variant)
            or {"order", "high", "low"} & set(options)
        ):
            return None
        known = {Path(entry["file"]).resolve() for entry in self.lora_ids.values()}
        files = [Path(f).resolve() for f in lora_files]
        return self.profile if files and all(f in known for f in files) else None


def pick_device(device: str) -> str:
    """The torch device to run on; a device string torch does not know, a kind cmlora does not run
    on, or a device this machine lacks is an OptionError here, before any model is loaded."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(
            f"device {device!r} is not a device name; use cpu, cuda, cuda:N, mps or auto"
        ) from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"device {device!r}: cmlora runs on cpu, cuda, cuda:N or mps; use one of them")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise OptionError(
                f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    if parsed.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise OptionError(f"device {device!r} requested but MPS is not available here; use --device cpu")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise OptionError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


def mini_available() -> bool:
    try:
        from . import mini
    except ImportError:
        return False
    root = Path(mini.assets_dir())
    return (root / "pipeline" / "model_index.json").is_file() and (root / "mini_lora_info.json").is_file()


def load_base(
    base: str | None,
    device: str = "auto",
    dtype: str = "auto",
    config: str | None = None,
    allow_pickle: bool = False,
) -> BaseModel:
    """The base pipeline ``base`` names. Pickled weights (``.bin``...) run code when loaded, so a
    folder or hub model that has them instead of safetensors is refused unless ``allow_pickle``."""
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if base is None or base == "mini":
        if mini_available():
            return _load_mini(device, torch_dtype)
        if base == "mini":
            raise CmloraError("the mini world's trained assets are not installed in this copy of cmlora")
        model = _tiny("tiny-sd15", device, torch_dtype)
        model.note = (
            "NOTE: no embedded trained model is installed, so this runs a TINY RANDOM pipeline with random "
            "demo LoRAs: the images are noise-like by construction. Use --base for a real model."
        )
        return model
    if base in BUILTIN:
        return _tiny(base, device, torch_dtype)
    path = Path(base)
    if path.is_dir():
        return BaseModel(_from_folder(path, torch_dtype, allow_pickle).to(device), str(path))
    if os.path.lexists(path):  # a file, or a pipe, a device, a broken link: say which
        check_regular_file(path, lambda problem: OptionError(f"--base {base!r}: {problem}"))
        return BaseModel(_from_single_file(path, torch_dtype, config).to(device), str(path))
    if base.count("/") == 1 and not base.startswith((".", "/")):
        return BaseModel(_from_hub(base, torch_dtype, allow_pickle).to(device), base)
    raise OptionError(
        f"--base {base!r} is neither a folder, a checkpoint file, a hub id nor one of {BUILTIN}"
    )


def _tiny(name: str, device: str, dtype: torch.dtype) -> BaseModel:
    from .tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline() if name == "tiny-sdxl" else tiny_sd15_pipeline()
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    return BaseModel(pipe, name, base_prompt="a photo")


def _load_mini(device: str, dtype: torch.dtype) -> BaseModel:
    from . import mini

    pipe = mini.load_pipeline(device=device, dtype=dtype)
    info = mini.info()
    ids = {}
    for category, entries in info.items():
        for entry in entries:
            ids[entry["id"]] = {
                "file": mini.lora_path(entry["id"]),
                "category": category,
                "triggers": list(entry["trigger"]),
            }
    prompts = mini.prompts()
    profile = Path(mini.profile_path())
    return BaseModel(
        pipe,
        "mini",
        lora_ids=ids,
        base_prompt=prompts["prompt"],
        negative_prompt=prompts.get("negative_prompt"),
        profile=str(profile) if profile.is_file() else None,
        guidance=mini.GUIDANCE,
    )


def _pipeline_class(name: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    classes = {
        "StableDiffusionPipeline": StableDiffusionPipeline,
        "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    }
    if name not in classes:
        raise OptionError(
            f"pipeline class {name!r} is not supported; cmlora composes on SD-1.5/2.x and SDXL pipelines"
        )
    return classes[name]


def refuse_pickled_weights(folder: Path, components: list[str]) -> None:
    """Refuse a diffusers folder where a component that will be loaded has pickled weights
    (``.bin``...) and no safetensors beside them: diffusers would unpickle them, and a pickle can
    run arbitrary code. Called unless the user passed --allow-pickle; the message names the file."""
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            continue
        files = [p for p in sub.iterdir() if p.is_file()]
        pickles = sorted(p for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not any(p.suffix.lower() == ".safetensors" for p in files):
            raise OptionError(
                f"--base {folder}: {pickles[0]} is a pickle, which can run arbitrary code when loaded; "
                "convert the model to safetensors, or pass --allow-pickle if you trust its source"
            )


def _from_folder(path: Path, dtype: torch.dtype, allow_pickle: bool = False):
    index = path / "model_index.json"
    if not index.is_file():
        raise OptionError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        model_index = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise OptionError(f"--base {path}: model_index.json is not valid JSON ({exc})") from None
    if not isinstance(model_index, dict):
        raise OptionError(f"--base {path}: model_index.json is not a JSON object")
    cls = _pipeline_class(str(model_index.get("_class_name", "")))
    kwargs: dict = (
        {"safety_checker": None, "requires_safety_checker": False}
        if cls.__name__ == "StableDiffusionPipeline"
        else {}
    )
    if not allow_pickle:
        loaded = [
            name
            for name, spec in model_index.items()
            if not name.startswith("_") and name not in kwargs and isinstance(spec, list) and any(spec)
        ]
        refuse_pickled_weights(path, loaded)
        kwargs["use_safetensors"] = True  # diffusers itself then refuses any .bin we did not see
    try:
        return cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **kwargs)
    except OSError as exc:
        hint = "" if allow_pickle else "; safetensors weights are required unless you pass --allow-pickle"
        raise OptionError(f"--base {path}: {' '.join(str(exc).split())}{hint}") from None


def _from_single_file(path: Path, dtype: torch.dtype, config: str | None):
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise OptionError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            is_xl = any(k.startswith("conditioner.embedders.1") for k in handle.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise OptionError(
            f"--base {path}: not a readable safetensors checkpoint ({' '.join(str(exc).split())})"
        ) from None
    cls = _pipeline_class("StableDiffusionXLPipeline" if is_xl else "StableDiffusionPipeline")
    kwargs = {"config": config} if config else {}
    try:
        return cls.from_single_file(str(path), torch_dtype=dtype, **kwargs)
    except OSError as exc:
        raise CmloraError(
            f"{path}: diffusers needs the model's config to load a single-file checkpoint and could not get it "
            f"({exc}). Offline, pass --config with a local diffusers folder of the same architecture."
        ) from None


def _from_hub(repo: str, dtype: torch.dtype, allow_pickle: bool = False):
    from diffusers import DiffusionPipeline

    kwargs = {} if allow_pickle else {"use_safetensors": True}
    try:
        pipe = DiffusionPipeline.from_pretrained(repo, torch_dtype=dtype, **kwargs)
    except OSError as exc:
        raise CmloraError(
            f"could not load {repo!r} from the hub ({' '.join(str(exc).split())}); pass a local folder "
            "with --base"
            + ("" if allow_pickle else " (models without safetensors weights need --allow-pickle)")
        ) from None
    _pipeline_class(type(pipe).__name__)
    return pipe

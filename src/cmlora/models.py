"""Loading a base pipeline from what a user types: nothing (the embedded default), a built-in
tiny model, a local diffusers folder, a single-file checkpoint, or a hub id.

The embedded default is the mini world (``cmlora.mini``) when its trained assets are installed;
otherwise a tiny random pipeline, and we say so: its images are noise-like by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CmloraError, OptionError

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
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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
    base: str | None, device: str = "auto", dtype: str = "auto", config: str | None = None
) -> BaseModel:
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
        return BaseModel(_from_folder(path, torch_dtype).to(device), str(path))
    if path.is_file():
        return BaseModel(_from_single_file(path, torch_dtype, config).to(device), str(path))
    if base.count("/") == 1 and not base.startswith((".", "/")):
        return BaseModel(_from_hub(base, torch_dtype).to(device), base)
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


def _from_folder(path: Path, dtype: torch.dtype):
    index = path / "model_index.json"
    if not index.is_file():
        raise OptionError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    cls = _pipeline_class(json.loads(index.read_text()).get("_class_name", ""))
    kwargs = (
        {"safety_checker": None, "requires_safety_checker": False}
        if cls.__name__ == "StableDiffusionPipeline"
        else {}
    )
    return cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **kwargs)


def _from_single_file(path: Path, dtype: torch.dtype, config: str | None):
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise OptionError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    with safe_open(str(path), framework="pt") as handle:
        is_xl = any(k.startswith("conditioner.embedders.1") for k in handle.keys())
    cls = _pipeline_class("StableDiffusionXLPipeline" if is_xl else "StableDiffusionPipeline")
    kwargs = {"config": config} if config else {}
    try:
        return cls.from_single_file(str(path), torch_dtype=dtype, **kwargs)
    except OSError as exc:
        raise CmloraError(
            f"{path}: diffusers needs the model's config to load a single-file checkpoint and could not get it "
            f"({exc}). Offline, pass --config with a local diffusers folder of the same architecture."
        ) from None


def _from_hub(repo: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo, torch_dtype=dtype)
    except OSError as exc:
        raise CmloraError(
            f"could not load {repo!r} from the hub ({exc}); pass a local folder with --base"
        ) from None
    _pipeline_class(type(pipe).__name__)
    return pipe

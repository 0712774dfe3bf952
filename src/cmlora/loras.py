"""LoRA files: read, validate, and map every tensor onto a module of the user's pipeline.

Files downloaded from the internet are untrusted, so the safetensors header is checked by hand
before any tensor is materialised, pickle formats are refused unless explicitly allowed, and a
file is resolved against the pipeline completely (every key, every shape) before anything in the
pipeline changes. A key that lands nowhere is an error listing the keys: silently dropping part
of a LoRA is how the published code ended up composing something else than it claimed.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LoRAFileError, OptionError
from .files import sha256_file
from .paths import check_regular_file

CATEGORIES = ("character", "clothing", "style", "background", "object")
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSOR_DIM = 1 << 20
MAX_RANK = 4096
MAX_LORA_BYTES = 4 << 30
"""Tensor data one LoRA file may hold: generous for plain LoRAs of SD-1.5/2.x/SDXL (commonly tens
to hundreds of MB), and the bound on the memory that reading one file can take."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
"""Python pickles: loading one can run arbitrary code, so each needs an explicit allow_pickle."""
_LYCORIS_MARKERS = ("hada_w", "lokr_w", "oft_", "lora_mid", ".on_input", "lokr_t")
# LyCORIS full-difference keys end so; as a substring ".diff" would also match every key of a full
# checkpoint (``model.diffusion_model.*``) and call it LyCORIS
_LYCORIS_SUFFIXES = (".diff", ".diff_b")
_COMPONENT_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_DOTTED_PAIRS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


#: The largest LoRA weight or scale accepted: strengths beyond a few units already wreck images;
#: far larger ones only overflow (an image of NaN or a black frame), so they are refused up front.
MAX_STRENGTH = 1000.0


@dataclass(frozen=True)
class LoRA:
    """One LoRA of a composition, as the user names it.

    ``weight`` is the user weight a_i: the adapter strength for merge/switch and the mixing
    weight for composite/CMLoRA (see README, method table).
    """

    path: str | Path
    weight: float = 1.0
    category: str | None = None
    name: str | None = None
    triggers: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "triggers", tuple(self.triggers))
        if self.name is None:
            object.__setattr__(self, "name", Path(self.path).stem)
        if (
            not isinstance(self.weight, int | float)
            or not math.isfinite(self.weight)
            or not 0 <= self.weight <= MAX_STRENGTH
        ):
            raise OptionError(
                f"LoRA {self.name!r}: weight must be a number in [0, {MAX_STRENGTH:g}], got {self.weight!r}"
            )
        if self.category is not None and self.category not in CATEGORIES:
            raise OptionError(
                f"LoRA {self.name!r}: unknown category {self.category!r}; use one of {', '.join(CATEGORIES)}"
            )
        if not _NAME_RE.match(str(self.name)):
            raise OptionError(
                f"LoRA name {self.name!r} is not a safe adapter name: use letters, digits, '_', '-', '.' "
                "(pass name=... to choose one)"
            )

    @property
    def adapter(self) -> str:
        return str(self.name)


@dataclass
class LoRAModuleWeights:
    """One down/up pair of a file: ``key`` names the target module (for resolution), ``source`` the
    file's own down-weight key (for error messages, so users can find it in the file). Until
    ``load_lora_tensors`` ran, ``down``/``up`` are meta tensors (shapes only) and ``alpha`` None."""

    component: str
    key: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    source: str = ""
    up_source: str = ""
    alpha_source: str | None = None
    """Keys of the up weight and alpha in the file: ``load_lora_tensors`` reads them from there."""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoRAFile:
    path: Path
    sha256: str
    format: str
    modules: list[LoRAModuleWeights]
    metadata: dict[str, str]

    @property
    def components(self) -> set[str]:
        return {m.component for m in self.modules}


def sha256_of(path: Path) -> str:
    return sha256_file(path)


def check_safetensors_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Validate the header and the byte layout without loading any tensor.

    Returns (tensor entries, metadata). Every malformation (a value of the wrong JSON type,
    negative, overlapping or gapped offsets, offsets past the end, bytes after the last tensor,
    more tensor data than ``MAX_LORA_BYTES``) is a LoRAFileError naming the file and, where one is
    at fault, the key: the header is untrusted input and must never surface as a TypeError.
    """
    path = Path(path)
    size = check_regular_file(path, lambda problem: LoRAFileError(path, problem)).stat().st_size
    if size < 8:
        raise LoRAFileError(path, f"file is {size} bytes, too short to be a safetensors file (truncated?)")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise LoRAFileError(
                path, f"header claims {header_len} bytes (limit {MAX_HEADER_BYTES}): not a LoRA"
            )
        if 8 + header_len > size:
            raise LoRAFileError(path, f"header claims {header_len} bytes but the file has {size}: truncated")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as dup:
        raise LoRAFileError(path, "duplicated key in the header", key=str(dup)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError, 4300-digit ints
        raise LoRAFileError(path, f"header is not valid JSON ({type(exc).__name__}): corrupt file") from None
    if not isinstance(header, dict):
        raise LoRAFileError(path, f"header is a JSON {type(header).__name__}, not an object: corrupt file")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoRAFileError(path, "__metadata__ must map strings to strings", key="__metadata__")
    data_len = size - 8 - header_len
    spans = []
    for key, entry in header.items():
        spans.append((*_check_entry(path, key, entry, data_len), key))
    spans.sort()
    position, previous = 0, None
    for start, end, key in spans:
        if start < position:
            raise LoRAFileError(path, f"tensor data overlaps that of {previous!r}", key=key)
        if start > position:
            raise LoRAFileError(
                path, f"data_offsets leave {start - position} unused bytes before this tensor", key=key
            )
        position, previous = end, key
    if position != data_len:
        raise LoRAFileError(path, f"{data_len - position} bytes after the last tensor's data_offsets")
    if data_len > MAX_LORA_BYTES:
        raise LoRAFileError(
            path,
            f"holds {data_len} bytes of tensor data, more than cmlora reads from one LoRA file "
            f"({MAX_LORA_BYTES}): refused before reading any of it",
        )
    return header, metadata


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(path: Path, key: str, entry: object, data_len: int) -> tuple[int, int]:
    """One tensor entry of the header, every field type-checked: returns its (start, end)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise LoRAFileError(path, "tensor entry must have dtype, shape and data_offsets", key=key)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise LoRAFileError(path, f"unknown dtype {dtype!r}", key=key)
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(_is_int(d) and 0 <= d <= MAX_TENSOR_DIM for d in shape)
    ):
        raise LoRAFileError(path, f"absurd shape {shape!r}", key=key)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise LoRAFileError(path, f"bad data_offsets {offsets!r}", key=key)
    start, end = offsets
    expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype]
    if not 0 <= start <= end <= data_len or end - start != expected:
        raise LoRAFileError(
            path,
            f"data_offsets {offsets} do not match shape {shape} x {dtype} in {data_len} data bytes",
            key=key,
        )
    return start, end


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def read_lora_file(path: str | Path, allow_pickle: bool = False, tensors: bool = True) -> LoRAFile:
    """Read and validate one LoRA file into down/up pairs per target module key.

    A safetensors file is judged from its header first: layout, dtypes, key patterns, pairs and
    ranks, all before a byte of tensor data is read, so a file claiming gigabytes is refused in
    milliseconds. ``tensors=False`` stops there: the modules hold shape-only (meta) tensors and
    ``sha256`` is empty, so a caller can resolve the file against a pipeline and then read only
    the pairs it uses with ``load_lora_tensors`` (what ``Composer`` does).
    """
    path = Path(path)
    check_regular_file(path, lambda problem: LoRAFileError(path, problem))
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoRAFileError(
                path,
                f"'{suffix}' files are Python pickles, which can run arbitrary code when loaded. "
                "Convert it to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source",
            )
        loaded = _load_pickle(path)
        if not loaded:
            raise LoRAFileError(path, "file holds no tensors")
        for key, tensor in loaded.items():
            _check_values(path, key, tensor)
        modules, fmt = _pair_up(path, loaded)
        return LoRAFile(path=path, sha256=sha256_of(path), format=fmt, modules=modules, metadata={})
    if suffix != ".safetensors":
        raise LoRAFileError(path, f"unsupported extension {suffix!r}; expected .safetensors")
    header, metadata = check_safetensors_header(path)
    for key, entry in header.items():
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise LoRAFileError(path, f"dtype {entry['dtype']} is not a float type", key=key)
    if not header:
        raise LoRAFileError(path, "file holds no tensors")
    shapes = {
        key: torch.empty(entry["shape"], dtype=_FLOAT_DTYPES[entry["dtype"]], device="meta")
        for key, entry in header.items()
    }
    modules, fmt = _pair_up(path, shapes)
    lora_file = LoRAFile(path=path, sha256="", format=fmt, modules=modules, metadata=metadata)
    if tensors:
        load_lora_tensors(lora_file)
    return lora_file


def load_lora_tensors(lora_file: LoRAFile, modules: list[LoRAModuleWeights] | None = None) -> None:
    """Read the tensors of ``modules`` (default: all) of a file read with ``tensors=False``.

    safetensors' ``safe_open`` reads lazily, so only these pairs (and their alphas) are read;
    modules not asked for are dropped from the file, so nothing unread stays behind as a shape.
    Values are checked (finite; alpha a positive scalar) and the file's SHA-256 is computed.
    """
    wanted = lora_file.modules if modules is None else modules
    pending = [m for m in wanted if m.down.is_meta]
    path = lora_file.path
    if pending:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for module in pending:
                    module.down = _read_tensor(path, handle, module.source, module.down)
                    module.up = _read_tensor(path, handle, module.up_source, module.up)
                    if module.alpha_source is not None:
                        alpha = _read_tensor(path, handle, module.alpha_source, None)
                        module.alpha = _scalar_alpha(path, alpha, module.alpha_source)
                        _check_alpha(path, module.alpha, module.source, module.rank)
        except LoRAFileError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise LoRAFileError(path, f"safetensors could not read it: {exc}") from None
    kept = {id(m) for m in wanted}
    lora_file.modules = [m for m in lora_file.modules if id(m) in kept]
    if not lora_file.sha256:
        lora_file.sha256 = sha256_of(path)


def _read_tensor(path: Path, handle, key: str, expected: torch.Tensor | None) -> torch.Tensor:
    tensor = handle.get_tensor(key)
    if expected is not None and tuple(tensor.shape) != tuple(expected.shape):
        raise LoRAFileError(path, "the file changed while it was being read", key=key)
    _check_values(path, key, tensor)
    return tensor


def _check_values(path: Path, key: str, tensor: torch.Tensor) -> None:
    if not torch.is_floating_point(tensor):
        raise LoRAFileError(path, f"dtype {tensor.dtype} is not a float type", key=key)
    if not bool(torch.isfinite(tensor).all()):
        raise LoRAFileError(path, "tensor holds NaN or Inf values", key=key)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoRAFileError(path, f"could not load pickle: {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoRAFileError(path, "pickle does not hold a flat dict of tensors")
    return {str(k): v for k, v in obj.items()}


def _pair_up(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[list[LoRAModuleWeights], str]:
    keys = list(tensors)
    for key in keys:
        if any(marker in key for marker in _LYCORIS_MARKERS) or key.endswith(_LYCORIS_SUFFIXES):
            raise LoRAFileError(
                path,
                "this is a LyCORIS (LoHa/LoKr/OFT) file; only plain LoRA (down/up) files are supported",
                key=key,
            )
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise LoRAFileError(path, "DoRA files are not supported (only plain LoRA)", key=key)
    if any(k.startswith(tuple(_COMPONENT_PREFIXES)) for k in keys):
        return _pair_kohya(path, tensors), "kohya"
    return _pair_dotted(path, tensors), "diffusers"


def _pair_kohya(path: Path, tensors: dict[str, torch.Tensor]) -> list[LoRAModuleWeights]:
    modules: list[LoRAModuleWeights] = []
    used: set[str] = set()
    for key in sorted(tensors):
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        up_key, alpha_key = stem + ".lora_up.weight", stem + ".alpha"
        if up_key not in tensors:
            raise LoRAFileError(path, "lora_down without its lora_up", key=key)
        prefix = next((p for p in _COMPONENT_PREFIXES if stem.startswith(p)), None)
        if prefix is None:
            raise LoRAFileError(
                path, "key does not start with lora_unet_/lora_te_/lora_te1_/lora_te2_", key=key
            )
        alpha = alpha_key if alpha_key in tensors else None
        modules.append(
            _checked_pair(path, _COMPONENT_PREFIXES[prefix], stem[len(prefix) :], tensors, key, up_key, alpha)
        )
        used.update({key, up_key, alpha_key})
    _refuse_leftovers(path, tensors, used)
    return modules


def _pair_dotted(path: Path, tensors: dict[str, torch.Tensor]) -> list[LoRAModuleWeights]:
    """diffusers (``unet.<module>.lora_A.weight``...) and PEFT (``base_model.model.<module>...``)."""
    modules: list[LoRAModuleWeights] = []
    used: set[str] = set()
    for key in sorted(tensors):
        pair = next(((d, u) for d, u in _DOTTED_PAIRS if key.endswith(d)), None)
        if pair is None:
            continue
        stem = key[: -len(pair[0])]
        up_key = stem + pair[1]
        if up_key not in tensors:
            raise LoRAFileError(path, "down weight without its up weight", key=key)
        component, module = "unet", stem
        if stem.startswith("base_model.model."):
            module = stem[len("base_model.model.") :]
        for prefix, comp in _DOTTED_PREFIXES.items():
            if module.startswith(prefix):
                component, module = comp, module[len(prefix) :]
                break
        alphas = [k for k in (stem + ".alpha", stem + ".lora.alpha") if k in tensors]
        if len(alphas) > 1:
            raise LoRAFileError(path, "a second alpha for the same pair", key=alphas[1])
        alpha = alphas[0] if alphas else None
        modules.append(_checked_pair(path, component, module, tensors, key, up_key, alpha))
        used.update({key, up_key, *alphas})
    if not modules:
        raise LoRAFileError(
            path,
            "no LoRA weights found: expected kohya (lora_unet_*.lora_down.weight), diffusers or PEFT "
            "(*.lora_A.weight / *.lora_B.weight) keys",
            key=next(iter(tensors)),
        )
    _refuse_leftovers(path, tensors, used)
    return modules


def _scalar_alpha(path: Path, tensor: torch.Tensor, key: str) -> float | None:
    """The alpha value; None while ``tensor`` is a shape-only (meta) stand-in."""
    if tensor.numel() != 1:
        raise LoRAFileError(path, f"alpha must be a scalar, got shape {list(tensor.shape)}", key=key)
    return None if tensor.is_meta else float(tensor.reshape(()).item())


def _check_alpha(path: Path, alpha: float | None, source: str, rank: int) -> None:
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise LoRAFileError(path, f"alpha must be a positive finite number, got {alpha}", key=source)
    if alpha is not None and alpha / rank > MAX_STRENGTH:
        raise LoRAFileError(
            path,
            f"alpha {alpha:g} at rank {rank} scales the LoRA by {alpha / rank:g}, over {MAX_STRENGTH:g}: "
            "the file is broken (kohya files have alpha <= a few times the rank)",
            key=source,
        )


def _checked_pair(
    path: Path,
    component: str,
    module: str,
    tensors: dict[str, torch.Tensor],
    source: str,
    up_source: str,
    alpha_source: str | None,
) -> LoRAModuleWeights:
    """One down/up pair checked from shapes alone (meta tensors work), plus its alpha's value
    when the tensors are real."""
    down, up = tensors[source], tensors[up_source]
    alpha = None if alpha_source is None else _scalar_alpha(path, tensors[alpha_source], alpha_source)
    if down.dim() not in (2, 4) or up.dim() not in (2, 4):
        raise LoRAFileError(
            path, f"down {list(down.shape)} / up {list(up.shape)} must be 2-D or 4-D", key=source
        )
    rank = down.shape[0]
    if not 0 < rank <= MAX_RANK or up.shape[1] != rank:
        raise LoRAFileError(
            path, f"ranks do not match: down {list(down.shape)} vs up {list(up.shape)}", key=source
        )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoRAFileError(path, f"up weight must be 1x1, got {list(up.shape)}", key=source)
    _check_alpha(path, alpha, source, rank)
    return LoRAModuleWeights(
        component=component,
        key=module,
        down=down,
        up=up,
        alpha=alpha,
        source=source,
        up_source=up_source,
        alpha_source=alpha_source,
    )


def _refuse_leftovers(path: Path, tensors: dict[str, torch.Tensor], used: set[str]) -> None:
    leftovers = sorted(set(tensors) - used)
    if leftovers:
        shown = ", ".join(leftovers[:8]) + (f" (+{len(leftovers) - 8} more)" if len(leftovers) > 8 else "")
        raise LoRAFileError(path, f"{len(leftovers)} key(s) are not part of any down/up pair: {shown}")


# --------------------------------------------------------------------------- resolution


@dataclass
class ResolvedModule:
    component: str
    module_name: str
    weights: LoRAModuleWeights


_SGM_INNER = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_TOP = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "out_2": "conv_out",
}


def base_layer(module: torch.nn.Module) -> torch.nn.Module | None:
    """The Linear/Conv2d a LoRA can target: the module itself, or the base layer of a PEFT-wrapped
    one (the user's own adapters loaded with diffusers stay in place and keep applying)."""
    if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
        return module
    get_base = getattr(module, "get_base_layer", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, torch.nn.Linear | torch.nn.Conv2d):
            return base
    return None


def lora_targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Targetable layers by name; the insides of PEFT-wrapped layers (base_layer, lora_A...) are not."""
    targets: dict[str, torch.nn.Module] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if base_layer(module) is not None:
            targets[name] = module
            if module is not base_layer(module):
                wrapped.append(name)
    return targets


def _underscore_index(model: torch.nn.Module, text_encoder: bool) -> dict[str, str]:
    index: dict[str, str] = {}
    for name in lora_targets(model):
        flat = name.replace(".", "_")
        index[flat] = name
        if text_encoder and not flat.startswith("text_model_"):
            # transformers 5 dropped the ``text_model.`` level that kohya keys still carry.
            index["text_model_" + flat] = name
        if text_encoder and flat.startswith("text_model_"):
            index[flat[len("text_model_") :]] = name
    return index


def _sgm_to_diffusers(keys: list[str], unet: torch.nn.Module) -> dict[str, str]:
    """Map kohya SDXL keys named after the original (SGM) UNet onto diffusers names."""
    if not any(
        k.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed", "out_")) for k in keys
    ):
        return {k: k for k in keys}
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    renamed: dict[str, str] = {}
    rest = []
    for key in keys:
        top = next(
            (v + key[len(k) :] for k, v in _SGM_TOP.items() if key == k or key.startswith(k + "_")), None
        )
        if top is not None and not key.startswith("input_blocks_0_0_"):
            renamed[top] = key
        elif key == "input_blocks_0_0":
            renamed["conv_in"] = key
        else:
            rest.append(key)
    mapped = _maybe_map_sgm_blocks_to_diffusers({"lora_unet_" + k: k for k in rest}, unet.config)
    for new_key, old_key in mapped.items():
        new = new_key[len("lora_unet_") :]
        for sgm, diff in (
            ("input_blocks_", "down_blocks_"),
            ("middle_block_", "mid_block_"),
            ("output_blocks_", "up_blocks_"),
        ):
            new = new.replace(sgm, diff)
        for sgm, diff in _SGM_INNER.items():
            new = new.replace(sgm, diff)
        new = new.replace("_op", "_conv") if "downsamplers" in new else new
        renamed[new] = old_key
    return renamed


def resolve(lora_file: LoRAFile, pipe: object, allow_partial: bool = False) -> list[ResolvedModule]:
    """Find the target module of every pair and check shapes; raise before touching anything."""
    resolved: list[ResolvedModule] = []
    unmatched: list[str] = []
    claimed: dict[tuple[str, str], str] = {}
    for component in sorted(lora_file.components):
        model = getattr(pipe, component, None)
        entries = [m for m in lora_file.modules if m.component == component]
        if model is None:
            unmatched.extend(f"{component}:{m.key}" for m in entries)
            continue
        modules = lora_targets(model)
        is_kohya = lora_file.format == "kohya"
        if is_kohya:
            index = _underscore_index(model, text_encoder=component != "unet")
            names = {m.key: m.key for m in entries}
            if component == "unet":
                names = {old: new for new, old in _sgm_to_diffusers(list(names), model).items()}
            lookup = {m.key: index.get(names.get(m.key, m.key)) for m in entries}
        else:
            lookup = {m.key: _dotted_lookup(m.key, modules, component != "unet") for m in entries}
        for entry in entries:
            target_name = lookup[entry.key]
            if target_name is None:
                unmatched.append(f"{component}:{entry.key}")
                continue
            _check_shapes(lora_file.path, entry, modules[target_name], target_name)
            # two pairs on one layer (e.g. ``lora_A`` and ``lora.down`` spellings of it): installing
            # both would silently keep only the last, so part of the file would never land
            first = claimed.setdefault((component, target_name), entry.source or entry.key)
            if first != (entry.source or entry.key):
                raise LoRAFileError(
                    lora_file.path,
                    f"two LoRA pairs target the same layer {component}.{target_name}: {first!r} and this one",
                    key=entry.source or entry.key,
                )
            resolved.append(ResolvedModule(component, target_name, entry))
    if unmatched and not (allow_partial and resolved):
        shown = ", ".join(unmatched[:10]) + (f" (+{len(unmatched) - 10} more)" if len(unmatched) > 10 else "")
        hint = "pass allow_partial=True (CLI: --allow-partial) to load the rest with a warning"
        if 2 * len(unmatched) > len(lora_file.modules):
            hint = "the LoRA was probably made for another base architecture (e.g. SDXL vs SD-1.5)"
        raise LoRAFileError(
            lora_file.path,
            f"{len(unmatched)} of {len(lora_file.modules)} LoRA modules match no layer of "
            f"{type(pipe).__name__}: {shown}; {hint}",
        )
    if unmatched:
        import warnings

        warnings.warn(
            f"{lora_file.path}: {len(unmatched)} LoRA module(s) matched no layer and were skipped "
            f"(allow_partial): {', '.join(unmatched[:5])}",
            stacklevel=2,
        )
    return resolved


def _dotted_lookup(key: str, targets: dict[str, torch.nn.Module], text_encoder: bool) -> str | None:
    candidates = [key]
    if text_encoder:
        candidates += [key.removeprefix("text_model."), "text_model." + key]
    return next((c for c in candidates if c in targets), None)


def _check_shapes(path: Path, entry: LoRAModuleWeights, module: torch.nn.Module, name: str) -> None:
    down, up = entry.down, entry.up
    module = base_layer(module)
    if isinstance(module, torch.nn.Linear):
        in_f, out_f = module.in_features, module.out_features
        ok = (
            down.reshape(down.shape[0], -1).shape[1] == in_f
            and (down.dim() == 2 or tuple(down.shape[2:]) == (1, 1))
            and up.shape[0] == out_f
        )
        expected = f"down (r, {in_f}) and up ({out_f}, r)"
    else:
        conv: torch.nn.Conv2d = module  # type: ignore[assignment]
        in_c, out_c = conv.in_channels // conv.groups, conv.out_channels
        kernel = tuple(conv.kernel_size)
        down_kernel = tuple(down.shape[2:]) if down.dim() == 4 else (1, 1)
        ok = (
            down.shape[1] == in_c
            and up.shape[0] == out_c
            and down_kernel in (kernel, (1, 1))
            and conv.groups == 1
        )
        if down_kernel == (1, 1) and kernel != (1, 1):
            ok = False
        expected = f"down (r, {in_c}, {kernel[0]}, {kernel[1]}) and up ({out_c}, r, 1, 1)"
    if not ok:
        raise LoRAFileError(
            path,
            f"shapes down {list(down.shape)} / up {list(up.shape)} do not fit layer {name} "
            f"(expects {expected}): the LoRA was made for another base model",
            key=entry.source or entry.key,
        )

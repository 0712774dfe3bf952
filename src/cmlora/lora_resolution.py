"""Resolution of a LoRA file against a pipeline: every key to the module it adapts (kohya's
underscore names, SDXL's SGM block names, dotted diffusers/PEFT names), every shape checked
against that module, before anything in the pipeline changes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoRAFileError
from .loras import LoRAFile, LoRAModuleWeights
from .lycoris import check_layer


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
    module = base_layer(module)
    if entry.kind != "lora" or "mid" in entry.tensors:
        check_layer(path, entry, module, name)
        return
    down, up = entry.down, entry.up
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
    check_layer(path, entry, module, name)  # its dora_scale, if any

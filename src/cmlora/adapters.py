"""LoRA adapters as thin layer wrappers whose activation is one attribute write.

Composite and CMLoRA switch the active LoRA several times per denoising step. Walking every
module (``set_adapters``) per switch costs tens of ms on SDXL, so all wrappers of a model share a
``Router`` and read the active set from it: switching is O(1), whatever the model size. The
router also carries per-row activations, so one batched UNet call can serve several LoRAs (each
batch row with its own adapter, as in PEFT's mixed-adapter batches).

Wrappers are installed into the user's own pipeline and removed on ``detach()``, leaving the
exact original module objects in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .loras import LoRAFile, ResolvedModule, base_layer

Activation = tuple[tuple[str, float], ...]
"""Active adapters and their strengths, applied to every row of the batch."""


@dataclass(frozen=True)
class RowGroup:
    rows: slice
    active: Activation


class Router:
    """What every wrapper of one model applies on the current forward pass."""

    def __init__(self) -> None:
        self.active: Activation = ()
        self.rows: tuple[RowGroup, ...] | None = None

    def set(self, active: Activation) -> None:
        self.active, self.rows = active, None

    def set_rows(self, groups: Sequence[RowGroup]) -> None:
        self.active, self.rows = (), tuple(groups)

    def clear(self) -> None:
        self.active, self.rows = (), None


class _Delta:
    """One adapter's factors on one layer, already on the layer's device and dtype."""

    __slots__ = ("down", "up", "scale", "conv_args")

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, conv_args: dict | None):
        self.down, self.up, self.scale, self.conv_args = down, up, scale, conv_args

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_args is None:
            return F.linear(F.linear(x, self.down), self.up)
        return F.conv2d(F.conv2d(x, self.down, **self.conv_args), self.up)


class LoRAWrapped(torch.nn.Module):
    """A Linear or Conv2d plus any number of named low-rank deltas, selected by the router."""

    def __init__(self, base: torch.nn.Module, router: Router):
        super().__init__()
        self.base = base
        self.router = router
        self.deltas: dict[str, _Delta] = {}

    def add(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        weight = self.base.weight
        down = down.to(device=weight.device, dtype=weight.dtype)
        up = up.to(device=weight.device, dtype=weight.dtype)
        if isinstance(base_layer(self.base), torch.nn.Conv2d):
            if down.dim() == 2:
                down = down[:, :, None, None]
            if up.dim() == 2:
                up = up[:, :, None, None]
            conv = base_layer(self.base)
            args = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
            self.deltas[name] = _Delta(down.contiguous(), up.contiguous(), scale, args)
        else:
            self.deltas[name] = _Delta(
                down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1), scale, None
            )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        router = self.router
        if router.rows is None:
            for name, strength in router.active:
                delta = self.deltas.get(name)
                if delta is not None and strength != 0.0:
                    out = out + delta(x) * (strength * delta.scale)
            return out
        parts = []
        for group in router.rows:
            part, xs = out[group.rows], x[group.rows]
            for name, strength in group.active:
                delta = self.deltas.get(name)
                if delta is not None and strength != 0.0:
                    part = part + delta(xs) * (strength * delta.scale)
            parts.append(part)
        return torch.cat(parts, dim=0)


_COMPONENT_ROUTER = {"unet": "unet", "text_encoder": "text", "text_encoder_2": "text"}


class AdapterSet:
    """The LoRAs of a composition, installed into one pipeline until ``detach()``."""

    def __init__(self, pipe: object):
        self.pipe = pipe
        self.routers = {"unet": Router(), "text": Router()}
        self._originals: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        self._wrapped: dict[tuple[str, str], LoRAWrapped] = {}
        self.names: list[str] = []
        self.components: dict[str, set[str]] = {}

    def attach(self, name: str, lora_file: LoRAFile, resolved: Sequence[ResolvedModule]) -> None:
        """Install one resolved LoRA. ``resolve()`` already checked every key and shape."""
        if name in self.names:
            raise ValueError(f"adapter name {name!r} is already installed")
        for item in resolved:
            wrapper = self._wrapper(item.component, item.module_name)
            w = item.weights
            wrapper.add(name, w.down, w.up, w.scale)
        self.names.append(name)
        self.components[name] = {item.component for item in resolved}
        del lora_file  # the caller keeps file metadata; tensors now live in the wrappers

    def _wrapper(self, component: str, module_name: str) -> LoRAWrapped:
        key = (component, module_name)
        if key in self._wrapped:
            return self._wrapped[key]
        model = getattr(self.pipe, component)
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        wrapper = LoRAWrapped(original, self.routers[_COMPONENT_ROUTER[component]])
        setattr(parent, child, wrapper)
        self._originals.append((parent, child, original))
        self._wrapped[key] = wrapper
        return wrapper

    def detach(self) -> None:
        for parent, child, original in reversed(self._originals):
            setattr(parent, child, original)
        self._originals.clear()
        self._wrapped.clear()
        self.names.clear()
        for router in self.routers.values():
            router.clear()

    @property
    def unet(self) -> Router:
        return self.routers["unet"]

    @property
    def text(self) -> Router:
        return self.routers["text"]

    def wrappers(self) -> Iterator[LoRAWrapped]:
        return iter(self._wrapped.values())

    @contextmanager
    def text_active(self, active: Activation) -> Iterator[None]:
        self.text.set(active)
        try:
            yield
        finally:
            self.text.clear()

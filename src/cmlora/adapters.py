"""LoRA adapters as thin layer wrappers whose activation is one attribute write.

Composite and CMLoRA switch the active LoRA several times per denoising step. Walking every
module (``set_adapters``) per switch costs tens of ms on SDXL, so all wrappers of a model share a
``Router`` and read the active set from it: switching is O(1), whatever the model size. The
router also carries per-row activations, so one batched UNet call can serve several LoRAs (each
batch row with its own adapter, as in PEFT's mixed-adapter batches).

Wrappers are installed into the user's own pipeline and removed on ``detach()``, leaving the
exact original module objects in place.

Under ``torch.compile`` the eager selection above (a Python loop over adapter names) becomes a
guard: every new active set recompiles the graph. ``AdapterSet.stack()`` therefore stacks each
layer's factors (rank zero-padded to the layer's largest) and the router then selects adapters by
index *tensors*, so a compiled graph depends only on the call's structure (row groups, number of
active adapters), never on which LoRAs are active.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import OptionError
from .loras import LoRAFile, ResolvedModule, base_layer

Activation = tuple[tuple[str, float], ...]
"""Active adapters and their strengths, applied to every row of the batch."""


@dataclass(frozen=True)
class RowGroup:
    rows: slice
    active: Activation


Selection = tuple[tuple[slice | None, torch.Tensor, torch.Tensor], ...]
"""Stacked mode: per row group (None = all rows), adapter indices and their strengths, as tensors."""


class Router:
    """What every wrapper of one model applies on the current forward pass.

    ``fuse``: the active set stays for many calls (merge, switch), so each wrapper runs one matmul
    with ``W + sum s_i B_i A_i``, built once per active set, instead of the base matmul plus two
    low-rank ones per adapter: on a GPU at these batch sizes the extra kernels, not their MACs, are
    what un-fused merge pays for.
    """

    def __init__(self) -> None:
        self.active: Activation = ()
        self.rows: tuple[RowGroup, ...] | None = None
        self.fuse = False
        self.slots: dict[str, int] | None = None  # stacked mode: adapter name -> stack index
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.selection: Selection = ()

    def set(self, active: Activation, fuse: bool = False) -> None:
        self.active, self.rows, self.fuse = active, None, fuse
        self.selection = self._select([(None, active)])

    def set_rows(self, groups: Sequence[RowGroup]) -> None:
        self.active, self.rows, self.fuse = (), tuple(groups), False
        self.selection = self._select([(g.rows, g.active) for g in groups])

    def clear(self) -> None:
        self.active, self.rows, self.selection, self.fuse = (), None, (), False

    def stack(self, names: Sequence[str], device: torch.device, dtype: torch.dtype) -> None:
        self.slots = {name: k for k, name in enumerate(names)}
        self.device, self.dtype = device, dtype

    def _select(self, groups: list[tuple[slice | None, Activation]]) -> Selection:
        if self.slots is None:
            return ()
        picked = [
            (rows, [(self.slots[n], s) for n, s in active if s != 0.0 and n in self.slots])
            for rows, active in groups
        ]
        if all(not chosen for _, chosen in picked):
            return ()
        return tuple(
            (
                rows,
                torch.tensor([k for k, _ in chosen], dtype=torch.long, device=self.device),
                torch.tensor([s for _, s in chosen], dtype=self.dtype, device=self.device),
            )
            for rows, chosen in picked
        )


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
        # stacked mode (see the module docstring): [adapters, rank, in(, kh, kw)], [adapters, out, rank]
        self.down_stack: torch.Tensor | None = None
        self.up_stack: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        # fused mode: the weight with the active deltas added, and what it was built from
        self._fused_key: tuple | None = None
        self._fused_weight: torch.Tensor | None = None

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

    def check_stackable(self) -> None:
        if any(d.conv_args is not None and d.up.shape[2:] != (1, 1) for d in self.deltas.values()):
            raise OptionError(
                "compile needs 1x1 up-projections on convolution LoRAs; a LoRA in this composition has "
                f"up kernels {sorted({tuple(d.up.shape[2:]) for d in self.deltas.values()})}: "
                "generate without compile"
            )

    def stack(self, names: Sequence[str]) -> None:
        """Stack the factors of ``names`` (zeros where an adapter lacks this layer). The deltas then
        view into the stacks, so the factors are held once."""
        weight = self.base.weight
        present = [self.deltas[n] for n in names if n in self.deltas]
        rank = max(d.down.shape[0] for d in present)
        shape = (len(names), rank, *present[0].down.shape[1:])
        down = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        up = torch.zeros((len(names), present[0].up.shape[0], rank), dtype=weight.dtype, device=weight.device)
        scales = torch.zeros(len(names), dtype=weight.dtype, device=weight.device)
        for k, name in enumerate(names):
            delta = self.deltas.get(name)
            if delta is not None:
                r = delta.down.shape[0]
                down[k, :r] = delta.down
                up[k, :, :r] = delta.up.reshape(delta.up.shape[0], r)
                scales[k] = delta.scale
                delta.down, delta.up = down[k, :r], up[k, :, :r].view(delta.up.shape)
        self.down_stack, self.up_stack, self.scales = down, up, scales

    def _stacked_delta(self, x: torch.Tensor, index: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """The sum of the selected adapters' deltas as one low-rank product of rank k x rank."""
        down = self.down_stack.index_select(0, index)
        up = self.up_stack.index_select(0, index)
        weight = strength * self.scales.index_select(0, index)
        k, rank = down.shape[0], down.shape[1]
        up = up.permute(1, 0, 2).reshape(up.shape[1], k * rank)
        conv_args = next(iter(self.deltas.values())).conv_args
        if conv_args is None:
            h = F.linear(x, down.flatten(0, 1))
            h = (h.unflatten(-1, (k, rank)) * weight[:, None]).flatten(-2)
            return F.linear(h, up)
        h = F.conv2d(x, down.flatten(0, 1), **conv_args)
        h = (h.unflatten(1, (k, rank)) * weight[:, None, None, None]).flatten(1, 2)
        return F.conv2d(h, up[:, :, None, None])

    def fused_active(self) -> Activation | None:
        """The adapters this layer would fuse on the current pass, or None when it runs un-fused:
        fusing needs a plain Linear or ungrouped Conv2d (a subclass may do more than its matmul),
        1x1 up-projections and down-projections of the layer's own kernel, and never applies to row
        groups or stacked (compiled) mode."""
        router = self.router
        if not router.fuse or router.rows is not None or self.down_stack is not None:
            return None
        base = self.base
        if type(base) is torch.nn.Conv2d:
            if base.groups != 1:
                return None
        elif type(base) is not torch.nn.Linear:
            return None
        active = tuple((n, s) for n, s in router.active if s != 0.0 and n in self.deltas)
        per_row = base.weight[0].numel()
        for name, _ in active:
            delta = self.deltas[name]
            if delta.conv_args is not None and delta.up.shape[2:] != (1, 1):
                return None
            if delta.down[0].numel() != per_row:  # e.g. a 1x1 down-projection on a 3x3 layer
                return None
        return active

    def _fused(self, active: Activation) -> torch.Tensor:
        """``W + sum s_i scale_i B_i A_i`` as one matrix product of the concatenated factors (one
        kernel and one rounding per layer, in the weight's dtype: switch rebuilds it every tau steps),
        kept until the active set, the base weight's storage or its version changes. The previous
        copy is dropped first, so a layer holds at most one fused weight."""
        weight = self.base.weight
        key = (active, weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._fused_key != key:
            self._fused_key, self._fused_weight = None, None
            ups, downs = [], []
            for name, strength in active:
                delta = self.deltas[name]
                ups.append(delta.up.reshape(delta.up.shape[0], -1) * (strength * delta.scale))
                downs.append(delta.down.reshape(delta.down.shape[0], -1))
            flat = weight.detach().reshape(weight.shape[0], -1)
            fused = torch.addmm(flat, torch.cat(ups, dim=1), torch.cat(downs, dim=0))
            self._fused_weight, self._fused_key = fused.view(weight.shape), key
        return self._fused_weight

    def release_fused(self) -> None:
        self._fused_key, self._fused_weight = None, None

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()`` on the pipeline move the LoRA factors with the layer
        they adapt (they are plain tensors, not parameters: the pipeline's state_dict stays its own).
        Stacked factors are moved once and the per-adapter views re-taken from them."""
        super()._apply(fn, recurse)
        if self.down_stack is not None:
            self.down_stack, self.up_stack, self.scales = (
                fn(self.down_stack),
                fn(self.up_stack),
                fn(self.scales),
            )
            for k, delta in enumerate(self._stack_slots()):
                if delta is not None:
                    r = delta.down.shape[0]
                    delta.down = self.down_stack[k, :r]
                    delta.up = self.up_stack[k, :, :r].view(delta.up.shape)
            self.router.device, self.router.dtype = self.down_stack.device, self.down_stack.dtype
        else:
            for delta in self.deltas.values():
                delta.down, delta.up = fn(delta.down), fn(delta.up)
        self.release_fused()
        return self

    def _stack_slots(self) -> list[_Delta | None]:
        slots = self.router.slots or {}
        by_slot: list[_Delta | None] = [None] * len(slots)
        for name, k in slots.items():
            by_slot[k] = self.deltas.get(name)
        return by_slot

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        router = self.router
        if router.fuse:
            active = self.fused_active()
            if active:
                base = self.base
                if type(base) is torch.nn.Linear:
                    return F.linear(x, self._fused(active), base.bias)
                return base._conv_forward(x, self._fused(active), base.bias)
        out = self.base(x, *args, **kwargs)
        if self.down_stack is not None:  # stacked mode: AdapterSet.stack() set the router up too
            selection = router.selection
            if not selection:
                return out
            if selection[0][0] is None:
                _, index, strength = selection[0]
                return out + self._stacked_delta(x, index, strength)
            return torch.cat(
                [
                    out[rows] + self._stacked_delta(x[rows], index, strength)
                    for rows, index, strength in selection
                ]
            )
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


def installed_in(pipe: object) -> bool:
    """Whether a cmlora session (a Composer not closed yet) has LoRA wrappers in this pipeline."""
    for component in _COMPONENT_ROUTER:
        model = getattr(pipe, component, None)
        if isinstance(model, torch.nn.Module) and any(isinstance(m, LoRAWrapped) for m in model.modules()):
            return True
    return False


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

    def stack(self) -> None:
        """Switch the UNet's wrappers to index-tensor selection (for ``torch.compile``)."""
        names = [n for n in self.names if "unet" in self.components[n]]
        wrappers = [w for (component, _), w in self._wrapped.items() if component == "unet"]
        for wrapper in wrappers:  # every layer checked before any changes
            wrapper.check_stackable()
        for wrapper in wrappers:
            wrapper.stack(names)
        weight = wrappers[0].base.weight if wrappers else None
        if weight is not None:
            self.unet.stack(names, weight.device, weight.dtype)

    def release_fused(self) -> None:
        """Free the fused weights (one copy of every wrapped layer's weight at most)."""
        for wrapper in self._wrapped.values():
            wrapper.release_fused()

    def detach(self) -> None:
        self.release_fused()
        for parent, child, original in reversed(self._originals):
            setattr(parent, child, original)
        self._originals.clear()
        self._wrapped.clear()
        self.names.clear()
        for router in self.routers.values():
            router.clear()
            router.slots = None

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

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
layer's factors (rank zero-padded to the layer's largest; dense LyCORIS/DoRA deltas in a stack of
their own) and the router then selects adapters by index *tensors*, so a compiled graph depends only on the call's structure (row groups, number of
active adapters), never on which LoRAs are active.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .deltas import DenseDelta, LowRankDelta, conv_macs, linear_macs
from .errors import OptionError
from .lora_resolution import ResolvedModule, base_layer
from .loras import LoRAFile
from .lycoris import Factors, layer_delta

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


_LAYER_ATTRIBUTES = frozenset(
    ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding")
    + ("dilation", "groups", "padding_mode", "weight", "bias")
)


class LoRAWrapped(torch.nn.Module):
    """A Linear or Conv2d plus any number of named deltas, selected by the router.

    The deltas are submodules (``deltas.LowRankDelta``/``DenseDelta``) and the stacks buffers, so
    ``.to()`` on the pipeline moves them with the layer (non-persistent: the pipeline's state_dict
    stays its own). ``deltas`` maps adapter names to them (names may hold dots, which module names
    cannot, so they are registered under their order of arrival).
    """

    def __init__(self, base: torch.nn.Module, router: Router):
        super().__init__()
        self.base = base
        self.router = router
        layer = base_layer(base)
        self.conv_args: dict | None = None
        if isinstance(layer, torch.nn.Conv2d):
            self.conv_args = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
        self.deltas: dict[str, LowRankDelta | DenseDelta] = {}
        self.factors = torch.nn.ModuleList()
        # stacked mode (see the module docstring): low-rank [adapters, rank, in(, kh, kw)],
        # [adapters, out, rank] and scales; dense [dense adapters, *weight] with, per adapter, its
        # index in the dense stack and its scale (0 for adapters without a dense delta here)
        self.stacked = False
        for name in ("down_stack", "up_stack", "scales", "dense_stack", "dense_index", "dense_scales"):
            self.register_buffer(name, None, persistent=False)
        # fused mode: the weight with the active deltas added, and what it was built from
        self._fused_key: tuple | None = None
        self._fused_weight: torch.Tensor | None = None

    def __getattr__(self, name: str):
        """The adapted layer's own attributes (``in_features``, ``weight``...) read through the
        wrapper: diffusers reads some of them (SDXL's ``add_embedding.linear_1.in_features``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _LAYER_ATTRIBUTES:
                return getattr(self.base, name)
            raise

    def _register(self, name: str, delta: LowRankDelta | DenseDelta) -> None:
        if name in self.deltas:
            raise ValueError(f"adapter {name!r} already has a delta on this layer")
        self.deltas[name] = delta
        self.factors.append(delta)

    def add(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        """A low-rank delta ``scale * up @ down``, cast to the layer's device and dtype."""
        weight = self.base.weight
        down = down.to(device=weight.device, dtype=weight.dtype)
        up = up.to(device=weight.device, dtype=weight.dtype)
        if self.conv_args is not None:
            if down.dim() == 2:
                down = down[:, :, None, None]
            if up.dim() == 2:
                up = up[:, :, None, None]
            self._register(name, LowRankDelta(down.contiguous(), up.contiguous(), scale, self.conv_args))
        else:
            down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
            self._register(name, LowRankDelta(down, up, scale, None))

    def add_dense(self, name: str, delta: torch.Tensor) -> None:
        """A materialised delta of the layer's weight shape, cast to the layer's device and dtype."""
        weight = self.base.weight
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(
                f"dense delta {list(delta.shape)} is not the weight's shape {list(weight.shape)}"
            )
        delta = delta.to(device=weight.device, dtype=weight.dtype).contiguous()
        self._register(name, DenseDelta(delta, self.conv_args))

    def check_stackable(self) -> None:
        ups = [d.up for d in self.deltas.values() if isinstance(d, LowRankDelta)]
        if self.conv_args is not None and any(up.shape[2:] != (1, 1) for up in ups):
            raise OptionError(
                "compile needs 1x1 up-projections on convolution LoRAs; a LoRA in this composition has "
                f"up kernels {sorted({tuple(up.shape[2:]) for up in ups})}: "
                "generate without compile"
            )

    def stack(self, names: Sequence[str]) -> None:
        """Stack the factors of ``names`` (zeros where an adapter lacks this layer). The deltas then
        view into the stacks, so the factors are held once."""
        weight = self.base.weight
        low = [self.deltas[n] for n in names if isinstance(self.deltas.get(n), LowRankDelta)]
        dense = [
            (k, self.deltas[n]) for k, n in enumerate(names) if isinstance(self.deltas.get(n), DenseDelta)
        ]
        if low:
            rank = max(d.down.shape[0] for d in low)
            shape = (len(names), rank, *low[0].down.shape[1:])
            down = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            up = torch.zeros((len(names), low[0].up.shape[0], rank), dtype=weight.dtype, device=weight.device)
            scales = torch.zeros(len(names), dtype=weight.dtype, device=weight.device)
            for k, name in enumerate(names):
                delta = self.deltas.get(name)
                if isinstance(delta, LowRankDelta):
                    r = delta.down.shape[0]
                    down[k, :r] = delta.down
                    up[k, :, :r] = delta.up.reshape(delta.up.shape[0], r)
                    scales[k] = delta.scale
            self.down_stack, self.up_stack, self.scales = down, up, scales
        if dense:
            self.dense_stack = torch.stack([d.weight for _, d in dense])
            index = torch.zeros(len(names), dtype=torch.long, device=weight.device)
            scales = torch.zeros(len(names), dtype=weight.dtype, device=weight.device)
            for j, (k, delta) in enumerate(dense):
                index[k], scales[k] = j, delta.scale
            self.dense_index, self.dense_scales = index, scales
        self.stacked = True
        self._view_stacks()

    def _view_stacks(self) -> None:
        """Point every delta's factors at its slice of the stacks (after stacking and after a move)."""
        slots = self.router.slots or {}
        dense_slot = 0
        for name, k in sorted(slots.items(), key=lambda item: item[1]):
            delta = self.deltas.get(name)
            if isinstance(delta, LowRankDelta) and self.down_stack is not None:
                r = delta.down.shape[0]
                delta.down = self.down_stack[k, :r]
                delta.up = self.up_stack[k, :, :r].view(delta.up.shape)
                delta.in_stack = True
            elif isinstance(delta, DenseDelta):
                delta.weight = self.dense_stack[dense_slot]
                delta.in_stack = True
                dense_slot += 1

    def _stacked_delta(self, x: torch.Tensor, index: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """The sum of the selected adapters' deltas: the low-rank ones as one low-rank product of
        rank k x rank, the dense ones as one weighted sum of their weights."""
        total = None
        if self.down_stack is not None:
            down = self.down_stack.index_select(0, index)
            up = self.up_stack.index_select(0, index)
            weight = strength * self.scales.index_select(0, index)
            k, rank = down.shape[0], down.shape[1]
            up = up.permute(1, 0, 2).reshape(up.shape[1], k * rank)
            if self.conv_args is None:
                h = F.linear(x, down.flatten(0, 1))
                h = (h.unflatten(-1, (k, rank)) * weight[:, None]).flatten(-2)
                total = F.linear(h, up)
            else:
                h = F.conv2d(x, down.flatten(0, 1), **self.conv_args)
                h = (h.unflatten(1, (k, rank)) * weight[:, None, None, None]).flatten(1, 2)
                total = F.conv2d(h, up[:, :, None, None])
        if self.dense_stack is not None:
            weight = strength * self.dense_scales.index_select(0, index)
            chosen = self.dense_stack.index_select(0, self.dense_index.index_select(0, index))
            summed = torch.tensordot(weight, chosen, dims=1)
            if self.conv_args is None:
                part = F.linear(x, summed)
            else:
                part = F.conv2d(x, summed, **self.conv_args)
            total = part if total is None else total + part
        return total

    def fused_active(self) -> Activation | None:
        """The adapters this layer would fuse on the current pass, or None when it runs un-fused:
        fusing needs a plain Linear or ungrouped Conv2d (a subclass may do more than its matmul),
        1x1 up-projections and down-projections of the layer's own kernel, and never applies to row
        groups or stacked (compiled) mode."""
        router = self.router
        if not router.fuse or router.rows is not None or self.stacked:
            return None
        base = self.base
        if type(base) is torch.nn.Conv2d:
            if base.groups != 1:
                return None
        elif type(base) is not torch.nn.Linear:
            return None
        active = tuple((n, s) for n, s in router.active if s != 0.0 and n in self.deltas)
        per_row = base.weight[0].numel()
        if not all(self.deltas[name].fusable(per_row) for name, _ in active):
            return None
        return active

    def _fused(self, active: Activation) -> torch.Tensor:
        """``W + sum s_i scale_i B_i A_i`` (+ ``s_j D_j`` for dense deltas) as one matrix product of
        the concatenated factors (one kernel and one rounding per layer, in the weight's dtype:
        switch rebuilds it every tau steps), kept until the active set, the base weight's storage or
        its version changes. The previous copy is dropped first, so a layer holds at most one fused
        weight."""
        weight = self.base.weight
        key = (active, weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._fused_key != key:
            self._fused_key, self._fused_weight = None, None
            ups, downs = [], []
            flat = weight.detach().reshape(weight.shape[0], -1)
            for name, strength in active:
                delta = self.deltas[name]
                if isinstance(delta, DenseDelta):
                    flat = flat.add(delta.weight.reshape(flat.shape), alpha=strength * delta.scale)
                    continue
                ups.append(delta.up.reshape(delta.up.shape[0], -1) * (strength * delta.scale))
                downs.append(delta.down.reshape(delta.down.shape[0], -1))
            fused = torch.addmm(flat, torch.cat(ups, dim=1), torch.cat(downs, dim=0)) if ups else flat
            self._fused_weight, self._fused_key = fused.view(weight.shape), key
        return self._fused_weight

    def release_fused(self) -> None:
        self._fused_key, self._fused_weight = None, None

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()`` on the pipeline move the deltas with the layer they
        adapt (buffers of this module and of its deltas). Stacked factors are moved once, as the
        stacks, and the per-adapter views re-taken from them."""
        super()._apply(fn, recurse)
        if self.stacked:
            self._view_stacks()
            moved = self.down_stack if self.down_stack is not None else self.dense_stack
            if moved is not None:
                self.router.device, self.router.dtype = moved.device, moved.dtype
        self.release_fused()
        return self

    def macs(self, x: torch.Tensor, output: torch.Tensor) -> int:
        """Multiply-accumulates this layer adds to its base layer's own on the pass just run: the
        active deltas, per row group; fused, the one matmul with the fused weight (the base layer
        did not run, so its own count did not happen). Stacked mode counts the same deltas."""
        if self.fused_active():
            base = self.base
            return linear_macs(base, output) if isinstance(base, torch.nn.Linear) else conv_macs(base, output)
        router = self.router
        groups = (
            [(x.shape[0], router.active)]
            if router.rows is None
            else [(g.rows.stop - g.rows.start, g.active) for g in router.rows]
        )
        total = 0
        for rows, active in groups:
            for name, strength in active:
                delta = self.deltas.get(name)
                if delta is not None and strength != 0.0:
                    total += delta.macs(rows, x, output)
        return total

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
        if self.stacked:  # stacked mode: AdapterSet.stack() set the router up too
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
        """Install one resolved LoRA. ``resolve()`` already checked every key and shape; each
        layer's delta is built here once (``lycoris.layer_delta``: LoRA factors as read, LyCORIS
        factors or a dense delta in the cheaper form), in the layer's dtype."""
        if name in self.names:
            raise ValueError(f"adapter name {name!r} is already installed")
        for item in resolved:
            wrapper = self._wrapper(item.component, item.module_name)
            delta = layer_delta(item.weights, base_layer(wrapper.base))
            if isinstance(delta, Factors):
                wrapper.add(name, delta.down, delta.up, delta.scale)
            else:
                wrapper.add_dense(name, delta.weight)
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
        weight = wrappers[0].base.weight if wrappers else None
        if weight is not None:
            self.unet.stack(names, weight.device, weight.dtype)  # the slots the wrappers stack by
        for wrapper in wrappers:
            wrapper.stack(names)

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

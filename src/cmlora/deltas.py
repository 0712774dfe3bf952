"""One adapter's delta on one layer, as a module whose factors are (non-persistent) buffers.

Buffers, so that ``pipe.to()`` / ``.half()`` move and cast the factors with the layer they adapt,
as PEFT's adapters are moved; non-persistent, so the pipeline's ``state_dict`` stays its own. Each
delta also says what one call of it costs (``macs``): MAC counting asks the layer, it does not
re-derive costs from the factors' layout.

Two forms (``lycoris.layer_delta`` picks one per layer): ``LowRankDelta`` (up @ down: LoRA,
LoCon, and LoHa/LoKr where their factor form is smaller) and ``DenseDelta`` (a materialised
weight-shaped delta: DoRA, and LoHa/LoKr where the dense form is smaller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ConvArgs = dict | None
"""stride/padding/dilation of the adapted Conv2d; None for a Linear."""


def linear_macs(layer: torch.nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * layer.in_features


def conv_macs(layer: torch.nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = layer.kernel_size
    return output.numel() * (layer.in_channels // layer.groups) * kh * kw


class _Delta(torch.nn.Module):
    """Common state: the alpha scale, the layer's convolution arguments, and whether the factors
    are views into the wrapper's stacks (then the wrapper, not this module, moves them)."""

    def __init__(self, scale: float, conv_args: ConvArgs):
        super().__init__()
        self.scale = scale
        self.conv_args = conv_args
        self.in_stack = False

    def _apply(self, fn, recurse: bool = True):
        if self.in_stack:  # the wrapper moves its stacks once and re-takes the views
            return self
        return super()._apply(fn, recurse)

    def fusable(self, per_row: int) -> bool:
        """Whether ``dense_flat`` can be added to the layer's weight (one matmul per layer)."""
        raise NotImplementedError

    def macs(self, rows: int, x: torch.Tensor, output: torch.Tensor) -> int:
        """Multiply-accumulates of one call on ``rows`` batch rows of ``x`` (``output``: the
        layer's output for the whole batch, for the spatial size of a convolution)."""
        raise NotImplementedError


class LowRankDelta(_Delta):
    """``up @ down``: Linear down (r, in) / up (out, r); Conv2d down (r, in, kh, kw) / up (out, r, 1, 1)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, conv_args: ConvArgs):
        super().__init__(scale, conv_args)
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_args is None:
            return F.linear(F.linear(x, self.down), self.up)
        return F.conv2d(F.conv2d(x, self.down, **self.conv_args), self.up)

    def fusable(self, per_row: int) -> bool:
        if self.conv_args is not None and self.up.shape[2:] != (1, 1):
            return False
        return self.down[0].numel() == per_row  # not e.g. a 1x1 down-projection on a 3x3 layer

    def macs(self, rows: int, x: torch.Tensor, output: torch.Tensor) -> int:
        if self.conv_args is None:
            tokens = rows * (x[0].numel() // x.shape[-1])
            return tokens * self.rank * (self.down.shape[1] + self.up.shape[0])
        spatial = rows * output.shape[-1] * output.shape[-2]
        return spatial * self.rank * (self.down[0].numel() + self.up.shape[0])


class DenseDelta(_Delta):
    """A delta in the layer's weight shape, applied with the layer's own op (scale folded in)."""

    def __init__(self, weight: torch.Tensor, conv_args: ConvArgs):
        super().__init__(1.0, conv_args)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_args is None:
            return F.linear(x, self.weight)
        return F.conv2d(x, self.weight, **self.conv_args)

    def fusable(self, per_row: int) -> bool:
        return True

    def macs(self, rows: int, x: torch.Tensor, output: torch.Tensor) -> int:
        if self.conv_args is None:
            return rows * (x[0].numel() // x.shape[-1]) * self.weight.numel()
        return rows * output.shape[-1] * output.shape[-2] * self.weight.numel()

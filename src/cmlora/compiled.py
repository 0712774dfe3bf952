"""Regional ``torch.compile`` of a UNet under composition.

The UNet is compiled block by block (every resnet and transformer block), not as one function:
CMLoRA's cached calls run only the shallow blocks through ``UNetSplit``, so a whole-UNet graph
would serve the full calls alone. Blocks of one class and shape share a graph. The LoRA
wrappers inside them select adapters by index tensors (``AdapterSet.stack``), so switching
LoRAs between calls re-uses the graphs: new graphs appear only for a new call structure (batch
rows, row groups, number of active LoRAs), all of which a method's first image already meets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Graph cache entries allowed per block class while composing. Entries are bounded by block shapes
#: x call structures, not by LoRA switches, and can exceed dynamo's default of 8, past which a
#: block silently runs eager ("hit config.recompile_limit").
RECOMPILE_LIMIT = 256


def _blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [m for m in unet.modules() if isinstance(m, ResnetBlock2D | Transformer2DModel)]


def check_backend(backend: object) -> None:
    """Refuse a ``torch.compile`` backend name torch does not know, up front: torch only finds
    out when the first block runs, after the model loaded and mid-way through an image."""
    if not isinstance(backend, str):
        return  # a callable backend is the caller's own
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        from .errors import OptionError

        common = sorted({*torch._dynamo.list_backends(), "eager", "aot_eager"})
        raise OptionError(f"unknown torch.compile backend {backend!r}; use one of {', '.join(common)}")


def compile_blocks(unet: torch.nn.Module, **options) -> None:
    """Compile every resnet and transformer block of ``unet`` in place."""
    for block in _blocks(unet):
        block.compile(**options)


def uncompile_blocks(unet: torch.nn.Module) -> None:
    """Undo ``compile_blocks`` (``nn.Module.compile`` keeps the compiled callable in this attribute)."""
    for block in _blocks(unet):
        block._compiled_call_impl = None


@contextmanager
def composing() -> Iterator[None]:
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        yield


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled blocks eagerly, without compiling (for one-off hooked passes such as MAC counting)."""
    with torch.compiler.set_stance("force_eager"):
        yield

"""UNet multiply-accumulate counts, attention matmuls included.

torch's FlopCounterMode does not see CPU attention kernels, so MACs are counted with forward
hooks: Linear and Conv2d layers, each LoRA layer's own count of what its active deltas cost
(``LoRAWrapped.macs``), and each attention module's QK^T and AV products. A count depends only on shapes and on which adapters run, so it is taken
once per call signature, during a real call, and reused. A fused layer counts as its base
layer; building a fused weight (once per active set, not per call) is not a UNet MAC.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from .adapters import LoRAWrapped
from .compiled import eager
from .deltas import conv_macs, linear_macs


def _attention_types() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention

    return (Attention,)


class MacCounter:
    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._known: dict[Hashable, int] = {}

    def count(self, signature: Hashable, run: Callable[[], object]) -> tuple[object, int]:
        """Run ``run()``, hooking the UNet the first time a signature is seen."""
        if signature in self._known:
            return run(), self._known[signature]
        total = [0]
        handles = []
        attention = _attention_types()

        def linear_hook(module, args, output):
            total[0] += linear_macs(module, output)

        def conv_hook(module, args, output):
            total[0] += conv_macs(module, output)

        def lora_hook(module: LoRAWrapped, args, output):
            total[0] += module.macs(args[0], output)  # the layer knows what its deltas cost

        def attention_hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            batch = hidden.shape[0]
            queries = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[2] * hidden.shape[3]
            keys = context.shape[1] if context is not None else queries
            to_q = module.to_q.base if isinstance(module.to_q, LoRAWrapped) else module.to_q
            total[0] += 2 * batch * queries * keys * to_q.out_features

        for module in self.unet.modules():
            if isinstance(module, torch.nn.Linear):
                handles.append(module.register_forward_hook(linear_hook))
            elif isinstance(module, torch.nn.Conv2d):
                handles.append(module.register_forward_hook(conv_hook))
            elif isinstance(module, LoRAWrapped):
                handles.append(module.register_forward_hook(lora_hook))
            elif isinstance(module, attention):
                handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
        try:
            with eager():  # hooks must not enter (or invalidate) compiled graphs
                result = run()
        finally:
            for handle in handles:
                handle.remove()
        self._known[signature] = total[0]
        return result, total[0]

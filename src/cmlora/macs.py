"""UNet multiply-accumulate counts, attention matmuls included.

torch's FlopCounterMode does not see CPU attention kernels, so MACs are counted with forward
hooks: Linear and Conv2d layers, the LoRA deltas that were active, and each attention module's
QK^T and AV products. A count depends only on shapes and on which adapters run, so it is taken
once per call signature, during a real call, and reused. A fused layer counts as its base
layer; building a fused weight (once per active set, not per call) is not a UNet MAC.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from .adapters import LoRAWrapped
from .compiled import eager


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
            total[0] += output.numel() * module.in_features

        def conv_hook(module, args, output):
            kh, kw = module.kernel_size
            total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw

        def lora_hook(module: LoRAWrapped, args, output):
            x = args[0]
            router = module.router
            if module.fused_active():  # one matmul with the fused weight; the base's hook did not run
                base = module.base
                if isinstance(base, torch.nn.Linear):
                    linear_hook(base, args, output)
                else:
                    conv_hook(base, args, output)
                return
            groups = (
                [(x.shape[0], router.active)]
                if router.rows is None
                else [(g.rows.stop - g.rows.start, g.active) for g in router.rows]
            )
            for rows, active in groups:
                for name, strength in active:
                    delta = module.deltas.get(name)
                    if delta is None or strength == 0.0:
                        continue
                    rank = delta.down.shape[0]
                    if delta.conv_args is None:
                        tokens = rows * (x[0].numel() // x.shape[-1])
                        total[0] += tokens * rank * (delta.down.shape[1] + delta.up.shape[0])
                    else:
                        spatial = rows * output.shape[-1] * output.shape[-2]
                        total[0] += spatial * rank * (delta.down[0].numel() + delta.up.shape[0])

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

"""torch.compile under composition: stacked adapter selection equals the eager loop, and compiled
blocks are re-used when the active LoRA changes (dynamo's ``eager`` backend: no C++ compiler)."""

import numpy as np
import pytest
import torch
from conftest import assert_same_state, pipeline_state
from test_compose import RecordingScheduler

from cmlora import LoRA
from cmlora.api import Composer
from cmlora.macs import MacCounter
from cmlora.methods import build_method
from cmlora.request import GenerationRequest
from cmlora.sampler import Denoiser, denoise


def predictions(pipe, paths, method, variant, batch, stacked, **options):
    with Composer(pipe, [LoRA(p) for p in paths]) as composer:
        if stacked:
            composer.adapters.stack()
        m = build_method(
            method,
            GenerationRequest(composer.loras, steps=3, lora_scale=0.8).composition(),
            variant,
            **options,
        )
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        scheduler = RecordingScheduler()
        scheduler.timesteps = torch.tensor([900, 600, 300])
        with torch.no_grad():
            conds = composer._encode(m, "red", "low", True, 16, 16)
            denoiser = Denoiser(pipe, composer.adapters, m, conds, 5.0, MacCounter(pipe.unet), batch=batch)
            denoise(denoiser, latents, scheduler)
    return scheduler.outputs


@pytest.mark.parametrize(
    "method, variant, options",
    [("merge", None, {}), ("composite", None, {}), ("cmlora", "offline", {"cache_interval": 2})],
)
@pytest.mark.parametrize("batch", [False, True])
def test_stacked_selection_equals_eager_loop(sd15, sd15_loras, method, variant, options, batch):
    # sd15_loras have ranks 2, 3 and 4: the stacks zero-pad them to one rank per layer
    eager = predictions(sd15, sd15_loras, method, variant, batch, stacked=False, **options)
    stacked = predictions(sd15, sd15_loras, method, variant, batch, stacked=True, **options)
    for a, b in zip(eager, stacked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_are_reused_when_loras_switch(sd15, sd15_loras):
    from torch._dynamo.utils import counters

    kwargs = dict(
        prompt="red hair", num_inference_steps=2, guidance_scale=5.0, height=16, width=16, progress=False
    )
    before = pipeline_state(sd15)
    with Composer(sd15, [LoRA(p) for p in sd15_loras]) as composer:
        reference = composer.generate(method="composite", batch_calls=False, seed=1, **kwargs).images[0]

    graphs = {}
    for count in (1, 3):
        torch._dynamo.reset()
        counters.clear()
        with Composer(sd15, [LoRA(p) for p in sd15_loras[:count]]) as composer:
            composer.compile(backend="eager")
            image = composer.generate(method="composite", batch_calls=False, seed=1, **kwargs).images[0]
            graphs[count] = counters["stats"]["unique_graphs"]
            if count == 3:
                diff = np.abs(np.asarray(image, np.float32) - np.asarray(reference, np.float32)).max()
                assert diff <= 1.0  # 8-bit images: at most one level apart
                # other LoRAs active per call, other strengths, other seed: same graphs
                with torch.compiler.set_stance("fail_on_recompile"):
                    composer.generate(method="switch", seed=4, lora_scale=0.5, **kwargs)
                    composer.generate(method="composite", batch_calls=False, seed=5, **kwargs)
    # one LoRA or three switched per call: the same graphs (one per block shape)
    assert graphs[1] == graphs[3] > 0
    torch._dynamo.reset()
    assert_same_state(before, pipeline_state(sd15))
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in sd15.unet.modules())


def test_compile_refuses_conv_loras_with_a_spatial_up_kernel():
    from cmlora.adapters import LoRAWrapped, Router
    from cmlora.errors import OptionError

    wrapper = LoRAWrapped(torch.nn.Conv2d(4, 4, 3, padding=1), Router())
    wrapper.add("a", torch.randn(2, 4, 3, 3), torch.randn(4, 2, 3, 3), 1.0)
    with pytest.raises(OptionError, match=r"1x1 up-projections .*\[\(3, 3\)\]"):
        wrapper.check_stackable()
    assert wrapper.down_stack is None

"""Library seams of a Composer session: one session per pipeline, and ``pipe.to()`` while open."""

import pytest
import torch

from cmlora import LoRA
from cmlora.api import Composer
from cmlora.errors import OptionError
from cmlora.tiny import tiny_sd15_pipeline


@pytest.fixture()
def pipe():
    return tiny_sd15_pipeline(seed=0)  # its own: these tests move it between dtypes


def test_a_second_composer_on_the_same_pipeline_is_refused_by_name(pipe, sd15_loras):
    with Composer(pipe, [LoRA(sd15_loras[0])]):
        with pytest.raises(OptionError, match="already has an open cmlora Composer"):
            Composer(pipe, [LoRA(sd15_loras[1])])
    with Composer(pipe, [LoRA(sd15_loras[1])]) as again:  # closed: a new session is fine
        assert again.loras[0].adapter == "lora1"


@pytest.mark.parametrize("compile_stacks", [False, True])
def test_pipe_to_moves_the_lora_factors(pipe, sd15_loras, compile_stacks):
    kwargs = dict(prompt="girl", num_inference_steps=3, guidance_scale=5.0, height=16, width=16, seed=1)
    kwargs |= dict(progress=False)
    loras = [LoRA(p) for p in sd15_loras[:2]]
    with Composer(pipe, loras) as composer:
        if compile_stacks:
            composer.adapters.stack()  # the index-tensor layout compile uses, without compiling
        before = composer.generate(method="composite", **kwargs).images[0]
        pipe.to(torch.float64)
        wrapper = next(w for (component, _), w in composer.adapters._wrapped.items() if component == "unet")
        delta = next(iter(wrapper.deltas.values()))
        assert delta.down.dtype == delta.up.dtype == torch.float64
        if compile_stacks:
            assert wrapper.down_stack.dtype == torch.float64 and composer.adapters.unet.dtype == torch.float64
            assert delta.down.data_ptr() == wrapper.down_stack[0].data_ptr()  # still a view of the stack
        for method in ("merge", "composite"):
            composer.generate(method=method, **kwargs)  # "expected m1 and m2 to have the same dtype" before
        pipe.to(torch.float32)
        after = composer.generate(method="composite", **kwargs).images[0]
    assert list(before.getdata()) == list(after.getdata())

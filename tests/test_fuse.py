"""Fused LoRAs: steps of one UNet call (merge, switch) run W + sum s B A as one matmul."""

import numpy as np
import pytest
import torch
from conftest import assert_same_state, pipeline_state

from cmlora import LoRA, mini
from cmlora.adapters import LoRAWrapped, Router
from cmlora.api import Composer
from cmlora.mini import world


def _wrapped(base: torch.nn.Module, deltas: dict) -> tuple[LoRAWrapped, Router]:
    router = Router()
    wrapper = LoRAWrapped(base, router)
    for name, (down, up, scale) in deltas.items():
        wrapper.add(name, down, up, scale)
    return wrapper, router


def test_fused_linear_and_conv_match_unfused_and_follow_the_active_set():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(12, 10)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
    cases = [
        (
            linear,
            {
                "a": (torch.randn(3, 12, generator=g), torch.randn(10, 3, generator=g), 0.5),
                "b": (torch.randn(2, 12, generator=g), torch.randn(10, 2, generator=g), 1.0),
            },
            torch.randn(2, 5, 12, generator=g),
        ),
        (
            conv,
            {
                "a": (torch.randn(3, 4, 3, 3, generator=g), torch.randn(6, 3, 1, 1, generator=g), 0.5),
                "b": (torch.randn(2, 4, 3, 3, generator=g), torch.randn(6, 2, 1, 1, generator=g), 1.0),
            },
            torch.randn(2, 4, 9, 9, generator=g),
        ),
    ]
    for base, deltas, x in cases:
        wrapper, router = _wrapped(base, deltas)
        for active in ((("a", 0.7),), (("a", 0.7), ("b", -1.2)), (("b", 1.0),)):
            router.set(active)
            plain = wrapper(x)
            router.set(active, fuse=True)
            assert wrapper.fused_active() == active
            fused = wrapper(x)
            assert wrapper._fused_key[0] == active  # rebuilt for the new set, one copy held
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
            assert not torch.equal(fused, base(x))
        with torch.no_grad():  # the base weight changed: the fused copy is rebuilt, not reused
            base.weight.add_(0.1)
        router.set((("b", 1.0),))
        plain = wrapper(x)
        router.set((("b", 1.0),), fuse=True)
        torch.testing.assert_close(wrapper(x), plain, rtol=1e-5, atol=1e-5)
        router.clear()
        assert not router.fuse


def test_layers_that_cannot_fuse_run_unfused():
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    wrapper, router = _wrapped(
        conv, {"a": (torch.randn(2, 4, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g), 1.0)}
    )
    router.set((("a", 1.0),), fuse=True)
    assert wrapper.fused_active() is None  # a 3x3 up-projection is not one kernel with the base's
    wrapper, router = _wrapped(
        conv, {"a": (torch.randn(2, 4, 1, 1, generator=g), torch.randn(6, 2, 1, 1, generator=g), 1.0)}
    )
    router.set((("a", 1.0),), fuse=True)
    assert wrapper.fused_active() is None  # nor is a 1x1 down-projection on a 3x3 layer

    class Scaled(torch.nn.Linear):  # a subclass may do more than its matmul
        def forward(self, x):
            return 2 * super().forward(x)

    wrapper, router = _wrapped(
        Scaled(5, 3), {"a": (torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), 1.0)}
    )
    router.set((("a", 1.0),), fuse=True)
    assert wrapper.fused_active() is None
    router.set_rows([])
    assert not router.fuse


def _tiny_kwargs(**settings) -> dict:
    return dict(prompt="red hair", guidance_scale=5.0, height=16, width=16, progress=False, **settings)


@pytest.mark.parametrize("method", ["merge", "switch"])
def test_fused_generation_matches_unfused_and_counts_base_macs(sd15, sd15_loras, method):
    before = pipeline_state(sd15)
    kwargs = _tiny_kwargs(method=method, num_inference_steps=4, seed=3)
    if method == "switch":
        kwargs["tau"] = 1  # a new fused set every step
    with Composer(sd15, [LoRA(p) for p in sd15_loras]) as composer:
        unfused = composer.generate(fuse_loras=False, **kwargs)
        assert all(w._fused_weight is None for w in composer.adapters.wrappers())
        fused = composer.generate(**kwargs)
        held = [w for w in composer.adapters.wrappers() if w._fused_weight is not None]
        assert held and all(w.router is composer.adapters.unet for w in held)  # UNet only
        plain = composer.generate(
            method="none", **{k: v for k, v in kwargs.items() if k not in ("method", "tau")}
        )
        composer.generate(fuse_loras=False, **kwargs)
        assert all(w._fused_weight is None for w in composer.adapters.wrappers())  # released
    a = np.asarray(unfused.images[0], dtype=np.float32)
    b = np.asarray(fused.images[0], dtype=np.float32)
    assert np.abs(a - b).max() <= 1.0
    r_un, r_fu = unfused.records[0], fused.records[0]
    assert (r_un["fused_loras"], r_fu["fused_loras"]) == (False, True)
    assert r_fu["full_calls"] == r_un["full_calls"] == 4
    assert r_fu["macs"] == plain.records[0]["macs"] < r_un["macs"]  # a fused layer costs its base matmul
    assert_same_state(before, pipeline_state(sd15))  # fusing never writes the pipeline's weights


def test_steps_of_several_calls_never_fuse(sd15, sd15_loras):
    kwargs = _tiny_kwargs(method="composite", num_inference_steps=3, seed=1)
    with Composer(sd15, [LoRA(p) for p in sd15_loras]) as composer:
        runs = [
            composer.generate(fuse_loras=f, batch_calls=b, **kwargs)
            for f in (False, True)
            for b in (False, True)
        ]
        assert all(w._fused_weight is None for w in composer.adapters.wrappers())
    for off, on in ((runs[0], runs[2]), (runs[1], runs[3])):
        assert np.array_equal(np.asarray(off.images[0]), np.asarray(on.images[0]))
        assert off.records[0]["macs"] == on.records[0]["macs"]


def _conv_lora_file(unet, path, seed: int = 0, rank: int = 4, scale: float = 0.05):
    """A kohya LoCon file on every resnet 3x3 convolution of ``unet`` (the mini LoRAs train none)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d) and ".resnets." in name and module.kernel_size == (3, 3):
            key = "lora_unet_" + name.replace(".", "_")
            state[key + ".lora_down.weight"] = (
                torch.randn(rank, module.in_channels, 3, 3, generator=g) * scale
            )
            state[key + ".lora_up.weight"] = torch.randn(module.out_channels, rank, 1, 1, generator=g) * scale
            state[key + ".alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def test_mini_merge_fuses_conv_loras(tmp_path):
    pipe = mini.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ids = ["character_1", "clothing_2", "background_1"]
    kwargs = dict(
        prompt=world.trigger_prompt(ids),
        method="merge",
        num_inference_steps=6,
        guidance_scale=mini.GUIDANCE,
        height=mini.SIZE,
        width=mini.SIZE,
        seed=0,
        progress=False,
    )
    locon = LoRA(_conv_lora_file(pipe.unet, tmp_path / "locon.safetensors"), name="locon")
    with Composer(pipe, [*(LoRA(mini.lora_path(i), name=i) for i in ids), locon]) as composer:
        unfused = composer.generate(fuse_loras=False, **kwargs)
        fused = composer.generate(**kwargs)
        convs = [
            w
            for w in composer.adapters.wrappers()
            if isinstance(w.base, torch.nn.Conv2d) and w._fused_weight is not None
        ]
    assert convs
    a, b = (np.asarray(r.images[0], dtype=np.float32) for r in (unfused, fused))
    assert np.abs(a - b).max() <= 1.0

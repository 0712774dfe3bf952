"""LoRAtorio-style composition: per-patch SoftMin weights on hand-made predictions, plans with
and without caching, and generation on the tiny pipelines."""

import pytest
import torch

from cmlora import LoRA, compose
from cmlora.errors import OptionError
from cmlora.methods import Composition, build_method
from cmlora.patch_mix import PatchMix, patch_cosine, patch_weights


def comp(names, steps=6, weights=None):
    return Composition(
        names=tuple(names),
        weights={n: (weights or {}).get(n, 1.0) for n in names},
        categories={n: None for n in names},
        num_steps=steps,
    )


def _field(values_per_patch):
    """A (1, 2, 4, 4) prediction whose 2x2 patches are constant vectors given per patch."""
    out = torch.zeros(1, 2, 4, 4)
    for (i, j), vec in values_per_patch.items():
        out[0, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = torch.tensor(vec).view(2, 1, 1)
    return out


BASE = _field({(0, 0): [1.0, 0.0], (0, 1): [1.0, 0.0], (1, 0): [1.0, 0.0], (1, 1): [1.0, 0.0]})


def test_patch_cosine_per_window():
    pred = _field({(0, 0): [1.0, 0.0], (0, 1): [0.0, 1.0], (1, 0): [-1.0, 0.0], (1, 1): [1.0, 1.0]})
    cos = patch_cosine(pred, BASE, 2)
    assert cos.shape == (1, 1, 2, 2)
    assert torch.allclose(cos[0, 0], torch.tensor([[1.0, 0.0], [-1.0, 2**-0.5]]))


def test_a_patch_where_one_lora_departs_goes_to_that_lora():
    same = BASE.clone()
    departs = _field({(0, 0): [1.0, 0.0], (0, 1): [0.0, 1.0], (1, 0): [1.0, 0.0], (1, 1): [1.0, 0.0]})
    w = patch_weights([same, departs], BASE, 2, temperature=0.01, priors=[1.0, 1.0])
    assert w.shape == (2, 1, 1, 4, 4)
    # patch (0, 1): only the second LoRA departs from the base -> it takes the patch
    assert torch.allclose(w[1, 0, 0, 0:2, 2:4], torch.ones(2, 2), atol=1e-6)
    # elsewhere both equal the base: equal weights
    assert torch.allclose(w[:, 0, 0, 0:2, 0:2], torch.full((2, 2, 2), 0.5))
    mix = PatchMix(patch=2, temperature=0.01)
    guided, means = mix.guided([BASE, same, departs], [0.0, 1.0, 1.0], None)
    assert torch.allclose(guided[..., 0:2, 2:4], departs[..., 0:2, 2:4], atol=1e-5)
    assert means[2] > means[1]


def test_equal_departures_give_equal_weights_and_priors_act():
    a = _field({p: [0.0, 1.0] for p in [(0, 0), (0, 1), (1, 0), (1, 1)]})
    b = _field({p: [0.0, 2.0] for p in [(0, 0), (0, 1), (1, 0), (1, 1)]})  # same direction: same cosine
    w = patch_weights([a, b], BASE, 2, temperature=0.05, priors=[1.0, 1.0])
    assert torch.allclose(w, torch.full_like(w, 0.5))
    w = patch_weights([a, b], BASE, 2, temperature=0.05, priors=[3.0, 1.0])
    assert torch.allclose(w[0], torch.full_like(w[0], 0.75))


def test_temperature_limits():
    a = _field({p: [1.0, 0.2] for p in [(0, 0), (0, 1), (1, 0), (1, 1)]})  # closer to the base
    b = _field({p: [1.0, 1.0] for p in [(0, 0), (0, 1), (1, 0), (1, 1)]})  # departs more
    cold = patch_weights([a, b], BASE, 2, temperature=1e-6, priors=[1.0, 1.0])
    assert torch.equal(cold[1], torch.ones_like(cold[1])) and torch.equal(cold[0], torch.zeros_like(cold[0]))
    hot = patch_weights([a, b], BASE, 2, temperature=1e6, priors=[2.0, 1.0])
    assert torch.allclose(hot[0], torch.full_like(hot[0], 2 / 3), atol=1e-5)  # the prior average


def test_one_lora_is_its_prediction_guided_against_the_base_uncond():
    torch.manual_seed(0)
    base, lora = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)  # CFG batches [uncond; cond]
    guided, _ = PatchMix(patch=2).guided([base, lora], [0.0, 1.0], 5.0)
    assert torch.allclose(guided, base[:1] + 5.0 * (lora[1:] - base[:1]))
    mixed, _ = PatchMix(patch=2, uncond="mixed").guided([base, lora], [0.0, 1.0], 5.0)
    assert torch.allclose(mixed, lora[:1] + 5.0 * (lora[1:] - lora[:1]))


def test_patch_not_dividing_the_latent():
    torch.manual_seed(1)
    base, a, b = (torch.randn(1, 4, 5, 7) for _ in range(3))
    w = patch_weights([a, b], base, 3, 0.1, [1.0, 1.0])
    assert w.shape == (2, 1, 1, 5, 7) and torch.allclose(w.sum(0), torch.ones(1, 1, 5, 7))


def test_plans_without_and_with_cache():
    m = build_method("loratorio", comp(["a", "b"], 6))
    plans = m.plans()
    assert all([c.adapters for c in p.calls] == [(), (("a", 1.0),), (("b", 1.0),)] for p in plans)
    assert all(
        p.calls[0].embedding == "none" and p.mix is m.mix and p.weights == (0.0, 1.0, 1.0) for p in plans
    )
    assert all(c.mode == "plain" for p in plans for c in p.calls)
    assert m.embedding_keys() == ["none", "all"]
    cached = build_method("loratorio", comp(["a", "b"], 7), cache_interval=3).plans()
    assert [list(p.full) for p in cached] == [
        ["base", "a", "b"],
        ["a"],
        ["b"],
        ["base"],
        ["a"],
        ["b"],
        ["base"],
    ]
    assert sum(len(p.full) for p in cached) == 3 + 6 and sum(len(p.cached) for p in cached) == 3 * 7 - 9


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"patch": 0}, "patch"),
        ({"uncond": "other"}, "uncond"),
        ({"cache_interval": 0}, "cache_interval"),
    ],
)
def test_option_errors(options, fragment):
    with pytest.raises(OptionError, match=fragment):
        build_method("loratorio", comp(["a", "b"]), **options)


@pytest.fixture(scope="module")
def sdxl_loras(sdxl, tmp_path_factory):
    from cmlora.tiny import write_random_lora

    folder = tmp_path_factory.mktemp("xl_loras")
    return [write_random_lora(sdxl, folder / f"xl{k}.safetensors", seed=k, rank=2) for k in range(2)]


def test_generates_on_tiny_sd15_and_sdxl_with_counts_matching_the_plan(sd15, sd15_loras, sdxl, sdxl_loras):
    for pipe, files in ((sd15, sd15_loras), (sdxl, sdxl_loras)):
        loras = [LoRA(f) for f in files[:2]]
        kwargs = dict(prompt="girl", num_inference_steps=4, guidance_scale=5.0, seed=3, progress=False)
        size = dict(height=16, width=16) if pipe is sd15 else dict(height=32, width=32)
        plain = compose(pipe, loras, method="loratorio", **kwargs, **size)
        rec = plain.records[0]
        assert rec["full_calls"] == 3 * 4 and rec["cached_calls"] == 0
        assert rec["options"]["patch"] == 2 and rec["options"]["uncond"] == "base"
        assert set(rec["trace"][0]["patch_weights"]) == {lo.adapter for lo in loras}
        assert sum(rec["trace"][0]["patch_weights"].values()) == pytest.approx(1.0)
        cached = compose(pipe, loras, method="loratorio", cache_interval=2, **kwargs, **size)
        # refreshes every 2 steps, offsets 0, 1, 2: base {0, 2}, first LoRA {0, 1, 3}, second {0, 2}
        assert (cached.records[0]["full_calls"], cached.records[0]["cached_calls"]) == (7, 12 - 7)
        sequential = compose(pipe, loras, method="loratorio", batch_calls=False, **kwargs, **size)
        a = torch.tensor(list(plain.images[0].getdata()), dtype=torch.float32)
        b = torch.tensor(list(sequential.images[0].getdata()), dtype=torch.float32)
        assert (a - b).abs().max() <= 1  # batched and one-by-one calls: the same image within 1 level
        base = compose(pipe, loras, method="none", **kwargs, **size)
        assert list(plain.images[0].getdata()) != list(base.images[0].getdata())

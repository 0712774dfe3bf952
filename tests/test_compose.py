"""compose() against independent computations, determinism, and the pipeline left as found."""

import copy

import numpy as np
import pytest
import torch
from conftest import assert_same_state, pipeline_state

from cmlora import LoRA, compose
from cmlora.api import Composer
from cmlora.errors import OptionError
from cmlora.loras import read_lora_file, resolve
from cmlora.macs import MacCounter
from cmlora.methods import build_method
from cmlora.request import GenerationRequest
from cmlora.sampler import Denoiser, denoise, encode_prompt
from cmlora.unet_cache import CachePoint, UNetSplit


def merged_copy(pipe, files_and_strengths):
    """A deep copy of the pipeline with W += strength * scale * up @ down written into the weights:
    an independent way to apply LoRAs (no wrappers, no router)."""
    clone = copy.deepcopy(pipe)
    for path, strength in files_and_strengths:
        lora_file = read_lora_file(path)
        for item in resolve(lora_file, clone):
            module = getattr(clone, item.component).get_submodule(item.module_name)
            w = item.weights
            delta = (w.up.reshape(w.up.shape[0], -1) @ w.down.reshape(w.rank, -1)) * (strength * w.scale)
            module.weight.data += delta.reshape(module.weight.shape)
    return clone


class RecordingScheduler:
    """One step; records the mixed, guided noise prediction the loop hands to the scheduler."""

    def __init__(self, t: int = 700):
        self.timesteps = torch.tensor([t])
        self.outputs = []

    def scale_model_input(self, x, t):
        return x

    def step(self, output, t, latents, return_dict=False):
        self.outputs.append(output)
        return (latents,)


def mixed_prediction(pipe, paths, method, variant=None, guidance=6.0, **options):
    with Composer(pipe, [LoRA(p) for p in paths]) as composer:
        comp = GenerationRequest(composer.loras, steps=1, lora_scale=1.0).composition()
        m = build_method(method, comp, variant, **options)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            conds = composer._encode(m, "red hair girl", "low quality", guidance > 1, 16, 16)
            scheduler = RecordingScheduler()
            denoise(
                Denoiser(pipe, composer.adapters, m, conds, guidance, MacCounter(pipe.unet)),
                latents,
                scheduler,
            )
    return latents, scheduler.outputs[0]


def direct_eps(pipe, latents, guidance, cfg=True):
    with torch.no_grad():
        cond = encode_prompt(pipe, "red hair girl", "low quality", cfg, 16, 16)
        x = torch.cat([latents, latents]) if cfg else latents
        return pipe.unet(x, torch.tensor(700), encoder_hidden_states=cond.embeds).sample


def test_merge_equals_all_deltas_in_the_weights(sd15, sd15_loras):
    latents, got = mixed_prediction(sd15, sd15_loras[:2], "merge")
    ref = direct_eps(merged_copy(sd15, [(p, 1.0) for p in sd15_loras[:2]]), latents, 6.0)
    u, c = ref.chunk(2)
    torch.testing.assert_close(got, u + 6.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_composite_is_guidance_on_mean_of_single_lora_predictions(sd15, sd15_loras):
    latents, got = mixed_prediction(sd15, sd15_loras, "composite")
    # published text-encoder policy: the prompt is encoded once with all LoRAs in the text encoder
    all_te = merged_copy(sd15, [(p, 1.0) for p in sd15_loras])
    with torch.no_grad():
        cond = encode_prompt(all_te, "red hair girl", "low quality", True, 16, 16)
    preds = []
    for path in sd15_loras:
        single = merged_copy(sd15, [(path, 1.0)])
        with torch.no_grad():
            preds.append(single.unet(torch.cat([latents] * 2), torch.tensor(700), cond.embeds).sample)
    mean = sum(preds) / 3
    u, c = mean.chunk(2)
    torch.testing.assert_close(got, u + 6.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_composite_without_cfg(sd15, sd15_loras):
    latents, got = mixed_prediction(sd15, sd15_loras[:2], "composite", guidance=1.0)
    assert got.shape == latents.shape
    latents2, got2 = mixed_prediction(sd15, sd15_loras[:2], "composite", guidance=0.5)
    torch.testing.assert_close(got, got2)  # s <= 1: no CFG batch, guidance not applied


def test_lora_changes_output_by_predicted_delta_and_text_encoder_lands(sd15, sd15_loras):
    """Every key of a kohya file lands: wrapped model == weights with the delta merged in."""
    _, got = mixed_prediction(sd15, sd15_loras[:1], "switch", tau=1)
    latents, _ = mixed_prediction(sd15, sd15_loras[:1], "none")
    ref = direct_eps(merged_copy(sd15, [(sd15_loras[0], 1.0)]), latents, 6.0)
    u, c = ref.chunk(2)
    torch.testing.assert_close(got, u + 6.0 * (c - u), rtol=1e-4, atol=1e-5)
    base = direct_eps(sd15, latents, 6.0)
    assert (ref - base).abs().max() > 1e-3  # the LoRA does change the output


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_split_full_equals_unet_and_cached_is_bit_exact(request, which, block, size):
    pipe = request.getfixturevalue(which)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *size, generator=g)
    ehs = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    added = None
    if which == "sdxl":
        added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    split = UNetSplit(unet, CachePoint(0, block))
    with torch.no_grad():
        ref = unet(x, torch.tensor(400), ehs, added_cond_kwargs=added).sample
        full, entry = split(x, torch.tensor(400), ehs, added)
        cached, _ = split(x, torch.tensor(400), ehs, added, entry=entry)
    assert torch.equal(full, ref)
    assert torch.equal(cached, full)


def test_cache_point_out_of_range(sd15):
    from cmlora.errors import OptionError

    with pytest.raises(OptionError, match="cache_block"):
        UNetSplit(sd15.unet, CachePoint(0, 2))
    with pytest.raises(OptionError, match="cache_layer"):
        UNetSplit(sd15.unet, CachePoint(5, 0))


def test_counts_match_plan_and_records(sd15, sd15_loras):
    loras = [LoRA(sd15_loras[0], category="character"), LoRA(sd15_loras[1], category="background")]
    r = compose(
        sd15,
        loras,
        method="cmlora",
        variant="reference",
        prompt="girl",
        num_inference_steps=7,
        guidance_scale=5.0,
        height=16,
        width=16,
        seed=4,
        progress=False,
        cache_interval=3,
    )
    rec = r.records[0]
    assert rec["full_calls"] == 2 + (7 - 1) // 3 and rec["cached_calls"] == 2 * 7 - rec["full_calls"]
    # the published schedule with a background: only the high-frequency LoRA refreshes after step 0
    assert [s["full"] for s in rec["trace"]] == [
        [loras[0].adapter, loras[1].adapter],
        [],
        [],
        [loras[0].adapter],
        [],
        [],
        [loras[0].adapter],
    ]
    assert rec["macs"] > 0 and rec["seconds"] > 0
    assert rec["loras"][0]["sha256"] and rec["options"]["cache_interval"] == 3
    assert rec["method_label"] == "cmlora-reference"
    composite = compose(
        sd15,
        loras,
        method="composite",
        prompt="girl",
        num_inference_steps=7,
        guidance_scale=5.0,
        height=16,
        width=16,
        seed=4,
        progress=False,
    ).records[0]
    assert composite["full_calls"] == 14 and composite["cached_calls"] == 0
    # a cached call costs less than a full one
    assert rec["macs"] < composite["macs"]


def _image(pipe, paths, method, variant=None, seed=0, **kw):
    r = compose(
        pipe,
        [LoRA(p) for p in paths],
        method=method,
        variant=variant,
        prompt="red hair",
        num_inference_steps=4,
        guidance_scale=5.0,
        height=16,
        width=16,
        seed=seed,
        progress=False,
        **kw,
    )
    return np.asarray(r.images[0])


def test_same_seed_same_image_whatever_ran_before_and_state_restored(sd15, sd15_loras):
    before = pipeline_state(sd15)
    a1 = _image(sd15, sd15_loras[:2], "cmlora", "offline", seed=7)
    _image(sd15, sd15_loras[1:], "merge", seed=8)
    _image(sd15, sd15_loras, "composite", seed=9, lora_scale=0.7)
    a2 = _image(sd15, sd15_loras[:2], "cmlora", "offline", seed=7)
    assert np.array_equal(a1, a2)
    assert not np.array_equal(a1, _image(sd15, sd15_loras[:2], "cmlora", "offline", seed=8))
    assert_same_state(before, pipeline_state(sd15))


@pytest.mark.parametrize(
    "method,variant",
    [
        ("none", None),
        ("merge", None),
        ("switch", None),
        ("composite", None),
        ("cmlora", "offline"),
        ("cmlora", "online"),
        ("cmlora", "async"),
        ("cmlora", "reference"),
    ],
)
def test_sdxl_every_method_runs(sdxl, tmp_path, method, variant):
    from cmlora.tiny import write_random_lora

    paths = [write_random_lora(sdxl, tmp_path / f"x{k}.safetensors", seed=k) for k in range(2)]
    before = pipeline_state(sdxl)
    img = _image(sdxl, paths, method, variant)
    assert img.shape == (16, 16, 3)
    assert_same_state(before, pipeline_state(sdxl))


def test_per_lora_text_encoder_policy_encodes_each(sd15, sd15_loras):
    r = compose(
        sd15,
        [LoRA(p) for p in sd15_loras[:2]],
        method="composite",
        prompt="red",
        text_encoder="per_lora",
        num_inference_steps=2,
        guidance_scale=3.0,
        height=16,
        width=16,
        progress=False,
    )
    assert r.records[0]["options"]["text_encoder"] == "per_lora"
    with Composer(sd15, [LoRA(p) for p in sd15_loras[:2]]) as c:
        m = build_method(
            "composite",
            GenerationRequest(c.loras, steps=2, lora_scale=1.0).composition(),
            text_encoder="per_lora",
        )
        with torch.no_grad():
            conds = c._encode(m, "red", None, True, 16, 16)
    names = [LoRA(p).adapter for p in sd15_loras[:2]]
    assert set(conds) == set(names)
    assert not torch.equal(conds[names[0]].embeds, conds[names[1]].embeds)


def test_research_trace(sd15, sd15_loras):
    r = compose(
        sd15,
        [LoRA(p) for p in sd15_loras[:2]],
        method="cmlora",
        prompt="red",
        research=True,
        num_inference_steps=5,
        guidance_scale=3.0,
        height=16,
        width=16,
        progress=False,
        cache_interval=2,
    )
    trace = r.records[0]["trace"]
    assert all(np.isfinite(s["high_frequency"]) for s in trace)
    assert trace[0]["cache_similarity"] == {}
    later = [s for s in trace[1:] if s["full"]]
    assert later and all(-1.0 <= v <= 1.0 for s in later for v in s["cache_similarity"].values())


@pytest.mark.parametrize(
    "method,variant,options",
    [
        ("composite", None, {}),
        ("cmlora", "offline", {"cache_interval": 2}),
        ("cmlora", "reference", {"cache_interval": 3}),
        ("composite", None, {"text_encoder": "per_lora"}),
    ],
)
def test_batched_equals_sequential(sd15, sdxl, sd15_loras, method, variant, options):
    for pipe, paths in ((sd15, sd15_loras),):
        kwargs = dict(
            method=method,
            variant=variant,
            prompt="red hair",
            num_inference_steps=4,
            guidance_scale=5.0,
            height=16,
            width=16,
            seed=2,
            progress=False,
            **options,
        )
        seq = compose(pipe, [LoRA(p) for p in paths], batch_calls=False, **kwargs)
        bat = compose(pipe, [LoRA(p) for p in paths], batch_calls=True, **kwargs)
        a = np.asarray(seq.images[0], dtype=np.float32)
        b = np.asarray(bat.images[0], dtype=np.float32)
        assert np.abs(a - b).max() <= 1.0  # 8-bit images: at most one level apart
        r_seq, r_bat = seq.records[0], bat.records[0]
        assert (r_seq["full_calls"], r_seq["cached_calls"]) == (r_bat["full_calls"], r_bat["cached_calls"])
        assert r_bat["unet_invocations"] < r_seq["unet_invocations"]
        assert r_seq["macs"] == r_bat["macs"]


def test_batched_prediction_matches_sequential_to_1e5(sd15, sd15_loras):
    import cmlora.sampler as sampler

    outs = {}
    for batch in (False, True):
        with Composer(sd15, [LoRA(p) for p in sd15_loras]) as composer:
            m = build_method(
                "cmlora",
                GenerationRequest(composer.loras, steps=3, lora_scale=1.0).composition(),
                "offline",
                cache_interval=2,
            )
            latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
            scheduler = RecordingScheduler()
            scheduler.timesteps = torch.tensor([900, 600, 300])
            with torch.no_grad():
                conds = composer._encode(m, "red", "low", True, 16, 16)
                denoiser = sampler.Denoiser(
                    sd15, composer.adapters, m, conds, 5.0, MacCounter(sd15.unet), batch=batch
                )
                sampler.denoise(denoiser, latents, scheduler)
        outs[batch] = scheduler.outputs
    for a, b in zip(outs[False], outs[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "which, method, variant, guidance",
    [
        ("sd15", "merge", None, 5.0),
        ("sd15", "cmlora", "offline", 5.0),
        ("sd15", "composite", None, 1.0),  # no CFG: the conditioning is repeated, not interleaved
        ("sdxl", "cmlora", "reference", 5.0),  # SDXL's added text_embeds / time_ids repeated too
    ],
)
def test_seed_batch_equals_one_image_per_loop(request, tmp_path, which, method, variant, guidance):
    pipe = request.getfixturevalue(which)
    paths = request.getfixturevalue("sd15_loras") if which == "sd15" else _sdxl_loras(pipe, tmp_path)
    kwargs = dict(
        method=method,
        variant=variant,
        prompt="red hair",
        num_inference_steps=4,
        guidance_scale=guidance,
        height=16,
        width=16,
        seed=[7, 3, 11],
        progress=False,
    )
    with Composer(pipe, [LoRA(p) for p in paths]) as composer:
        alone = composer.generate(**kwargs)
        together = composer.generate(**kwargs, batch_size=2)  # a batch of 2, then 1
    assert [r["seed"] for r in together.records] == [7, 3, 11]
    assert [r["batch_size"] for r in together.records] == [2, 2, 1]
    assert [r["batch_size"] for r in alone.records] == [1, 1, 1]
    for a, b, ra, rb in zip(alone.images, together.images, alone.records, together.records, strict=True):
        diff = np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32))
        assert diff.max() <= 1.0  # 8-bit images: at most one level apart
        assert (ra["full_calls"], ra["cached_calls"], ra["macs"]) == (
            rb["full_calls"],
            rb["cached_calls"],
            rb["macs"],
        )
        assert ra["trace"] == rb["trace"]
    assert len({np.asarray(im).tobytes() for im in together.images}) == 3  # each seed its own image


def _sdxl_loras(pipe, folder):
    from cmlora.tiny import write_random_lora

    return [write_random_lora(pipe, folder / f"x{k}.safetensors", seed=k) for k in range(2)]


def test_seed_batch_keeps_one_image_per_loop_where_the_plan_reads_the_latents(sd15, sd15_loras):
    kwargs = dict(prompt="red", num_inference_steps=3, height=16, width=16, seed=[1, 2], progress=False)
    with Composer(sd15, [LoRA(p) for p in sd15_loras]) as composer:
        online = composer.generate(method="cmlora", variant="online", batch_size=2, **kwargs)
        research = composer.generate(method="merge", research=True, batch_size=2, **kwargs)
        with pytest.raises(OptionError, match="batch_size must be an integer >= 1, got 0"):
            composer.generate(method="merge", batch_size=0, **kwargs)
    assert [r["batch_size"] for r in online.records + research.records] == [1, 1, 1, 1]


def test_each_unet_call_is_timed_between_device_barriers(sd15, sd15_loras, monkeypatch):
    """On CUDA the barriers make unet_seconds the GPU's work, not its launch time (no GPU in CI: the
    barrier is recorded here, and its CUDA branch is checked with a stand-in tensor)."""
    import types

    import cmlora.sampler as sampler

    events = []
    monkeypatch.setattr(sampler, "_wait_for_device", lambda x: events.append("barrier"))
    hook = sd15.unet.register_forward_hook(lambda *a: events.append("unet"))
    try:
        rec = compose(
            sd15,
            [LoRA(p) for p in sd15_loras[:2]],
            method="composite",
            prompt="girl",
            num_inference_steps=3,
            height=16,
            width=16,
            progress=False,
            batch_calls=False,
        ).records[0]
    finally:
        hook.remove()
    assert rec["unet_invocations"] == 6 and events == ["barrier", "unet", "barrier"] * 6
    monkeypatch.undo()

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    sampler._wait_for_device(torch.zeros(1))
    sampler._wait_for_device(types.SimpleNamespace(is_cuda=True, device="cuda:1"))
    assert synced == ["cuda:1"]

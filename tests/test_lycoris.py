"""LyCORIS files (LoCon, LoHa, LoKr, DoRA) against lycoris-lora itself, in every method.

The oracle: a network made by ``lycoris-lora`` on a copy of the tiny pipeline (every Linear and
Conv2d, random factors), saved in the kohya/LyCORIS layout; cmlora loads the file, and one UNet
(or text encoder) call with the adapter active must equal the call with lycoris-lora's own merged
weights (``merge_to``), fp32, ``torch.allclose(rtol=1e-4, atol=1e-5)``.

lycoris-lora 4.1.3's ``merge_to`` scales LoHa and LoKr deltas by (alpha / rank) twice (its
``get_diff_weight`` multiplies ``get_weight``'s already-scaled delta by the scale again), while its
``forward`` (what training optimised) and ComfyUI scale once: the merge oracle therefore uses
alpha = rank (scale 1), and a second oracle with alpha != rank compares against lycoris-lora's
own forward with the network applied.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import assert_same_state, pipeline_state
from lycoris import LycorisNetwork, create_lycoris
from safetensors.torch import save_file

from cmlora import LoRA, LoRAFileError
from cmlora.adapters import LoRAWrapped
from cmlora.api import Composer
from cmlora.deltas import DenseDelta, LowRankDelta
from cmlora.lora_resolution import resolve
from cmlora.loras import read_lora_file

RTOL, ATOL = 1e-4, 1e-5

ALGOS = {
    "locon": dict(algo="locon"),
    "locon-tucker": dict(algo="locon", use_tucker=True),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-both": dict(algo="lokr", decompose_both=True),
    "lokr-tucker": dict(algo="lokr", use_tucker=True, factor=8),
    "dora": dict(algo="locon", dora_wd=True),
    "loha-dora": dict(algo="loha", dora_wd=True),
    "lokr-dora": dict(algo="lokr", factor=4, dora_wd=True),
    "dora-on-input": dict(algo="locon", dora_wd=True, wd_on_output=False),
}
PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def lycoris_network(model, prefix: str, spec: dict, rank: int, alpha: float, seed: int):
    """A lycoris-lora network on every Linear and Conv2d of ``model`` with random factors (its
    initialisation zeroes one half, which would make every delta zero)."""
    LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"], "lora_prefix": prefix})
    options = {k: v for k, v in spec.items() if k != "algo"}
    network = create_lycoris(
        model, 1.0, linear_dim=rank, linear_alpha=alpha, conv_dim=rank, conv_alpha=alpha,
        algo=spec["algo"], **options,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            for name, param in module.named_parameters():
                noise = torch.randn(param.shape, generator=g)
                if name == "dora_scale":  # magnitudes near the weight's own norms
                    param.mul_(1 + 0.2 * noise)
                else:
                    param.copy_(0.3 * noise)
    return network


def network_state(network):
    network.apply_to()  # registers the modules, so state_dict holds them
    state = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    network.restore()
    return state


def lycoris_file(pipe, path, spec, components=("unet",), rank=2, alpha=None, seed=0):
    """Write a lycoris-lora file for ``pipe``; returns a copy of ``pipe`` with lycoris-lora's merged
    weights and the copy with the networks applied (lycoris' forward), as oracles."""
    merged, applied = copy.deepcopy(pipe), copy.deepcopy(pipe)
    state = {}
    for k, component in enumerate(components):
        prefix = (
            PREFIX[component]
            if component != "text_encoder" or not hasattr(pipe, "text_encoder_2")
            else "lora_te1"
        )
        a = float(rank if alpha is None else alpha)
        for copy_ in (merged, applied):
            network = lycoris_network(getattr(copy_, component), prefix, spec, rank, a, seed + k)
            if copy_ is merged:
                state |= network_state(network)
                network.merge_to(1.0)
            else:
                network.apply_to()
    save_file(state, str(path))
    return merged, applied


def unet_call(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor(500), ehs, added_cond_kwargs=added).sample


def cmlora_unet_call(pipe, path, strength=1.0, seed=0):
    with Composer(pipe, [LoRA(path, name="l")]) as composer:
        composer.adapters.unet.set((("l", strength),))
        return unet_call(pipe, seed)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_unet_call_equals_lycoris_merged_weights(sd15, tmp_path, algo):
    path = tmp_path / f"{algo}.safetensors"
    merged, _ = lycoris_file(sd15, path, ALGOS[algo])
    before = pipeline_state(sd15)
    got = cmlora_unet_call(sd15, path)
    want = unet_call(merged)
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), (got - want).abs().max()
    assert not torch.allclose(got, unet_call(sd15), rtol=1e-2, atol=1e-3)  # the adapter did something
    assert_same_state(before, pipeline_state(sd15))


@pytest.mark.parametrize("algo", ["loha", "lokr-both", "lokr-tucker", "loha-tucker"])
def test_alpha_scales_once_as_lycoris_forward_does(sd15, tmp_path, algo):
    """alpha != rank: cmlora equals lycoris-lora's forward (the trained function), scale once."""
    path = tmp_path / f"{algo}.safetensors"
    _, applied = lycoris_file(sd15, path, ALGOS[algo], rank=2, alpha=0.5)
    weights = [m for m in read_lora_file(path).modules if m.kind != "lora"]
    assert weights and all(m.scale == 0.25 for m in weights if m.rank is not None)
    got = cmlora_unet_call(sd15, path)
    assert torch.allclose(got, unet_call(applied), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("which, algo", [("sd15", "loha"), ("sdxl", "lokr"), ("sdxl", "dora")])
def test_text_encoders_and_sdxl_equal_lycoris_merged_weights(request, tmp_path, which, algo):
    pipe = request.getfixturevalue(which)
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if which == "sdxl" else [])
    path = tmp_path / f"{which}-{algo}.safetensors"
    merged, _ = lycoris_file(pipe, path, ALGOS[algo], components=components, seed=3)
    lora_file = read_lora_file(path)
    assert lora_file.components == set(components)
    assert len(resolve(lora_file, pipe)) == len(lora_file.modules)  # every key lands
    tokens = torch.tensor([[0, 5, 9, 14, 1]])
    with Composer(pipe, [LoRA(path, name="l")]) as composer, torch.no_grad():
        composer.adapters.unet.set((("l", 1.0),))
        got = unet_call(pipe)
        with composer.adapters.text_active((("l", 1.0),)):
            text = [getattr(pipe, c)(tokens)[0] for c in components[1:]]
    assert torch.allclose(got, unet_call(merged), rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        for component, out in zip(components[1:], text, strict=True):
            want = getattr(merged, component)(tokens)[0]
            assert torch.allclose(out, want, rtol=RTOL, atol=ATOL), component
            assert not torch.allclose(out, getattr(pipe, component)(tokens)[0], atol=1e-3)


def test_each_layer_holds_the_smaller_form(sd15, tmp_path):
    """LoHa/LoKr layers whose rank r1*r2 factor pair is smaller than the weight stay low-rank; the
    others are materialised; DoRA is always dense (it rescales the whole weight)."""
    forms = {}
    for algo in ("loha", "lokr", "dora"):
        path = tmp_path / f"{algo}.safetensors"
        lycoris_file(sd15, path, ALGOS[algo], rank=2)
        with Composer(sd15, [LoRA(path, name="l")]) as composer:
            forms[algo] = [
                (w.base.weight.shape, w.deltas["l"]) for w in composer.adapters.wrappers() if "l" in w.deltas
            ]
    for algo, layers in forms.items():
        for shape, delta in layers:
            numel = shape.numel()
            if isinstance(delta, LowRankDelta):
                assert algo != "dora" and delta.down.numel() + delta.up.numel() < numel
            else:
                assert isinstance(delta, DenseDelta) and delta.weight.shape == shape
        kinds = {type(d) for _, d in layers}
        assert kinds == ({DenseDelta} if algo == "dora" else {LowRankDelta, DenseDelta}), algo


# --------------------------------------------------------------------------- DoRA semantics


def with_dense_deltas(pipe, paths_and_strengths):
    """A copy of ``pipe`` with W += s * D written into the UNet weights, D each file's delta as
    cmlora materialised it (which the oracle tests above check against lycoris-lora at s = 1)."""
    reference = copy.deepcopy(pipe)
    for path, strength in paths_and_strengths:
        with Composer(pipe, [LoRA(path, name="one")]) as composer:
            names = {id(m): n for n, m in pipe.unet.named_modules()}
            for wrapper in composer.adapters.wrappers():
                if wrapper.router is composer.adapters.unet:
                    target = reference.unet.get_submodule(names[id(wrapper)])
                    target.weight.data += strength * wrapper.deltas["one"].weight
    return reference


def test_dora_strength_and_merge_of_several(sd15, tmp_path):
    """One DoRA file at strength s: W + s * D, D = W_dora - W (s = 1: lycoris' merged weight,
    checked above). Merge of several DoRA files: each D_i against the base weight, summed, in any
    order, fused or not: W + sum s_i D_i."""
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"d{k}.safetensors")
        lycoris_file(sd15, paths[-1], ALGOS["dora"], seed=10 + k)
    half = cmlora_unet_call(sd15, paths[0], strength=0.5)
    torch.testing.assert_close(
        half, unet_call(with_dense_deltas(sd15, [(paths[0], 0.5)])), rtol=RTOL, atol=ATOL
    )
    with Composer(sd15, [LoRA(p) for p in paths]) as composer:
        names = [lora.adapter for lora in composer.loras]
        both = {}
        for fuse in (False, True):
            for order in (names, names[::-1]):
                composer.adapters.unet.set(
                    tuple((n, s) for n, s in zip(order, (1.0, 0.7), strict=True)), fuse=fuse
                )
                both[fuse, tuple(order)] = unet_call(sd15)
        composer.adapters.unet.clear()
    for order in (names, names[::-1]):
        strengths = dict(zip(order, (1.0, 0.7), strict=True))
        want = unet_call(
            with_dense_deltas(sd15, [(p, strengths[n]) for p, n in zip(paths, names, strict=True)])
        )
        for fuse in (False, True):
            torch.testing.assert_close(both[fuse, tuple(order)], want, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- every method


METHOD_RUNS = [
    ("merge", None, {"fuse_loras": False}),
    ("merge", None, {"fuse_loras": True}),
    ("switch", None, {"tau": 1}),
    ("composite", None, {"batch_calls": False}),
    ("composite", None, {"batch_calls": True}),
    ("cmlora", "offline", {"cache_interval": 2}),
]


def _generate(composer, method, variant, options, seed=1):
    return composer.generate(
        prompt="red hair girl",
        method=method,
        variant=variant,
        num_inference_steps=4,
        guidance_scale=5.0,
        height=16,
        width=16,
        seed=seed,
        progress=False,
        **options,
    )


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
@pytest.mark.parametrize("algo", ["locon-tucker", "loha", "lokr", "dora"])
def test_every_method_runs_each_kind(request, tmp_path, which, algo):
    """Two files of one kind (UNet and text encoders) in every method: the plan and the counts are
    those of two plain LoRAs, the images finite and not the base model's, the pipeline restored."""
    from cmlora.tiny import write_random_lora

    pipe = request.getfixturevalue(which)
    components = ("unet", "text_encoder")
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"{algo}{k}.safetensors")
        lycoris_file(pipe, paths[-1], ALGOS[algo], components=components, seed=20 + k)
    plain = [write_random_lora(pipe, tmp_path / f"plain{k}.safetensors", seed=k) for k in range(2)]
    before = pipeline_state(pipe)
    with Composer(pipe, [LoRA(p) for p in paths]) as composer:
        base = np.asarray(_generate(composer, "none", None, {}).images[0], dtype=np.float32)
        results = [_generate(composer, m, v, o) for m, v, o in METHOD_RUNS]
    with Composer(pipe, [LoRA(p) for p in plain]) as composer:
        plains = [_generate(composer, m, v, o) for m, v, o in METHOD_RUNS]
    for (method, _, options), got, ref in zip(METHOD_RUNS, results, plains, strict=True):
        record, plain_record = got.records[0], ref.records[0]
        for key in ("full_calls", "cached_calls", "unet_invocations"):
            assert record[key] == plain_record[key], (method, options, key)
        image = np.asarray(got.images[0], dtype=np.float32)
        assert np.isfinite(image).all() and np.abs(image - base).max() > 2, (method, options)
    # fused and un-fused merge, sequential and batched composite: the same image
    for a, b in ((0, 1), (3, 4)):
        diff = np.abs(
            np.asarray(results[a].images[0], np.float32) - np.asarray(results[b].images[0], np.float32)
        )
        assert diff.max() <= 1.0
    assert_same_state(before, pipeline_state(pipe))


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_stacked_selection_equals_eager_loop(sd15, sd15_loras, tmp_path, algo):
    """torch.compile's index-tensor selection over a mix of plain LoRAs and LyCORIS files (low-rank
    and dense layers, zero-padded ranks) equals the eager loop, batched and not."""
    from test_compile import predictions

    paths = [sd15_loras[0]]
    for k in range(2):
        paths.append(tmp_path / f"{algo}{k}.safetensors")
        lycoris_file(sd15, paths[-1], ALGOS[algo], seed=30 + k)
    for method, variant, options in (("composite", None, {}), ("cmlora", "offline", {"cache_interval": 2})):
        for batch in (False, True):
            eager = predictions(sd15, paths, method, variant, batch, stacked=False, **options)
            stacked = predictions(sd15, paths, method, variant, batch, stacked=True, **options)
            for a, b in zip(eager, stacked, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pipe_to_moves_dense_and_low_rank_deltas(tmp_path):
    from cmlora.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(seed=0)
    paths = [tmp_path / "h.safetensors", tmp_path / "d.safetensors"]
    lycoris_file(pipe, paths[0], ALGOS["loha"], seed=1)
    lycoris_file(pipe, paths[1], ALGOS["dora"], seed=2)
    for stacked in (False, True):
        with Composer(pipe, [LoRA(p) for p in paths]) as composer:
            if stacked:
                composer.adapters.stack()
            before = _generate(composer, "composite", None, {}).images[0]
            pipe.to(torch.float64)
            for wrapper in composer.adapters.wrappers():
                assert all(t.dtype == torch.float64 for t in wrapper.buffers() if t.is_floating_point())
                if stacked and wrapper.dense_stack is not None:
                    delta = next(d for d in wrapper.deltas.values() if isinstance(d, DenseDelta))
                    assert any(delta.weight.data_ptr() == s.data_ptr() for s in wrapper.dense_stack)
            _generate(composer, "merge", None, {})
            pipe.to(torch.float32)
            after = _generate(composer, "composite", None, {}).images[0]
        assert np.array_equal(np.asarray(before), np.asarray(after))
    assert not any(isinstance(m, LoRAWrapped) for m in pipe.unet.modules())


# --------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora", "locon-tucker"])
def test_macs_equal_an_independent_flop_count(sd15, tmp_path, algo):
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from cmlora.macs import MacCounter

    pipe = copy.deepcopy(sd15)
    pipe.unet.set_attn_processor(AttnProcessor())
    path = tmp_path / f"{algo}.safetensors"
    lycoris_file(pipe, path, ALGOS[algo])
    counts = {}
    with Composer(pipe, [LoRA(path, name="l")]) as composer, torch.no_grad():
        for fuse in (False, True):
            composer.adapters.unet.set((("l", 1.0),), fuse=fuse)
            unet_call(pipe)  # builds the fused weights outside the count
            with FlopCounterMode(display=False) as flops:
                _, counts[fuse] = MacCounter(pipe.unet).count("plain", lambda: unet_call(pipe))
            assert 2 * counts[fuse] == flops.get_total_flops(), fuse
        composer.adapters.unet.clear()
        _, base = MacCounter(pipe.unet).count("plain", lambda: unet_call(pipe))
    assert counts[True] == base < counts[False]


# --------------------------------------------------------------------------- malformed files


def _malformed(sd15, tmp_path):
    """(file, what the message says, the key it names) per malformation of a good LyCORIS file."""
    good = {}
    for algo in ("loha", "lokr", "dora", "locon-tucker"):
        path = tmp_path / f"good-{algo}.safetensors"
        lycoris_file(sd15, path, ALGOS[algo])
        from safetensors.torch import load_file

        good[algo] = load_file(str(path))

    loha, lokr, dora, tucker = good["loha"], good["lokr"], good["dora"], good["locon-tucker"]
    s = next(k[: -len(".hada_w1_a")] for k in sorted(loha) if k.endswith(".hada_w1_a"))
    k = next(
        k[: -len(".lokr_w1")]
        for k in sorted(lokr)
        if k.endswith(".lokr_w1") and k[: -len(".lokr_w1")] + ".lokr_w2_a" in lokr
    )
    d = next(k[: -len(".dora_scale")] for k in sorted(dora) if k.endswith(".dora_scale"))
    m = next(k[: -len(".lora_mid.weight")] for k in sorted(tucker) if k.endswith(".lora_mid.weight"))
    cases = {
        "loha_half": ({k_: v for k_, v in loha.items() if k_ != s + ".hada_w2_b"}, "without its hada_w2_b", s + ".hada_w2_a"),
        "loha_rank": ({**loha, s + ".hada_w1_b": loha[s + ".hada_w1_b"][:1]}, "ranks do not match", s + ".hada_w1_a"),
        "loha_unknown": ({**loha, s + ".hada_w3_a": torch.zeros(2)}, "unknown LyCORIS LoHa key", s + ".hada_w3_a"),
        "loha_t1_only": ({**loha, s + ".hada_t1": torch.zeros(2, 2, 3, 3)}, "needs both hada_t1 and hada_t2", s + ".hada_t1"),
        "lokr_kron": ({**lokr, k + ".lokr_w1": torch.zeros(3, 3)}, "Kronecker", k + ".lokr_w1"),
        "lokr_unknown": ({**lokr, k + ".lokr_t1": torch.zeros(2, 2)}, "unknown LyCORIS LoKr key", k + ".lokr_t1"),
        "lokr_both_forms": ({**lokr, k + ".lokr_w1_a": torch.zeros(2, 2)}, "both lokr_w1 and lokr_w1_a", k + ".lokr_w1_a"),
        "lokr_half": ({k_: v for k_, v in lokr.items() if k_ != k + ".lokr_w2_b"}, "without its lokr_w2_b", k + ".lokr_w2_a"),
        "dora_length": ({**dora, d + ".dora_scale": dora[d + ".dora_scale"][:-1]}, "dora_scale has shape", d + ".dora_scale"),
        "mid_chain": ({**tucker, m + ".lora_mid.weight": tucker[m + ".lora_mid.weight"][:1]}, "does not chain", m + ".lora_mid.weight"),
        "mixed": ({**loha, s + ".lokr_w1": torch.zeros(2, 2)}, "mixes LoHa and LoKr", s + ".lokr_w1"),
        "dotted_loha": ({"unet.x.hada_w1_a": torch.zeros(2, 2)}, "kohya layout only", "unet.x.hada_w1_a"),
        "oft": ({**loha, s + ".oft_blocks": torch.zeros(2, 2)}, "not supported", s + ".oft_blocks"),
        "dora_alone": ({**loha, "lora_unet_no_such.dora_scale": torch.ones(16, 1)}, "not part of any", "lora_unet_no_such.dora_scale"),
    }  # fmt: skip
    return cases


def test_malformed_lycoris_files_are_refused_naming_the_key(sd15, sd15_loras, tmp_path):
    cases = _malformed(sd15, tmp_path)
    before = pipeline_state(sd15)
    for name, (state, expected, key) in cases.items():
        path = tmp_path / f"bad-{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        with pytest.raises(LoRAFileError) as info:
            Composer(sd15, [LoRA(sd15_loras[0]), LoRA(path, name="bad")])
        message = str(info.value)
        assert expected in message and key in message and str(path) in message, (name, message)
    assert_same_state(before, pipeline_state(sd15))


def test_speed_benchmark_runs_five_lycoris_files(tmp_path):
    """``--kind lyco``: five LoHa/LoKr files in turn; the plan's calls are those of plain LoRAs."""
    from test_speed import run_speed

    methods = "diffusers-plain,merge,composite,peft-merge"
    result, printed = run_speed(
        tmp_path, "--n", "5", "--kind", "lyco", "--lyco-rank", "2", "--methods", methods
    )
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"diffusers-plain", "merge", "composite"}  # PEFT cannot load LoHa/LoKr files
    assert rows["composite"]["full_calls"] == 5 * 3 and rows["merge"]["full_calls"] == 3
    assert result["kind"] == "lyco" and "lyco files (LyCORIS) of rank 2" in printed

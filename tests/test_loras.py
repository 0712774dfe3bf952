"""LoRA files: every layout lands, every bad file is a clear error and leaves the pipeline unchanged."""

import json
import math
import struct

import numpy as np
import pytest
import torch
from conftest import assert_same_state, pipeline_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from cmlora import LoRA, LoRAFileError, OptionError, compose
from cmlora.api import Composer
from cmlora.lora_resolution import resolve
from cmlora.loras import check_safetensors_header, read_lora_file
from cmlora.tiny import random_lora_state_dict


def _img(pipe, paths, **kw):
    r = compose(
        pipe,
        [LoRA(p) for p in paths],
        method="merge" if paths else "none",
        prompt="red hair",
        num_inference_steps=2,
        guidance_scale=4.0,
        height=16,
        width=16,
        seed=1,
        progress=False,
        **kw,
    )
    return np.asarray(r.images[0])


def test_kohya_diffusers_and_peft_layouts_give_the_same_image(sd15, tmp_path):
    kohya = random_lora_state_dict(sd15, rank=3, seed=5, fmt="kohya", text_encoder=False)
    diffusers = random_lora_state_dict(sd15, rank=3, seed=5, fmt="diffusers", text_encoder=False)
    peft = random_lora_state_dict(sd15, rank=3, seed=5, fmt="peft")
    for name, sd in (("k", kohya), ("d", diffusers), ("p", peft)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    assert read_lora_file(tmp_path / "k.safetensors").format == "kohya"
    assert read_lora_file(tmp_path / "d.safetensors").format == "diffusers"
    images = [_img(sd15, [tmp_path / f"{n}.safetensors"]) for n in "kdp"]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    assert not np.array_equal(images[0], _img(sd15, []))


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_diffusers_layout_with_text_encoders_lands_like_kohya(request, which, tmp_path):
    """Text-encoder weights in the diffusers layout (text_encoder.*, text_encoder_2.*) land on the
    same layers as kohya's lora_te*_ keys: every pair resolves, and the images are identical."""
    pipe = request.getfixturevalue(which)
    paths = {}
    for fmt in ("kohya", "diffusers"):
        paths[fmt] = tmp_path / f"{fmt}.safetensors"
        save_file(random_lora_state_dict(pipe, rank=3, seed=5, fmt=fmt), str(paths[fmt]))
    dotted = read_lora_file(paths["diffusers"])
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if which == "sdxl" else set())
    assert dotted.components == expected
    assert len(resolve(dotted, pipe)) == len(dotted.modules) == len(read_lora_file(paths["kohya"]).modules)
    assert np.array_equal(_img(pipe, [paths["kohya"]]), _img(pipe, [paths["diffusers"]]))


def test_every_kohya_key_lands_including_text_encoder(sd15, sd15_loras):
    lora_file = read_lora_file(sd15_loras[0])
    resolved = resolve(lora_file, sd15)
    assert len(resolved) == len(lora_file.modules)
    assert {r.component for r in resolved} == {"unet", "text_encoder"}
    n_te = sum(1 for r in resolved if r.component == "text_encoder")
    assert n_te == 2 * 6  # two layers x q, k, v, out, fc1, fc2


def test_alpha_scales_the_delta(sd15, tmp_path):
    a = random_lora_state_dict(sd15, rank=2, seed=1, alpha=2.0, text_encoder=False)
    b = {k: (v * 2 if k.endswith("lora_up.weight") else v) for k, v in a.items()}
    b = {k: (torch.tensor(1.0) if k.endswith(".alpha") else v) for k, v in b.items()}  # 2x up, alpha/r 0.5
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    assert np.array_equal(_img(sd15, [tmp_path / "a.safetensors"]), _img(sd15, [tmp_path / "b.safetensors"]))


def test_sdxl_kohya_sgm_names_map_to_diffusers(sdxl, tmp_path):
    unet = sdxl.unet
    targets = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "output_blocks_0_1_transformer_blocks_1_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.1.ff.net.2",
        "output_blocks_3_0_in_layers_2": "up_blocks.1.resnets.0.conv1",
    }
    sd = {}
    for key, module_name in targets.items():
        module = unet.get_submodule(module_name)
        if isinstance(module, torch.nn.Conv2d):
            sd[f"lora_unet_{key}.lora_down.weight"] = torch.randn(2, module.in_channels, 3, 3)
            sd[f"lora_unet_{key}.lora_up.weight"] = torch.randn(module.out_channels, 2, 1, 1)
        else:
            sd[f"lora_unet_{key}.lora_down.weight"] = torch.randn(2, module.in_features)
            sd[f"lora_unet_{key}.lora_up.weight"] = torch.randn(module.out_features, 2)
    save_file(sd, str(tmp_path / "xl.safetensors"))
    resolved = resolve(read_lora_file(tmp_path / "xl.safetensors"), sdxl)
    assert sorted(r.module_name for r in resolved) == sorted(targets.values())


# --------------------------------------------------------------------------- bad files


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _bad_files(sd15, sdxl, tmp_path):
    """(bad files by case, the keys each case's message must name: the file's own keys at fault)."""
    good = random_lora_state_dict(sd15, rank=2, seed=0, text_encoder=False)
    key = next(k for k in good if k.endswith("lora_down.weight"))
    cases = {}

    def save(name, sd):
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        cases[name] = path

    save("sdxl_on_sd15", random_lora_state_dict(sdxl, rank=2, seed=0, text_encoder=False))
    save("lycoris", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)})
    save("nan", {**good, key: torch.full_like(good[key], float("nan"))})
    save("inf", {**good, key: torch.full_like(good[key], float("-inf"))})
    save("rank_mismatch", {**good, key: good[key][:1]})
    save("unknown_key", {**good, "something_else.weight": torch.zeros(2)})
    save(
        "unmatched",
        {
            **good,
            "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2),
        },
    )
    save("int_dtype", {**good, key: torch.zeros_like(good[key], dtype=torch.int32)})
    save("empty", {})
    # the same layer twice, spelled lora_A/B and lora.down/up: one pair would silently replace the other
    dotted = random_lora_state_dict(sd15, rank=2, seed=0, fmt="diffusers", text_encoder=False)
    a_key = next(k for k in dotted if k.endswith(".lora_A.weight"))
    stem = a_key[: -len(".lora_A.weight")]
    save(
        "duplicate_target",
        {
            **dotted,
            stem + ".lora.down.weight": dotted[a_key].clone(),
            stem + ".lora.up.weight": dotted[stem + ".lora_B.weight"].clone(),
        },
    )
    save("alpha_not_scalar", {**dotted, stem + ".alpha": torch.zeros(0)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(cases["nan"].read_bytes()[:-100])
    cases["truncated"] = truncated
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
    cases["garbage"] = garbage
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    cases["huge_header"] = huge
    dup = tmp_path / "duplicate.safetensors"
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    dup.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    cases["duplicate"] = dup
    absurd = tmp_path / "absurd_shape.safetensors"
    _write_raw(absurd, {"a": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 4]}}, b"\0" * 4)
    cases["absurd_shape"] = absurd
    pickle = tmp_path / "model.ckpt"
    torch.save(good, pickle)
    cases["pickle"] = pickle
    keys = {
        "lycoris": ["lora_unet_x.hada_w1_a"],
        "nan": [key],
        "inf": [key],
        "rank_mismatch": [key],
        "unknown_key": ["something_else.weight"],
        "unmatched": ["no_such_layer"],
        "int_dtype": [key],
        "duplicate": ["'a'"],
        "absurd_shape": ["'a'"],
        "duplicate_target": [stem + ".lora.down.weight", a_key],
        "alpha_not_scalar": [stem + ".alpha"],
    }
    return cases, keys


EXPECTED = {
    "sdxl_on_sd15": "another base",
    "lycoris": "LyCORIS",
    "nan": "NaN",
    "inf": "NaN or Inf",
    "rank_mismatch": "ranks do not match",
    "unknown_key": "not part of any down/up pair",
    "unmatched": "match no layer",
    "int_dtype": "not a float type",
    "empty": "no tensors",
    "truncated": "data_offsets",
    "garbage": "not valid JSON",
    "huge_header": "header claims",
    "duplicate": "duplicated key",
    "absurd_shape": "absurd shape",
    "pickle": "pickle",
    "duplicate_target": "target the same layer",
    "alpha_not_scalar": "alpha must be a scalar",
}


def test_each_bad_file_is_a_clear_error_and_the_pipeline_is_untouched(sd15, sdxl, sd15_loras, tmp_path):
    cases, keys = _bad_files(sd15, sdxl, tmp_path)
    assert set(cases) == set(EXPECTED)
    before = pipeline_state(sd15)
    for name, path in cases.items():
        with pytest.raises(LoRAFileError) as info:
            # a good LoRA first: it must not stay half-installed when the second file fails
            Composer(sd15, [LoRA(sd15_loras[0]), LoRA(path, name="bad")])
        message = str(info.value)
        assert EXPECTED[name] in message, (name, message)
        assert str(path) in message, (name, message)
        for key in keys.get(name, []):
            assert key in message, (name, key, message)
    assert_same_state(before, pipeline_state(sd15))


def test_pickle_allowed_explicitly(sd15, tmp_path):
    path = tmp_path / "old.pt"
    torch.save(random_lora_state_dict(sd15, rank=2, seed=3, text_encoder=False), path)
    img = _img(sd15, [path], allow_pickle=True)
    save_file(
        random_lora_state_dict(sd15, rank=2, seed=3, text_encoder=False), str(tmp_path / "new.safetensors")
    )
    assert np.array_equal(img, _img(sd15, [tmp_path / "new.safetensors"]))


def test_partial_load_warns(sd15, tmp_path):
    good = random_lora_state_dict(sd15, rank=2, seed=0, text_encoder=False)
    good["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    good["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    save_file(good, str(tmp_path / "p.safetensors"))
    with pytest.warns(UserWarning, match="no_such_layer"):
        _img(sd15, [tmp_path / "p.safetensors"], allow_partial=True)


@pytest.mark.parametrize(
    "loras,fragment",
    [
        (lambda p: [LoRA(p[0]), LoRA(p[0])], "duplicate"),
        (lambda p: [LoRA(p[0], name="x"), LoRA(p[1], name="x")], "duplicate"),
        (lambda p: [LoRA(p[0], weight=float("nan"))], "weight"),
        (lambda p: [LoRA(p[0], weight=-1)], "weight"),
        (lambda p: [LoRA(p[0], category="scenery")], "category"),
        (lambda p: [LoRA(p[0], name="../evil")], "safe adapter name"),
        (lambda p: [LoRA(p[0], name="a"), LoRA(p[0], name="b")], "same LoRA file is listed twice"),
        (lambda p: [], "needs at least one LoRA"),
        (lambda p: [LoRA(p[0], weight=0), LoRA(p[1], weight=0.0)], "weights of the composition sum to 0"),
    ],
)
def test_bad_lora_options(sd15, sd15_loras, loras, fragment):
    before = pipeline_state(sd15)
    with pytest.raises(OptionError, match=fragment):
        compose(sd15, loras(sd15_loras), prompt="x", num_inference_steps=1, progress=False)
    assert_same_state(before, pipeline_state(sd15))


@pytest.mark.parametrize("method", ["composite", "cmlora"])
def test_all_zero_weights_refused_before_any_work(sd15, sd15_loras, monkeypatch, method):
    import cmlora.api

    def no_work(*args, **kwargs):
        raise AssertionError("the prompt was encoded: work started before the options were checked")

    monkeypatch.setattr(cmlora.api, "encode_prompt", no_work)
    with pytest.raises(OptionError, match="sum to 0"):
        compose(
            sd15,
            [LoRA(p, weight=0) for p in sd15_loras[:2]],
            method=method,
            prompt="x",
            num_inference_steps=2,
            height=16,
            width=16,
            progress=False,
        )


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"height": 20}, "multiple of 8"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"method": "cmlora", "variant": "weird"}, "variant"),
        ({"method": "blend"}, "unknown method"),
        ({"tau": 0, "method": "switch"}, "tau"),
        ({"lora_scale": "a"}, r"lora_scale must be a number in \[0, 1000\], got 'a'"),
        ({"lora_scale": 1e30}, "lora_scale must be a number in"),
        ({"lora_scale": -1.0}, "lora_scale"),
    ],
)
def test_bad_generation_options_fail_before_work(sd15, sd15_loras, kwargs, fragment):
    before = pipeline_state(sd15)
    args = {"prompt": "x", "num_inference_steps": 2, "height": 16, "width": 16, "progress": False} | kwargs
    with pytest.raises(OptionError, match=fragment):
        compose(sd15, [LoRA(sd15_loras[0])], **args)
    assert_same_state(before, pipeline_state(sd15))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.one_of(
        st.binary(max_size=64),
        st.dictionaries(
            st.text(max_size=8),
            st.one_of(
                st.none(),
                st.integers(),
                st.text(max_size=5),
                st.fixed_dictionaries(
                    {
                        "dtype": st.sampled_from(["F32", "F16", "I8", "X9", ""]),
                        "shape": st.lists(st.integers(min_value=-3, max_value=10**7), max_size=4),
                        "data_offsets": st.lists(st.integers(min_value=-5, max_value=10**6), max_size=3),
                    }
                ),
            ),
            max_size=4,
        ),
    ),
    data=st.binary(max_size=64),
    declared=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
)
def test_fuzz_reader_only_raises_its_own_errors(tmp_path_factory, header, data, declared):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared is None else declared
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    try:
        check_safetensors_header(path)
        read_lora_file(path)
    except LoRAFileError:
        pass


_FUZZ_STEMS = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_conv_in",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "base_model.model.conv_in",
    "x",
)
_FUZZ_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))
_FUZZ_EXTRAS = (".alpha", ".lora.alpha", ".lora_up.weight", ".lora_B.weight", ".hada_w1_a", "")
_FUZZ_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stems=st.lists(st.sampled_from(_FUZZ_STEMS), min_size=1, max_size=2, unique=True),
    pair=st.sampled_from(_FUZZ_PAIRS),
    extras=st.lists(st.sampled_from(_FUZZ_EXTRAS), max_size=2, unique=True),
    data=st.data(),
)
def test_fuzz_contents_only_raise_its_own_errors(sd15, tmp_path_factory, stems, pair, extras, data):
    """Well-formed files of down/up pairs (LoRA key spellings, near-miss shapes, any bytes: NaN too)
    plus stray keys: reading them and resolving them against a pipeline raises only LoRAFileError."""
    dims, floats = st.sampled_from([0, 1, 2, 3, 4, 16, 32]), st.sampled_from(["F32", "F32", "F16", "BF16"])
    shapes = {}
    for stem in stems:
        rank = data.draw(st.sampled_from([1, 2, 3]))
        kernel = data.draw(st.sampled_from([[], [1, 1], [3, 3]]))
        shapes[stem + pair[0]] = (data.draw(floats), [rank, data.draw(dims), *kernel])
        shapes[stem + pair[1]] = (data.draw(floats), [data.draw(dims), rank, *([1, 1] if kernel else [])])
        for suffix in extras:
            any_dtype = st.sampled_from(sorted(_FUZZ_DTYPES))
            shapes.setdefault(stem + suffix, (data.draw(any_dtype), data.draw(st.lists(dims, max_size=3))))
    header, offset = {}, 0
    for key, (dtype, shape) in shapes.items():
        size = math.prod(shape) * _FUZZ_DTYPES[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    fill = data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path_factory.mktemp("fuzz") / "c.safetensors"
    _write_raw(path, header, (fill * (offset // len(fill) + 1))[:offset])
    try:
        resolve(read_lora_file(path), sd15)
    except LoRAFileError:
        pass


def test_user_peft_adapters_stay_and_apply(tmp_path):
    """A pipeline with the user's own LoRA loaded by diffusers (PEFT) composes on top of it, and keeps it."""
    from cmlora.tiny import tiny_sd15_pipeline, write_random_lora

    pipe = tiny_sd15_pipeline(seed=3)
    user = write_random_lora(pipe, tmp_path / "user.safetensors", seed=9, text_encoder=False)
    ours = write_random_lora(pipe, tmp_path / "ours.safetensors", seed=10)
    both = _img(pipe, [user, ours])
    pipe.load_lora_weights(str(user), adapter_name="user")
    before = pipeline_state(pipe)
    assert np.array_equal(_img(pipe, [ours]), both)
    assert_same_state(before, pipeline_state(pipe))
    assert pipe.get_active_adapters() == ["user"]


# --------------------------------------------------------------------------- untrusted headers

_DOWN, _UP = "lora_unet_conv_in.lora_down.weight", "lora_unet_conv_in.lora_up.weight"


def _valid_header() -> dict:
    """A well-formed two-tensor header (64 data bytes) that each case below breaks in one place."""
    return {
        _DOWN: {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        _UP: {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
    }


def _mutated(key: str, field: str, value) -> dict:
    header = _valid_header()
    header[key][field] = value
    return header


# (case, header or raw bytes after the 8-byte length, data bytes, key the message must name or None)
_MUTATED_HEADERS = [
    ("dtype list", _mutated(_DOWN, "dtype", ["F32"]), 64, _DOWN),
    ("dtype object", _mutated(_DOWN, "dtype", {"F32": 4}), 64, _DOWN),
    ("dtype number", _mutated(_DOWN, "dtype", 4), 64, _DOWN),
    ("dtype null", _mutated(_UP, "dtype", None), 64, _UP),
    ("shape object", _mutated(_DOWN, "shape", {"0": 2}), 64, _DOWN),
    ("shape string", _mutated(_DOWN, "shape", "2,4"), 64, _DOWN),
    ("shape floats", _mutated(_DOWN, "shape", [2.0, 4.0]), 64, _DOWN),
    ("shape negative", _mutated(_DOWN, "shape", [-2, -4]), 64, _DOWN),
    ("shape nested", _mutated(_DOWN, "shape", [[2], [4]]), 64, _DOWN),
    ("shape booleans", _mutated(_DOWN, "shape", [True, 4]), 64, _DOWN),
    ("shape NaN", _mutated(_DOWN, "shape", [float("nan"), 4]), 64, _DOWN),
    ("offsets object", _mutated(_DOWN, "data_offsets", {"start": 0}), 64, _DOWN),
    ("offsets negative", _mutated(_DOWN, "data_offsets", [-32, 0]), 64, _DOWN),
    ("offsets reversed", _mutated(_UP, "data_offsets", [64, 32]), 64, _UP),
    ("offsets three", _mutated(_DOWN, "data_offsets", [0, 16, 32]), 64, _DOWN),
    ("offsets strings", _mutated(_DOWN, "data_offsets", ["0", "32"]), 64, _DOWN),
    ("offsets overlap", _mutated(_UP, "data_offsets", [16, 48]), 64, _UP),
    ("offsets gap", _mutated(_UP, "data_offsets", [40, 72]), 72, _UP),
    ("offsets past the end", _mutated(_UP, "data_offsets", [32, 64]), 48, _UP),
    ("bytes after the last tensor", _valid_header(), 80, None),
    ("entry is a list", {**_valid_header(), _UP: [1, 2]}, 64, _UP),
    ("entry with an extra field", _mutated(_DOWN, "extra", 1), 64, _DOWN),
    ("entry missing a field", {**_valid_header(), _UP: {"dtype": "F32", "shape": [4, 2]}}, 64, _UP),
    ("metadata a list", {**_valid_header(), "__metadata__": ["a"]}, 64, "__metadata__"),
    ("metadata non-string", {**_valid_header(), "__metadata__": {"a": 1}}, 64, "__metadata__"),
    ("header a list", b"[1, 2, 3]", 0, None),
    ("header a string", b'"lora"', 0, None),
    ("header null", b"null", 0, None),
    ("header not UTF-8", b'{"\xff\xfe": 1}', 0, None),
    ("header 5000-digit integer", b'{"a": {"shape": [' + b"9" * 5000 + b"]}}", 0, None),
    ("header deeply nested", b"[" * 100_000 + b"]" * 100_000, 0, None),
    ("header empty", b"", 0, None),
]


@pytest.mark.parametrize("case,header,data,key", _MUTATED_HEADERS, ids=[c[0] for c in _MUTATED_HEADERS])
def test_mutated_headers_are_lora_file_errors(tmp_path, case, header, data, key):
    """Every malformed header value (wrong JSON type, negative/overlapping/gapped offsets, offsets
    past the end, non-UTF-8, non-object JSON) is the project's own error, naming the key at fault:
    never a TypeError, KeyError or ValueError of another kind."""
    path = tmp_path / "m.safetensors"
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    for reader in (check_safetensors_header, read_lora_file):
        with pytest.raises(LoRAFileError) as info:
            reader(path)
        assert type(info.value) is LoRAFileError
        assert str(path) in str(info.value)
        if key is not None:
            assert repr(key) in str(info.value), (case, str(info.value))


def test_header_claiming_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / "long.safetensors"
    raw = json.dumps(_valid_header()).encode()
    path.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw + b"\0" * 64)
    with pytest.raises(LoRAFileError, match="header claims"):
        read_lora_file(path)


_ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=4)
    | st.sampled_from(["F32", "F16", "BF16", "I8", "BOOL"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    key=st.sampled_from([_DOWN, _UP]),
    field=st.sampled_from(["dtype", "shape", "data_offsets"]),
    value=_ANY_JSON,
    data=st.sampled_from([0, 48, 64, 80]),
)
def test_header_values_of_any_json_type_only_raise_lora_file_errors(key, field, value, data):
    """Fuzz (deterministic): any JSON value in any field of a tensor entry ends as LoRAFileError."""
    import tempfile
    from pathlib import Path

    raw = json.dumps(_mutated(key, field, value)).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
        try:
            read_lora_file(path)
        except LoRAFileError:
            pass


# --------------------------------------------------------------------------- sparse files: judged by the header


def _sparse_lora(path, entries: dict[str, tuple[str, list[int]]]) -> int:
    """A file whose header claims ``entries`` (key: dtype, shape), the data a hole of that size."""
    sizes = {"F32": 4, "F16": 2}
    header, offset = {}, 0
    for key, (dtype, shape) in entries.items():
        size = math.prod(shape) * sizes[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)  # sparse: no disk, no time
    return offset


_SPARSE_CHECK = """
import resource, sys, time
from cmlora.errors import LoRAFileError
from cmlora.loras import read_lora_file

for path in sys.argv[1:]:
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:
        read_lora_file(path)
        outcome = "read"
    except LoRAFileError as exc:
        outcome = "refused: " + str(exc).replace(chr(10), " ")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(f"{time.perf_counter() - start:.3f} {grown} {outcome}")
"""


def test_sparse_multi_gib_files_are_refused_from_the_header(tmp_path):
    """Files claiming gigabytes are judged by their header alone, before any tensor byte is read:
    keys that are no LoRA, ranks that cannot pair, more data than a LoRA may hold. Each refusal
    takes well under 2 s and grows the peak RSS of a fresh process by less than 500 MB."""
    import subprocess
    import sys

    gib = 2**30
    cases = {
        "not_a_lora": ({"model.diffusion_model.x.weight": ("F32", [786432, 1024])}, "no LoRA weights"),
        "ranks": (
            {
                "lora_unet_conv_in.lora_down.weight": ("F32", [4096, 196608]),
                "lora_unet_conv_in.lora_up.weight": ("F32", [320, 8]),
            },
            "ranks do not match",
        ),
        "too_big": (
            {
                "lora_unet_conv_in.lora_down.weight": ("F16", [4096, 2**19]),
                "lora_unet_conv_in.lora_up.weight": ("F16", [320, 4096]),
            },
            "bytes of tensor data",
        ),
    }
    paths = []
    for name, (entries, _) in cases.items():
        paths.append(tmp_path / f"{name}.safetensors")
        assert _sparse_lora(paths[-1], entries) >= 3 * gib
    done = subprocess.run(
        [sys.executable, "-c", _SPARSE_CHECK, *map(str, paths)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(cases)
    for line, (_, fragment) in zip(lines, cases.values(), strict=True):
        seconds, grown, outcome = line.split(" ", 2)
        assert outcome.startswith("refused") and fragment in outcome, line
        assert float(seconds) < 2.0 and int(grown) < 500 * 2**20, line


def test_composer_resolves_before_reading_any_tensor(sd15, tmp_path):
    """A multi-GiB file whose header is a plausible LoRA but does not fit the pipeline is refused by
    ``Composer`` from shapes alone: nothing of its 3 GiB is read."""
    import resource
    import time

    path = tmp_path / "wide.safetensors"
    _sparse_lora(
        path,
        {
            "lora_unet_conv_in.lora_down.weight": ("F32", [4096, 196608]),
            "lora_unet_conv_in.lora_up.weight": ("F32", [320, 4096]),
        },
    )
    before = pipeline_state(sd15)
    peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(LoRAFileError, match="another base model"):
        Composer(sd15, [LoRA(path)])
    assert time.perf_counter() - start < 2.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 500 * 2**20
    assert_same_state(before, pipeline_state(sd15))


def test_special_files_say_what_they_are(tmp_path):
    """A symlink to /dev/zero, a FIFO, a directory named x.safetensors: each is named for what it is,
    and none is opened (a FIFO would block this test forever, /dev/zero never end)."""
    import os

    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "broken.safetensors").symlink_to(tmp_path / "gone.safetensors")
    expected = {
        "zero": "character device",
        "fifo": "named pipe",
        "dir": "directory",
        "broken": "does not exist",
    }
    for name, kind in expected.items():
        path = tmp_path / f"{name}.safetensors"
        for reader in (read_lora_file, check_safetensors_header):
            with pytest.raises(LoRAFileError, match=kind) as info:
                reader(path)
            assert "no such file" not in str(info.value)


def test_allow_partial_never_reads_the_pairs_that_land_nowhere(sd15, tmp_path):
    """Only the pairs that resolve are read: an unmatched pair full of NaN (refused when read) is
    skipped with allow_partial, and the composition equals the file without it."""
    good = random_lora_state_dict(sd15, rank=2, seed=0, text_encoder=False)
    save_file(good, str(tmp_path / "good.safetensors"))
    extra = {
        "lora_unet_no_such_layer.lora_down.weight": torch.full((2, 4), float("nan")),
        "lora_unet_no_such_layer.lora_up.weight": torch.full((4, 2), float("nan")),
    }
    save_file({**good, **extra}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(LoRAFileError, match="NaN"):
        read_lora_file(tmp_path / "partial.safetensors")
    with pytest.warns(UserWarning, match="no_such_layer"):
        image = _img(sd15, [tmp_path / "partial.safetensors"], allow_partial=True)
    assert np.array_equal(image, _img(sd15, [tmp_path / "good.safetensors"]))

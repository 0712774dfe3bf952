"""The request's rules (each checked in ``GenerationRequest`` and only there) and the typed record."""

import dataclasses
import json

import pytest

from cmlora import Composer, LoRA
from cmlora.errors import OptionError
from cmlora.records import record_json
from cmlora.request import GenerationRecord, GenerationRequest, check_loras, seeds_from

A, B = LoRA("/x/a.safetensors"), LoRA("/x/b.safetensors", weight=0.5, category="style")


def request(**kw):
    return GenerationRequest(**{"loras": (A, B), **kw})


def test_defaults_are_normalised():
    r = request(method="cmlora-online", seeds=[3, 4], options={"threshold": 0.3})
    assert (r.method_name, r.method_variant, r.label) == ("cmlora", "online", "cmlora-online")
    assert (r.method, r.variant) == ("cmlora-online", None)
    assert r.seeds == (3, 4)
    assert dict(r.options) == {"threshold": 0.3}
    with pytest.raises(TypeError):
        r.options["threshold"] = 0.5  # read-only: a request cannot change after its checks
    assert request(method="switch").method_variant == "standard"
    assert request(method="switch").label == "switch"
    assert request(method="switch", variant="profiled").label == "switch-profiled"
    assert request(method="switch", variant="standard").label == "switch"
    assert request(method="cmlora", variant="offline").label == "cmlora-offline"
    assert request(method="merge").method_variant is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"steps": 0}, r"num_inference_steps must be an integer in \[1, 1000\], got 0"),
        ({"steps": 1001}, "got 1001"),
        ({"steps": 2.0}, "got 2.0"),
        ({"steps": True}, "got True"),
        ({"guidance_scale": -1}, "guidance_scale must be a finite number >= 0, got -1"),
        ({"guidance_scale": float("nan")}, "got nan"),
        ({"lora_scale": 1001}, r"lora_scale must be a number in \[0, 1000\], got 1001"),
        ({"lora_scale": float("inf")}, "got inf"),
        ({"height": 100}, "height must be a positive multiple of 8, got 100"),
        ({"width": 0}, "width must be a positive multiple of 8, got 0"),
        ({"width": 8200}, "width 8200 is larger than 8192 pixels"),
        ({"seeds": ()}, "seeds is empty"),
        ({"seeds": (-1,)}, r"seed must be an integer in \[0, 2\*\*63-1\], got -1"),
        ({"seeds": (2**63,)}, "got 9223372036854775808"),
        ({"seeds": ("7",)}, "got '7'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"prompt": None}, "prompt must be a string, got NoneType"),
        ({"negative_prompt": 3}, "negative_prompt must be a string or None, got int"),
        ({"method": "fancy"}, "unknown method 'fancy'"),
        ({"method": "cmlora-turbo"}, "unknown cmlora variant 'turbo'"),
        ({"method": "merge", "variant": "x"}, "method 'merge' has no variants"),
        ({"method": "cmlora", "variant": "x"}, "unknown cmlora variant 'x'; choose one of offline, online"),
        ({"method": "cmlora-online", "variant": "async"}, "already names a variant: drop variant='async'"),
        ({"method": "merge", "options": {"tau": 2}}, r"method 'merge' has no option\(s\) \['tau'\]"),
        ({"method": "cmlora", "options": {"cache_interval": 0}}, "cache_interval"),
        ({"options": ["tau"]}, "options must be a mapping"),
    ],
)
def test_each_rule_refuses_with_the_value(kw, message):
    with pytest.raises(OptionError, match=message):
        request(**kw)


def test_replace_checks_again():
    r = request(method="composite")
    assert dataclasses.replace(r, method="merge").label == "merge"
    online = request(method="cmlora", variant="online")
    assert dataclasses.replace(online, method="merge").label == "merge"  # the variant does not carry over
    assert dataclasses.replace(online, method="cmlora").label == "cmlora-offline"
    with pytest.raises(OptionError, match="num_inference_steps"):
        dataclasses.replace(r, steps=0)


def test_loras_are_distinct():
    with pytest.raises(OptionError, match=r"duplicate LoRA/adapter names \['a'\]"):
        check_loras([A, LoRA("/y/a.safetensors")])
    with pytest.raises(OptionError, match="the same LoRA file is listed twice"):
        check_loras([A, LoRA("/x/a.safetensors", name="other")])
    with pytest.raises(OptionError, match="got a single one"):
        check_loras(A)
    assert check_loras(["/x/c.safetensors"])[0].adapter == "c"
    with pytest.raises(OptionError, match="needs at least one LoRA"):
        GenerationRequest(loras=(), method="composite")
    assert GenerationRequest(loras=(), method="none").label == "none"


def test_profile_rules(tmp_path):
    with pytest.raises(OptionError, match="profile= sets the LoRA order of cmlora and switch-profiled only"):
        request(method="composite", profile=tmp_path / "p.json")
    with pytest.raises(OptionError, match=r"profile= conflicts with \['order'\]"):
        request(method="cmlora", profile=tmp_path / "p.json", options={"order": ["a", "b"]})
    with pytest.raises(Exception, match="p.json"):  # the file itself is judged by ProfileFile.load
        request(method="cmlora", profile=tmp_path / "p.json")


def test_seeds_from():
    assert seeds_from(5, 3) == (5, 6, 7)
    assert seeds_from([9, 1]) == (9, 1)
    with pytest.raises(OptionError, match="num_images must be an integer >= 1, got 0"):
        seeds_from(5, 0)


def test_record_is_a_read_only_mapping_in_json_order(sd15, sd15_loras):
    with Composer(sd15, [LoRA(p) for p in sd15_loras[:2]], model_name="tiny") as composer:
        req = GenerationRequest(composer.loras, prompt="a cat", method="composite", steps=2, seeds=(4,))
        record = composer.run(req, progress=False).records[0]
        with pytest.raises(OptionError, match="not this session's"):
            composer.run(dataclasses.replace(req, loras=composer.loras[:1]), progress=False)
    assert isinstance(record, GenerationRecord)
    assert record["seed"] == 4 and record["base_model"] == "tiny" and record["method_label"] == "composite"
    assert list(record)[:3] == ["base_model", "pipeline", "loras"] and list(record)[-1] == "method_label"
    with pytest.raises(TypeError):
        record["seed"] = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.seed = 5
    with pytest.raises(KeyError):
        record["nothing"]
    assert record == record.as_dict() and json.loads(record_json(record)) == json.loads(
        record_json(record.as_dict())
    )
    assert list(json.loads(record_json(record))) == list(record)


def test_readme_request_example(sd15, sd15_loras):
    """The README's GenerationRequest example, on the tiny pipeline."""
    from cmlora import GenerationRequest as Exported

    loras = [LoRA(p) for p in sd15_loras[:2]]
    request = Exported(
        loras=tuple(loras),
        prompt="x",
        method="cmlora-online",
        seeds=(0, 1),
        options={"threshold": 0.4},
        steps=3,
    )
    with Composer(sd15, request.loras) as c:
        online = c.run(request, progress=False)
        merged = c.run(dataclasses.replace(request, method="merge", options={}), progress=False)
    assert [r.seed for r in online.records] == [0, 1] and online.records[0].options["threshold"] == 0.4
    assert [r.method_label for r in merged.records] == ["merge", "merge"]

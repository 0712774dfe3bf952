"""The profile file: round trip, validation naming the entry and the file, lookup by sha256."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from cmlora.profiles import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LoRAProfileEntry,
    ProfileFile,
    ProfileFileError,
    sha256_file,
)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _entry(name: str, score: float, category: str | None = None) -> LoRAProfileEntry:
    return LoRAProfileEntry(
        name=name,
        file=f"loras/{name}.safetensors",
        sha256=_sha(name),
        score=score,
        radial_profile=[1.0, 0.5, score],
        category=category,
    )


def _profile_file() -> ProfileFile:
    return ProfileFile(
        entries=[
            _entry("character_1", 0.52, "character"),
            _entry("clothing_1", 0.47, "clothing"),
            _entry("background_1", 0.20, "background"),
            _entry("untagged", 0.30),
        ],
        settings={"base_model": "sd-1.5", "seeds": [0, 1], "height": 512, "width": 512},
        created_with={"cmlora": "0.1.0"},
    )


def test_round_trip(tmp_path) -> None:
    path = tmp_path / "deep" / "profiles.json"
    original = _profile_file()
    original.save(path)
    assert original.source == str(path)
    loaded = ProfileFile.load(path)
    assert loaded == original
    assert loaded.source == str(path)
    raw = json.loads(path.read_text())
    assert (raw["format"], raw["version"]) == (FORMAT_NAME, FORMAT_VERSION)
    assert raw["entries"][3]["category"] is None
    # Atomic save leaves no temporary file behind.
    assert sorted(os.listdir(path.parent)) == ["profiles.json"]


def test_save_overwrites_and_failed_save_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "profiles.json"
    _profile_file().save(path)
    before = path.read_bytes()
    broken = _profile_file()
    broken.settings["bad"] = float("nan")  # NaN is not JSON
    with pytest.raises(ValueError):
        broken.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["profiles.json"]


def test_sha256_file_streams(tmp_path) -> None:
    path = tmp_path / "lora.safetensors"
    payload = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(payload)
    assert sha256_file(path) == hashlib.sha256(payload).hexdigest()


def _write(tmp_path, raw) -> str:
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(raw))
    return str(path)


def _valid_raw() -> dict:
    return _profile_file().to_json()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(format="other"), "'format' must be"),
        (lambda r: r.update(version=2), "unsupported version 2"),
        (lambda r: r.update(settings=[]), "'settings' must be an object"),
        (lambda r: r.update(entries={}), "'entries' must be a list"),
        (lambda r: r["entries"].__setitem__(1, "x"), "entry 1 must be an object"),
        (lambda r: r["entries"][1].pop("sha256"), r"entry 1 \('clothing_1'\) is missing field\(s\) sha256"),
        (lambda r: r["entries"][1].update(extra=1), r"entry 1 \('clothing_1'\) has unknown field\(s\) extra"),
        (lambda r: r["entries"][0].update(name=""), "entry 0: 'name' must be a non-empty string"),
        (lambda r: r["entries"][2].update(sha256="ABC"), r"entry 2 \('background_1'\): 'sha256' must be 64"),
        (
            lambda r: r["entries"][2].update(score="0.2"),
            r"entry 2 \('background_1'\): 'score' must be a finite",
        ),
        (lambda r: r["entries"][2].update(score=True), "'score' must be a finite"),
        (lambda r: r["entries"][3].update(radial_profile=[]), r"entry 3 \('untagged'\): 'radial_profile'"),
        (lambda r: r["entries"][3].update(radial_profile=[1.0, "x"]), "non-number"),
        (lambda r: r["entries"][3].update(category=3), r"entry 3 \('untagged'\): 'category'"),
        (lambda r: r["entries"][3].update(sha256=_sha("character_1")), "have the same sha256"),
    ],
)
def test_load_validation_names_entry_and_file(tmp_path, mutate, message) -> None:
    raw = _valid_raw()
    mutate(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ProfileFileError, match=message) as info:
        ProfileFile.load(path)
    assert str(info.value).startswith(f"profile file {path}")
    assert isinstance(info.value, ValueError)


def test_load_rejects_non_json_nan_and_missing_file(tmp_path) -> None:
    path = tmp_path / "profiles.json"
    path.write_text("{not json")
    with pytest.raises(ProfileFileError, match="is not valid JSON"):
        ProfileFile.load(path)
    raw = _valid_raw()
    path.write_text(json.dumps(raw).replace('"score": 0.52', '"score": NaN'))
    with pytest.raises(
        ProfileFileError, match=r"entry 0 \('character_1'\): 'score' must be a finite number, got nan"
    ):
        ProfileFile.load(path)
    with pytest.raises(ProfileFileError, match="does not exist"):
        ProfileFile.load(tmp_path / "missing.json")


def test_order_for_matches_by_sha256() -> None:
    profiles = _profile_file()
    composition = {
        "bg": _sha("background_1"),  # renamed in the composition: the file decides, not the name
        "character_1": _sha("character_1"),
        "clothing_1": _sha("clothing_1"),
    }
    order, high, low = profiles.order_for(composition)
    assert order == ["character_1", "clothing_1", "bg"]
    assert (high, low) == (["character_1", "clothing_1"], ["bg"])
    assert profiles.order_for(composition, threshold=0.5) == (order, ["character_1"], ["clothing_1", "bg"])


def test_order_for_missing_entry_and_sha_mismatch(tmp_path) -> None:
    path = tmp_path / "profiles.json"
    profiles = _profile_file()
    profiles.save(path)
    profiles = ProfileFile.load(path)
    unknown = _sha("style_9")
    with pytest.raises(ValueError) as info:
        profiles.order_for({"character_1": _sha("character_1"), "style_9": unknown})
    assert str(info.value) == (
        f"profile file {path} has no entry for LoRA 'style_9' (sha256 {unknown}): run `cmlora profile` on it"
    )
    retrained = _sha("character_1 v2")
    with pytest.raises(ValueError, match=f"different file.*'character_1'.*sha256 {retrained}"):
        profiles.order_for({"character_1": retrained})
    with pytest.raises(ValueError, match="at least one"):
        profiles.order_for({})

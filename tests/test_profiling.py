"""Offline LoRA profiling (profile_loras, ranking, plot), the research trace plot, and their CLI commands."""

from __future__ import annotations

import math
import shutil

import pytest
from PIL import Image

from cmlora import LoRA, OptionError
from cmlora.api import Composer
from cmlora.app.cli import main
from cmlora.frequency import HIGH_BAND_START, band_mean, order_and_partition
from cmlora.profiles import ProfileFile, ProfileFileError, sha256_file
from cmlora.profiling import plot_profile, print_ranking, profile_loras
from cmlora.research import plot_trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = {"steps": 2, "guidance_scale": 5.0, "height": 16, "width": 16}


def assert_png(path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def _profile(pipe, paths, **overrides):
    kwargs = {
        "prompt": None,
        "base_prompt": "a photo",
        "negative_prompt": "low quality",
        "seeds": [0, 1],
        "base_name": "tiny-sd15",
        "progress": False,
        **TINY,
    }
    kwargs.update(overrides)
    loras = [
        LoRA(p, category=c, triggers=t)
        for p, c, t in zip(paths, ("character", "background", None), (("red hair",), (), ()), strict=False)
    ]
    return profile_loras(pipe, loras, **kwargs)


@pytest.fixture(scope="module")
def profile(sd15, sd15_loras):
    return _profile(sd15, sd15_loras[:2])


def test_entries_match_files_and_scores_are_finite(profile, sd15_loras):
    assert [e.name for e in profile.entries] == ["lora0", "lora1"]
    assert [e.category for e in profile.entries] == ["character", "background"]
    for entry, path in zip(profile.entries, sd15_loras[:2], strict=True):
        assert entry.sha256 == sha256_file(path)
        assert entry.file == str(path)
        assert math.isfinite(entry.score) and 0.0 <= entry.score <= 1.0
        assert all(math.isfinite(v) for v in entry.radial_profile)
        # mean of per-image scores == band mean of the mean profile (linear, not re-normalised)
        assert entry.score == pytest.approx(band_mean(entry.radial_profile, (HIGH_BAND_START, 1.0)), abs=1e-9)
    assert len({len(e.radial_profile) for e in profile.entries}) == 1
    settings = profile.settings
    assert settings["seeds"] == [0, 1] and settings["steps"] == 2
    assert (settings["height"], settings["width"]) == (16, 16)
    assert settings["base_model"] == "tiny-sd15" and settings["band_start"] == HIGH_BAND_START
    assert settings["prompts"] == {"lora0": "a photo, red hair", "lora1": "a photo"}
    assert "torch" in profile.created_with


def test_round_trip_and_profile_sets_the_cmlora_partition(profile, sd15, sd15_loras, tmp_path):
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = ProfileFile.load(path)
    assert loaded == profile
    _, high, low = order_and_partition({e.name: e.score for e in loaded.entries})
    # user order reversed: the profile, not the order given, decides H and L
    with Composer(sd15, [LoRA(sd15_loras[1]), LoRA(sd15_loras[0])]) as composer:
        for given in (loaded, path):
            record = composer.generate(
                "red",
                method="cmlora",
                profile=given,
                num_inference_steps=2,
                height=16,
                width=16,
                progress=False,
            ).records[0]
            assert record["options"]["high"] == high
            assert record["options"]["low"] == low


def test_profile_of_other_loras_is_refused(profile, sd15, sd15_loras, tmp_path):
    with Composer(sd15, [LoRA(sd15_loras[0]), LoRA(sd15_loras[2])]) as composer:
        with pytest.raises(ProfileFileError, match="no entry"):
            composer.generate(
                "red", method="cmlora", profile=profile, num_inference_steps=1, height=16, width=16
            )
    impostor = tmp_path / "lora1.safetensors"  # same name as an entry, other content
    shutil.copy(sd15_loras[2], impostor)
    with Composer(sd15, [LoRA(sd15_loras[0]), LoRA(impostor)]) as composer:
        with pytest.raises(ProfileFileError, match="different file"):
            composer.generate(
                "red", method="cmlora", profile=profile, num_inference_steps=1, height=16, width=16
            )


def test_bad_inputs_raise_option_error(sd15, sd15_loras, tmp_path):
    with pytest.raises(OptionError, match="at least one LoRA"):
        _profile(sd15, [])
    with pytest.raises(OptionError, match="at least one seed"):
        _profile(sd15, sd15_loras[:1], seeds=[])
    copy = tmp_path / "copy.safetensors"
    shutil.copy(sd15_loras[0], copy)
    with pytest.raises(OptionError, match="same file content"):
        _profile(sd15, [sd15_loras[0], copy])


def test_ranking_and_profile_plot(profile, tmp_path, capsys):
    print_ranking(profile)
    text = capsys.readouterr().out
    order, high, low = order_and_partition({e.name: e.score for e in profile.entries})
    assert text.index(order[0]) < text.index(order[1])
    assert f"H (high-frequency): {', '.join(high)}" in text
    assert "largest score gap" in text
    print_ranking(profile, threshold=2.0)  # nothing reaches it: the top LoRA alone is H
    assert f"H (high-frequency): {order[0]}" in capsys.readouterr().out
    out = tmp_path / "sub" / "profile.png"
    plot_profile(profile, out)
    assert_png(out)


def test_plot_trace_with_and_without_research(sd15, sd15_loras, tmp_path):
    with Composer(sd15, [LoRA(p) for p in sd15_loras[:2]]) as composer:
        # 3 steps, interval 2: every LoRA gets a second full call (refreshes spread), hence a similarity
        for variant, research, steps in (("online", True, 3), ("offline", False, 2)):
            record = composer.generate(
                "red",
                method="cmlora",
                variant=variant,
                num_inference_steps=steps,
                height=16,
                width=16,
                cache_interval=2,
                research=research,
                progress=False,
            ).records[0]
            assert ("cache_similarity" in record["trace"][0]) is research
            if research:
                assert {k for e in record["trace"] for k in e["cache_similarity"]} == {"lora0", "lora1"}
            out = tmp_path / f"{variant}.png"
            plot_trace(record, out)
            assert_png(out)
        merge = composer.generate(
            "red", method="merge", num_inference_steps=1, height=16, width=16, research=True, progress=False
        ).records[0]
        plot_trace(merge, tmp_path / "merge.png")
        assert_png(tmp_path / "merge.png")
    with pytest.raises(ValueError, match="no per-step trace"):
        plot_trace({"method": "merge"}, tmp_path / "none.png")


def test_cli_profile_and_plot_trace(sd15_loras, tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = [
        "profile",
        "--base",
        "tiny-sd15",
        "--lora",
        str(sd15_loras[0]),
        "--lora",
        str(sd15_loras[1]),
        "--seeds",
        "1",
        "--steps",
        "2",
        "--size",
        "16x16",
        "--prompt",
        "red",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    loaded = ProfileFile.load(out)
    assert [e.sha256 for e in loaded.entries] == [sha256_file(p) for p in sd15_loras[:2]]
    assert_png(out.with_suffix(".png"))
    assert "H (high-frequency)" in capsys.readouterr().out

    images = tmp_path / "images"
    assert (
        main(
            [
                "generate",
                "--base",
                "tiny-sd15",
                "--lora",
                str(sd15_loras[0]),
                "--prompt",
                "red",
                "--steps",
                "3",
                "--size",
                "16x16",
                "--research",
                "--out",
                str(images),
                "--quiet",
            ]
        )
        == 0
    )
    (png,) = [p for p in images.glob("*.png") if not p.name.endswith(".trace.png")]
    written = png.with_suffix(".trace.png")
    assert_png(written)
    written.unlink()
    assert main(["plot-trace", str(png)]) == 0
    assert_png(written)
    assert main(["plot-trace", str(png.with_suffix(".json")), "--out", str(tmp_path / "t.png")]) == 0
    assert_png(tmp_path / "t.png")


def test_profile_conflicts_are_refused(sd15, sd15_loras, tmp_path):
    from cmlora import LoRA, OptionError
    from cmlora.api import Composer
    from cmlora.profiling import profile_loras

    loras = [LoRA(p) for p in sd15_loras[:2]]
    pf = profile_loras(
        sd15,
        loras,
        prompt="red",
        base_prompt="",
        negative_prompt=None,
        seeds=[0],
        steps=1,
        guidance_scale=2.0,
        height=16,
        width=16,
        base_name="tiny",
        progress=False,
    )
    with Composer(sd15, loras) as c:
        with pytest.raises(OptionError, match="conflicts"):
            c.generate(
                prompt="red",
                method="cmlora",
                profile=pf,
                high=[loras[0].adapter],
                low=[loras[1].adapter],
                num_inference_steps=1,
                height=16,
                width=16,
                progress=False,
            )
        with pytest.raises(OptionError, match="cmlora and switch-profiled only"):
            c.generate(
                prompt="red",
                method="composite",
                profile=pf,
                num_inference_steps=1,
                height=16,
                width=16,
                progress=False,
            )

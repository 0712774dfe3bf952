"""Refused up front, in one line: special files, unsafe pickled models, bad options, unusable
output folders. Every CLI refusal is exit code 2, one line on stderr naming the offending value,
no traceback, and no file left behind."""

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmlora.app.cli import main
from cmlora.errors import CmloraError


@contextmanager
def deadline(seconds: int = 20):
    """Fail instead of hanging forever if a reader opens a FIFO."""

    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s: a pipe or a device was opened")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(argv: list[str], capsys, *fragments: str) -> str:
    """Run the CLI; assert the refusal contract and return the one line."""
    capsys.readouterr()
    with deadline():
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def special(tmp_path):
    """A symlink to /dev/zero, a FIFO and a directory, each with the given suffix."""

    def make(suffix: str) -> dict[str, tuple[Path, str]]:
        folder = tmp_path / suffix.strip(".")
        folder.mkdir()
        (folder / f"zero{suffix}").symlink_to("/dev/zero")
        os.mkfifo(folder / f"fifo{suffix}")
        (folder / f"dir{suffix}").mkdir()
        return {
            "device": (folder / f"zero{suffix}", "character device"),
            "pipe": (folder / f"fifo{suffix}", "named pipe"),
            "directory": (folder / f"dir{suffix}", "directory"),
        }

    return make


def _readers():
    from cmlora.evaluate.runs import read_jsonl
    from cmlora.frequency import read_image
    from cmlora.profiles import ProfileFile
    from cmlora.records import read_record
    from cmlora.testbed.info import load_info

    return {
        "profile": (ProfileFile.load, ".json"),
        "record sidecar": (read_record, ".json"),
        "record png": (read_record, ".png"),
        "image": (read_image, ".png"),
        "info file": (load_info, ".json"),
        "run folder jsonl": (read_jsonl, ".jsonl"),
    }


@pytest.mark.parametrize(
    "reader", ["image", "info file", "profile", "record png", "record sidecar", "run folder jsonl"]
)
def test_every_reader_says_what_a_special_path_is(special, reader):
    """Profiles, records, images, info files and run-folder files go through one check: a device,
    a pipe or a directory is named for what it is (never "no such file"), and is never opened."""
    read, suffix = _readers()[reader]
    for path, kind in special(suffix).values():
        with deadline(), pytest.raises(CmloraError, match=kind) as info:
            read(path)
        assert str(path) in str(info.value)


def test_manifest_that_is_a_pipe_is_named(tmp_path):
    from cmlora.evaluate.runs import read_manifest

    os.mkfifo(tmp_path / "manifest.jsonl")
    with deadline(), pytest.raises(CmloraError, match="named pipe"):
        read_manifest(tmp_path)


def test_run_folder_images_that_are_pipes_are_named(tmp_path):
    """CLIPScore and the judge read a run folder's images: a pipe there is named, never opened."""
    from cmlora.evaluate.clipscore import clip_score_run
    from cmlora.evaluate.judge import _png_bytes

    (tmp_path / "images").mkdir()
    os.mkfifo(tmp_path / "images" / "a.png")
    line = {"image": "images/a.png", "job_id": "a", "composition_id": "c", "n": 1, "method": "merge"}
    line |= {"seed": 0, "seed_index": 0, "loras": [{"name": "x", "category": "character", "triggers": []}]}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(line) + "\n")

    class NoScorer:
        def score(self, *args):
            raise AssertionError("an image was scored")

    with deadline(), pytest.raises(CmloraError, match="named pipe"):
        clip_score_run(tmp_path, "clip", progress=False, scorer=NoScorer())
    with deadline(), pytest.raises(CmloraError, match="named pipe"):
        _png_bytes(tmp_path / "images" / "a.png")


# --------------------------------------------------------------------------- cmlora fft


def _png(path: Path, size: int = 64) -> Path:
    Image.new("L", (size, size), 128).save(path)
    return path


def test_fft_refuses_bad_images_in_one_line(tmp_path, capsys, special, monkeypatch):
    good = _png(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image")
    out = tmp_path / "spectra.png"
    refused(["fft", str(tmp_path / "missing.png"), "--out", str(out)], capsys, "missing.png", "no such file")
    refused(
        ["fft", str(tmp_path / "text.png"), "--out", str(out)], capsys, "text.png", "not a readable image"
    )
    for path, kind in special(".png").values():
        refused(["fft", str(path), "--out", str(out)], capsys, str(path), kind)
    # decompression bombs: past 2x the limit PIL raises, past 1x it only warns and decodes; both refused
    for limit in (1000, 3000):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        refused(["fft", str(good), "--out", str(out)], capsys, "good.png", "too large")
    assert not out.exists()


def test_fft_refuses_an_unwritable_out_before_reading_images(tmp_path, capsys):
    good = _png(tmp_path / "good.png")
    (tmp_path / "file").write_text("x")
    before = listing(tmp_path)
    refused(["fft", str(good), "--out", str(tmp_path / "file" / "s.png")], capsys, "file", "not a folder")
    refused(["fft", str(good), "--out", str(tmp_path)], capsys, str(tmp_path), "directory")
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        refused(["fft", str(good), "--out", str(locked / "s.png")], capsys, "locked", "cannot write")
        locked.rmdir()
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- cmlora plot-trace


def test_plot_trace_refuses_non_records_in_one_line(tmp_path, capsys):
    plain = _png(tmp_path / "plain.png")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    no_trace = tmp_path / "no_trace.json"
    no_trace.write_text(json.dumps({"method": "merge"}))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    before = listing(tmp_path)
    refused(["plot-trace", str(plain)], capsys, "plain.png", "no cmlora record")
    refused(["plot-trace", str(garbage)], capsys, "garbage.json", "not valid JSON")
    refused(["plot-trace", str(a_list)], capsys, "list.json", "not an object")
    refused(["plot-trace", str(no_trace)], capsys, "no per-step trace")
    refused(["plot-trace", str(binary)], capsys, "binary.json", "not UTF-8")
    refused(["plot-trace", str(tmp_path / "nothing.json")], capsys, "nothing.json", "no such file")
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- options


@pytest.fixture
def no_model(monkeypatch):
    """Every refusal below must come before a model is loaded."""
    import cmlora.models

    def load_base(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(cmlora.models, "load_base", load_base)


def test_generate_refuses_bad_options_before_loading(tmp_path, capsys):
    base = ["generate", "--base", "tiny-sd15", "--prompt", "x", "--out", str(tmp_path / "o"), "--quiet"]
    refused([*base, "--device", "gpu9"], capsys, "'gpu9'", "cpu, cuda")
    refused([*base, "--device", "xpu"], capsys, "'xpu'")
    refused([*base, "--device", "cuda:7" if not torch.cuda.is_available() else "cuda:99"], capsys, "'cuda:")
    refused([*base, "--intervals", "c1=3,c1=5"], capsys, "'c1'", "c1=3,c1=5", "twice")
    assert not (tmp_path / "o").exists()


def test_generate_refuses_unknown_compile_backend_before_loading(tmp_path, capsys, no_model):
    argv = ["generate", "--base", "tiny-sd15", "--prompt", "x", "--out", str(tmp_path / "o"), "--quiet"]
    refused([*argv, "--compile", "nosuch"], capsys, "'nosuch'", "inductor")
    assert not (tmp_path / "o").exists()


def test_sweep_refuses_an_empty_or_repeated_method_list(tmp_path, capsys, no_model):
    argv = ["sweep", "--testbed", "composlora", "--lora-dir", str(tmp_path), "--base", "tiny-sd15"]
    argv += ["--out", str(tmp_path / "run"), "--quiet"]
    refused([*argv, "--methods", ","], capsys, "--methods ','", "names no method")
    refused([*argv, "--methods", " , "], capsys, "names no method")
    refused([*argv, "--methods", "merge,switch,merge"], capsys, "repeats merge")
    assert not (tmp_path / "run").exists()


def test_generate_and_profile_judge_lora_files_before_loading(tmp_path, capsys, no_model):
    """A LoRA file that its header (or its kind, or its extension) already condemns is refused
    before the model loads, by generate and by profile."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    (tmp_path / "old.ckpt").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo.safetensors")
    cases = [(garbage, "not valid JSON"), (tmp_path / "old.ckpt", "--allow-pickle")]
    cases += [(tmp_path / "fifo.safetensors", "named pipe")]
    before = listing(tmp_path)
    for path, fragment in cases:
        for command in ("generate", "profile"):
            argv = [command, "--base", "tiny-sd15", "--lora", f"{path}:0.5", "--out", str(tmp_path / "o")]
            refused(argv, capsys, str(path), fragment)
    assert listing(tmp_path) == before


def sweep_argv(tmp_path: Path) -> list[str]:
    """A sweep over a two-LoRA info file whose LoRA files exist (their contents are read only after
    the model loads, which these tests never reach)."""
    loras = tmp_path / "loras"
    loras.mkdir()
    info = {}
    for category in ("character", "background"):
        info[category] = [{"id": f"{category}_1", "name": category, "trigger": [category], "url": ""}]
        (loras / f"{category}_1.safetensors").write_bytes(b"")
    (tmp_path / "info.json").write_text(json.dumps(info))
    return [
        "sweep",
        "--testbed",
        "composlora",
        "--info",
        str(tmp_path / "info.json"),
        "--lora-dir",
        str(loras),
    ]


def test_named_input_files_are_checked_before_loading(tmp_path, capsys, no_model):
    """A missing --profile, or a --lora-dir without the testbed's files, is refused before the model
    loads and before the run folder is started."""
    fifo = tmp_path / "profile.json"
    os.mkfifo(fifo)
    gen = ["generate", "--base", "tiny-sd15", "--prompt", "x", "--out", str(tmp_path / "o"), "--quiet"]
    refused([*gen, "--profile", str(tmp_path / "none.json")], capsys, "none.json", "cmlora profile")
    refused([*gen, "--profile", str(fifo)], capsys, "profile.json", "named pipe")
    sweep = [*sweep_argv(tmp_path), "--n", "2", "--base", "tiny-sd15", "--out", str(tmp_path / "run")]
    before = listing(tmp_path)
    refused([*sweep, "--lora-dir", str(tmp_path / "nowhere")], capsys, "nowhere", "no such file")
    refused([*sweep, "--profile", str(fifo)], capsys, "named pipe")
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- output folders


def _unwritable_outs(tmp_path: Path) -> list[tuple[Path, str]]:
    (tmp_path / "a_file").write_text("x")
    outs = [(tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "sub", "lies under")]
    if os.geteuid() != 0:  # root ignores permissions; a path under a file fails for root too
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        outs.append((locked / "sub", "cannot write"))
    return outs


def test_generate_checks_the_output_folder_before_loading_a_model(tmp_path, capsys, no_model):
    outs = _unwritable_outs(tmp_path)
    before = listing(tmp_path)
    for out, fragment in outs:
        argv = ["generate", "--base", "tiny-sd15", "--prompt", "x", "--out", str(out), "--quiet"]
        refused(argv, capsys, str(out), fragment)
    assert listing(tmp_path) == before


def test_sweep_checks_the_output_folder_before_loading_a_model(tmp_path, capsys, no_model):
    outs = _unwritable_outs(tmp_path)
    argv = [*sweep_argv(tmp_path), "--n", "2", "--base", "tiny-sd15", "--quiet"]
    before = listing(tmp_path)
    for out, fragment in outs:
        refused([*argv, "--out", str(out)], capsys, str(out), fragment)
    assert listing(tmp_path) == before


def test_profile_checks_its_output_file_before_loading_a_model(tmp_path, capsys, no_model):
    (tmp_path / "a_file").write_text("x")
    before = listing(tmp_path)
    for out, fragment in ((tmp_path / "a_file" / "p.json", "not a folder"), (tmp_path, "directory")):
        refused(["profile", "--base", "tiny-sd15", "--out", str(out), "--quiet"], capsys, str(out), fragment)
    assert listing(tmp_path) == before


def test_output_check_leaves_nothing_behind(tmp_path):
    from cmlora.paths import check_output_dir

    target = tmp_path / "new" / "deeper"
    check_output_dir(target)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- pickled base models


@pytest.fixture(scope="module")
def pickled_folder(tmp_path_factory, sd15):
    folder = tmp_path_factory.mktemp("pickled")
    sd15.save_pretrained(folder, safe_serialization=False)
    assert list(folder.glob("unet/*.bin")) and not list(folder.glob("unet/*.safetensors"))
    return folder


def test_pickled_base_folder_needs_allow_pickle(pickled_folder, sd15_loras, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--base", str(pickled_folder), "--lora", str(sd15_loras[0]), "--prompt", "x"]
    argv += ["--steps", "1", "--size", "16x16", "--out", str(out), "--quiet"]
    line = refused(argv, capsys, "diffusion_pytorch_model.bin", "--allow-pickle")
    assert "pickle" in line
    assert not out.exists()
    assert main([*argv, "--allow-pickle"]) == 0
    assert len(list(out.glob("*.png"))) == 1


def test_pickled_vae_needs_allow_pickle(sd15, tmp_path):
    from cmlora.errors import OptionError
    from cmlora.testbed.presets import apply_pipeline_settings
    from cmlora.tiny import tiny_sd15_pipeline

    sd15.vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    pipe = tiny_sd15_pipeline(seed=1)
    with pytest.raises(OptionError, match="--allow-pickle"):
        apply_pipeline_settings(pipe, None, str(tmp_path / "vae"))
    apply_pipeline_settings(pipe, None, str(tmp_path / "vae"), allow_pickle=True)

"""The command line: help, generate from a local diffusers folder, records, errors, interruptions."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cmlora.app.cli import build_parser, main
from cmlora.records import read_record


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = [a for a in parser._subparsers._group_actions[0].choices]
    assert {"generate", "sweep", "profile", "fft", "plot-trace", "eval", "report"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: cmlora" in capsys.readouterr().out


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory, sd15):
    folder = tmp_path_factory.mktemp("sd15-folder")
    sd15.save_pretrained(folder, safe_serialization=True)
    return folder


def test_generate_from_local_folder_writes_png_and_sidecar(sd15_folder, sd15_loras, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "--base",
            str(sd15_folder),
            "--lora",
            f"{sd15_loras[0]}:0.8:character",
            "--lora",
            f"{sd15_loras[1]}::background",
            "--method",
            "cmlora",
            "--variant",
            "reference",
            "--cache-interval",
            "2",
            "--prompt",
            "red hair",
            "--steps",
            "3",
            "--size",
            "16x16",
            "--num-images",
            "2",
            "--seed",
            "5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000-cmlora-reference-s5.png", "00001-cmlora-reference-s6.png"]
    printed = capsys.readouterr().out
    assert str(pngs[0]) in printed and "cached UNet calls" in printed
    chunk, sidecar = read_record(pngs[0]), json.loads(pngs[0].with_suffix(".json").read_text())
    assert chunk == sidecar
    assert sidecar["loras"][0]["weight"] == 0.8 and sidecar["loras"][1]["category"] == "background"
    assert sidecar["options"]["cache_interval"] == 2 and sidecar["seed"] == 5
    assert sidecar["full_calls"] == 2 + (3 - 1) // 2
    assert Image.open(pngs[0]).size == (16, 16)


def test_bad_lora_file_exit_2_and_nothing_written(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    out = tmp_path / "out"
    code = main(
        ["generate", "--base", "tiny-sd15", "--lora", str(bad), "--prompt", "x", "--out", str(out), "--quiet"]
    )
    assert code == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--size", "20x16"], "multiple of 8"),
        (["--steps", "0"], "num_inference_steps"),
        (["--method", "switch", "--variant", "online"], "unknown switch variant 'online'"),
        (["--method", "merge", "--variant", "online"], "method 'merge' has no variants"),
        (["--method", "cmlora-online", "--variant", "async"], "already names a variant"),
        (["--method", "merge", "--tau", "3"], "does not apply to method 'merge'"),
        (["--method", "cmlora", "--cache-interval", "0"], "cache_interval"),
        (["--method", "sideways"], "unknown method"),
    ],
)
def test_bad_options_exit_2(argv, fragment, sd15_loras, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--base",
            "tiny-sd15",
            "--lora",
            str(sd15_loras[0]),
            "--prompt",
            "x",
            "--out",
            str(tmp_path),
            "--quiet",
            *argv,
        ]
    )
    assert code == 2
    assert fragment in capsys.readouterr().err


def test_disk_full_leaves_no_partial_file(monkeypatch, sd15_loras, tmp_path, capsys):
    import cmlora.files as files

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    code = main(
        [
            "generate",
            "--base",
            "tiny-sd15",
            "--lora",
            str(sd15_loras[0]),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--size",
            "16x16",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "disk full" in capsys.readouterr().err
    assert list((tmp_path / "o").iterdir()) == []


def test_sigterm_during_generate_leaves_only_complete_files(sd15_loras, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, torch; torch.set_num_threads(1); from cmlora.app.cli import main; "
            "sys.exit(main(sys.argv[1:]))",
            "generate",
            "--base",
            "tiny-sd15",
            "--lora",
            str(sd15_loras[0]),
            "--prompt",
            "x",
            "--steps",
            "30",
            "--size",
            "32x32",
            "--num-images",
            "500",
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    # generate numbers its files on and never resumes: it must not promise to
    assert "does not resume" in err and "re-run the same command to resume" not in err
    pngs, sidecars = sorted(out.glob("*.png")), sorted(out.glob("*.json"))
    assert len(pngs) >= 2
    # every PNG is whole (opens, carries its record) and has its sidecar; at most the image being saved
    # at the signal may lack a sidecar, and no temporary file survives
    for png in pngs:
        assert read_record(png)["prompt"] == "x"
    assert len(pngs) - len(sidecars) in (0, 1)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_fft_writes_one_figure_and_scores(tmp_path, capsys):
    import numpy as np

    yy, xx = np.indices((64, 64)) - 32
    smooth = (255 * np.exp(-(xx**2 + yy**2) / 300.0)).astype(np.uint8)  # periodic-safe: ~0 at the edges
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    paths = []
    for name, array in (("smooth.png", smooth), ("noise.png", noise)):
        Image.fromarray(array).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    assert main(["fft", *paths, "--out", str(tmp_path / "spectra.png")]) == 0
    printed = capsys.readouterr().out
    scores = {
        line.split(":")[0]: float(line.rsplit(" ", 1)[1]) for line in printed.splitlines() if "score" in line
    }
    assert scores["noise.png"] > 0.5 > 0.1 > scores["smooth.png"]
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_per_lora_intervals(sd15_loras, tmp_path):
    first, second = (Path(p).stem for p in sd15_loras[:2])
    argv = ["generate", "--base", "tiny-sd15", "--lora", str(sd15_loras[0]), "--lora", str(sd15_loras[1])]
    argv += ["--method", "cmlora", "--intervals", f"{first}=1,{second}=4", "--prompt", "x", "--steps", "4"]
    argv += ["--size", "16x16", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["options"]["intervals"] == {first: 1, second: 4}
    # the second LoRA's refreshes are offset by its position (spread): steps 0, 1, 5, ...
    assert [step["full"] for step in record["trace"]] == [[first, second], [first, second], [first], [first]]
    with pytest.raises(SystemExit):
        main([*argv[:-3], "--intervals", "oops", "--out", str(tmp_path), "--quiet"])


def test_generate_compile_flag_compiles_the_session_once(sd15_folder, sd15_loras, tmp_path, monkeypatch):
    from cmlora.api import Composer

    calls = []
    monkeypatch.setattr(Composer, "compile", lambda self, **options: calls.append(options))
    args = ["generate", "--base", str(sd15_folder), "--lora", str(sd15_loras[0]), "--prompt", "red"]
    args += ["--steps", "1", "--size", "16x16", "--num-images", "2", "--out", str(tmp_path), "--quiet"]
    assert main([*args, "--compile"]) == 0
    assert main([*args, "--compile", "eager"]) == 0
    assert main(args) == 0
    assert calls == [{"backend": "inductor"}, {"backend": "eager"}]


def test_generate_no_fuse_flag_runs_merge_unfused(sd15_folder, sd15_loras, tmp_path):
    records = {}
    for flag in ((), ("--no-fuse",)):
        out = tmp_path / ("unfused" if flag else "fused")
        argv = ["generate", "--base", str(sd15_folder), "--lora", str(sd15_loras[0]), "--lora"]
        argv += [str(sd15_loras[1]), "--method", "merge", "--prompt", "red", "--steps", "2"]
        assert main([*argv, "--size", "16x16", "--out", str(out), "--quiet", *flag]) == 0
        records[bool(flag)] = json.loads(next(out.glob("*.json")).read_text())
    assert (records[False]["fused_loras"], records[True]["fused_loras"]) == (True, False)
    assert records[False]["macs"] < records[True]["macs"]


def test_interrupt_message_promises_resume_only_where_it_holds():
    from cmlora.app.cli import build_parser

    parser = build_parser()
    resumes = {
        "sweep": ["sweep", "--testbed", "mini", "--out", "x"],
        "eval concepts": ["eval", "concepts", "run"],
        "generate": ["generate", "--lora", "character_1"],
        "fft": ["fft", "a.png"],
    }
    got = {name: getattr(parser.parse_args(argv), "resumes", False) for name, argv in resumes.items()}
    assert got == {"sweep": True, "eval concepts": True, "generate": False, "fft": False}

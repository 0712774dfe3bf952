"""`cmlora sweep` through the real engine on a tiny pipeline: records, manifest, and sharding."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cmlora.tiny import tiny_sd15_pipeline, write_random_lora

CATEGORIES = ("character", "clothing", "background")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("testbed")
    pipe = tiny_sd15_pipeline()
    info = {}
    for k, category in enumerate(CATEGORIES):
        ids = [f"{category}_{i}" for i in (1, 2)] if category != "clothing" else [f"{category}_1"]
        info[category] = [{"id": i, "name": i, "trigger": [f"red {i.split('_')[0]}"], "url": ""} for i in ids]
        for j, lora_id in enumerate(ids):
            write_random_lora(pipe, folder / f"{lora_id}.safetensors", seed=10 * k + j, rank=2)
    (folder / "info.json").write_text(json.dumps(info))
    return folder


def sweep_argv(testbed, out):
    return [
        "sweep",
        "--testbed",
        "composlora",
        "--info",
        str(testbed / "info.json"),
        "--lora-dir",
        str(testbed),
        "--base",
        "tiny-sd15",
        "--n",
        "2,3",
        "--methods",
        "merge,cmlora-offline",
        "--steps",
        "3",
        "--size",
        "16x16",
        "--seeds",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
    ]


def run_cli(argv, env=None):
    code = "import sys, torch; torch.set_num_threads(1); from cmlora.app.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300
    )


def test_sweep_single_and_sharded_are_identical(testbed, tmp_path):
    from cmlora.app.cli import main

    single = tmp_path / "single"
    assert main(sweep_argv(testbed, single)) == 0
    lines = [json.loads(line) for line in (single / "manifest.jsonl").read_text().splitlines()]
    # compositions: character x (clothing | background) for N=2 (2*(1+2)=6), N=3: 2*1*2 = 4; two methods
    assert len(lines) == (6 + 4) * 2
    first = lines[0]
    assert first["method"] == "merge" and first["method_name"] == "merge" and first["n"] == 2
    assert first["full_calls"] == 3 and first["lora_files"][0]["sha256"]
    assert first["prompt"].endswith("red character, red clothing")
    assert {x["name"] for x in first["loras"]} == {"character_1", "clothing_1"}
    assert len(list((single / "sheets").glob("*.png"))) == 10
    assert main(sweep_argv(testbed, single)) == 0  # resume: nothing left, nothing duplicated
    assert len((single / "manifest.jsonl").read_text().splitlines()) == 20

    sharded = tmp_path / "sharded"
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys, torch; torch.set_num_threads(1); from cmlora.app.cli import main; "
                    "sys.exit(main(sys.argv[1:]))",
                    *sweep_argv(testbed, sharded),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    import numpy as np
    from PIL import Image

    pngs = sorted((single / "images").glob("*.png"))
    assert len(pngs) == 20
    for png in pngs:  # same pixels (the PNG text chunk holds timings, which differ)
        assert np.array_equal(
            np.asarray(Image.open(png)), np.asarray(Image.open(sharded / "images" / png.name))
        )

    def stable(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            for key in ("seconds", "unet_seconds", "loop_seconds", "device"):
                row.pop(key, None)
        return rows

    assert stable(single / "manifest.jsonl") == stable(sharded / "manifest.jsonl")


def test_sweep_batch_size_denoises_seeds_together(testbed, tmp_path):
    import numpy as np
    from PIL import Image

    from cmlora.app.cli import main

    images = {}
    for batch in (1, 2):
        out = tmp_path / f"b{batch}"
        argv = sweep_argv(testbed, out)
        argv[argv.index("--seeds") + 1] = "2"
        assert main([*argv, "--limit", "2", "--batch-size", str(batch)]) == 0
        rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(rows) == 2 * 2 * 2 and {r["batch_size"] for r in rows} == {batch}
        images[batch] = {r["image"]: np.asarray(Image.open(out / r["image"]), dtype=np.float32) for r in rows}
    assert images[1].keys() == images[2].keys()
    for name, pixels in images[1].items():
        assert np.abs(pixels - images[2][name]).max() <= 1.0


def test_sweep_refuses_changed_settings(testbed, tmp_path):
    from cmlora.app.cli import main

    out = tmp_path / "run"
    argv = sweep_argv(testbed, out)
    argv[argv.index("--n") + 1] = "2"
    assert main(argv) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    # the published pipeline: fp32 (not auto's fp16 on CUDA), DPM-Solver++; own info file: base's VAE
    assert (settings["dtype"], settings["scheduler"], settings["vae"]) == ("fp32", "dpmsolver++", None)
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["scheduler"] == "DPMSolverMultistepScheduler"
    assert record["scheduler_config"]["algorithm_type"] == "dpmsolver++"
    argv[argv.index("--steps") + 1] = "4"
    assert main(argv) == 2


def _sweep_args(*extra):
    from cmlora.app.cli import build_parser

    return build_parser().parse_args(["sweep", "--out", "o", *extra])


@pytest.mark.parametrize(
    ("style", "preset", "expected"),
    [
        ("reality", "zhong", (768, 1024, 100, 7.0, 0.8, 111, "stabilityai/sd-vae-ft-mse")),
        ("anime", "zhong", (512, 512, 200, 10.0, 0.8, 111, None)),
        ("anime", "cmlora", (512, 512, 220, 8.5, 1.0, 222, None)),
    ],
)
def test_composlora_defaults_are_the_published_settings(style, preset, expected):
    from cmlora.app.sweep import _testbed

    args = _sweep_args(
        "--testbed", "composlora", "--style", style, "--preset", preset, "--lora-dir", "L", "--base", "B"
    )
    comps, defaults = _testbed(args)
    keys = ("width", "height", "steps", "guidance", "lora_scale", "base_seed", "vae")
    assert tuple(defaults[k] for k in keys) == expected
    assert defaults["scheduler"] == "dpmsolver++"
    assert len(comps) == 240 and comps[0].id == f"{style}-n2-character_1+clothing_1"


def test_sweep_option_errors():
    from cmlora.app.sweep import _testbed
    from cmlora.errors import OptionError

    base = ("--testbed", "composlora", "--lora-dir", "L", "--base", "B")
    with pytest.raises(OptionError, match="comma-separated integers"):
        _testbed(_sweep_args(*base, "--n", "2,x"))
    with pytest.raises(OptionError, match="--limit must be >= 1"):
        _testbed(_sweep_args(*base, "--limit", "-1"))
    comps, _ = _testbed(_sweep_args(*base, "--n", "5,2", "--limit", "50"))
    assert [c.n for c in comps] == [5] * 48 + [2] * 2


def test_apply_pipeline_settings(tmp_path):
    from diffusers import PNDMScheduler

    from cmlora.errors import OptionError
    from cmlora.testbed.presets import apply_pipeline_settings

    pipe = tiny_sd15_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)  # what SD-1.5 checkpoints ship
    other_vae = tiny_sd15_pipeline(seed=5).vae
    other_vae.save_pretrained(tmp_path / "vae")
    apply_pipeline_settings(pipe, "dpmsolver++", str(tmp_path / "vae"))
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # the checkpoint's own betas kept
    loaded, expected = pipe.vae.state_dict(), other_vae.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    vae_before = pipe.vae
    apply_pipeline_settings(pipe, None, None)  # mini world / --vae none: nothing changes
    assert pipe.vae is vae_before
    with pytest.raises(OptionError, match="--vae none"):
        apply_pipeline_settings(pipe, None, str(tmp_path / "missing"))


def test_mini_testbed_has_240_compositions():
    from collections import Counter

    from cmlora.app.sweep import _testbed
    from cmlora.models import mini_available

    if not mini_available():
        pytest.skip("mini world assets not installed")
    comps, defaults = _testbed(_sweep_args("--testbed", "mini"))
    assert Counter(c.n for c in comps) == {2: 24, 3: 72, 4: 96, 5: 48}
    assert len({c.id for c in comps}) == 240 and all(c.id.startswith("mini-n") for c in comps)
    assert "vae" not in defaults and "scheduler" not in defaults  # the bundled pipeline is used as is


def test_process_device():
    from cmlora.app.sweep import process_device

    assert process_device("auto", 0, 1, 0) == "auto"  # no GPU: the usual choice (CPU)
    assert process_device("auto", 1, 2, 2) == "cuda:1"  # accelerate launch: one GPU per process
    assert process_device("cuda", 3, 4, 2) == "cuda:1"  # more processes than GPUs: wrap round
    assert process_device("cuda", 0, 1, 2) == "cuda"  # single process: as given
    assert process_device("cuda:0", 1, 2, 2) == "cuda:0"
    assert process_device("cpu", 1, 2, 2) == "cpu"

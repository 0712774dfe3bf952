"""`cmlora sweep` through the real engine on a tiny pipeline: records, manifest, and sharding."""

import json
import os
import subprocess
import sys

import pytest

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
    code = "import sys, torch; torch.set_num_threads(1); from cmlora.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300
    )


def test_sweep_single_and_sharded_are_identical(testbed, tmp_path):
    from cmlora.cli import main

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
                    "import sys, torch; torch.set_num_threads(1); from cmlora.cli import main; "
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
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(sharded / "images" / png.name)))

    def stable(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            for key in ("seconds", "unet_seconds", "loop_seconds", "device"):
                row.pop(key, None)
        return rows

    assert stable(single / "manifest.jsonl") == stable(sharded / "manifest.jsonl")


def test_sweep_refuses_changed_settings(testbed, tmp_path):
    from cmlora.cli import main

    out = tmp_path / "run"
    argv = sweep_argv(testbed, out)
    argv[argv.index("--n") + 1] = "2"
    assert main(argv) == 0
    argv[argv.index("--steps") + 1] = "4"
    assert main(argv) == 2

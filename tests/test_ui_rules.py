"""``cmlora ui`` without a browser: the guard, the allowed files, the form caps and the command.

Fast: no model is loaded except a stub; the guard runs on a tiny ASGI app. The live server and
the browser are in ``test_ui_browser.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from cmlora.app.ui import INSTALL_HINT, add_ui_subcommand
from cmlora.app.ui.files import AllowedFiles
from cmlora.app.ui.form import Form, ModelDefaults, build_requests, form_from_record
from cmlora.app.ui.guard import RequestGuard, check_bind, host_name, is_loopback
from cmlora.errors import OptionError

MINI = Path(__file__).resolve().parents[1] / "src" / "cmlora" / "mini" / "assets"
LORAS = {
    "character_2": {
        "file": str(MINI / "loras" / "character_2.safetensors"),
        "category": "character",
        "triggers": ["nekomi"],
    },
    "background_1": {
        "file": str(MINI / "loras" / "background_1.safetensors"),
        "category": "background",
        "triggers": ["sunsetbg"],
    },
}
DEFAULTS = ModelDefaults(size=64, steps=20, guidance=5.0, prompt="a picture", negative_prompt="")


class _Base:
    """The parts of a BaseModel the form reads (no pipeline needed to check a request)."""

    name = "mini"
    profile = None

    def profile_for(self, method, variant, files, options, given=None):
        return given


@pytest.fixture
def files(tmp_path):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    return AllowedFiles(LORAS, lora_dir, tmp_path / "uploads")


def _form(**change) -> Form:
    fields = dict(
        rows=[["character_2", 1.0, "character", 1], ["background_1", 0.8, "background", 2]],
        prompt="nekomi",
        methods=["merge", "cmlora-offline"],
        seed=3,
        steps=3,
        width=64,
        height=64,
        guidance=5.0,
    )
    return Form(**{**fields, **change})


# --------------------------------------------------------------------------- files


def test_paths_outside_the_allowed_folders_are_refused_by_stat_alone(files, tmp_path):
    secret = tmp_path / "secret.safetensors"
    secret.write_text("root:x:0:0:root:/root:/bin/bash")
    link = files.lora_dir / "passwd.safetensors"
    link.symlink_to("/etc/passwd")
    fifo = files.lora_dir / "pipe.safetensors"
    os.mkfifo(fifo)
    zero = files.lora_dir / "zero.json"
    zero.symlink_to("/dev/zero")
    cases = {
        str(secret): "is outside the folders this app may read",
        str(link): "(it resolves to '/etc/passwd') is outside the folders this app may read",
        "/dev/zero": "'/dev/zero' is outside the folders this app may read",
        str(zero): "(it resolves to '/dev/zero') is outside",
        str(fifo): "is a named pipe (FIFO), not a regular file",
        str(files.lora_dir / "missing.safetensors"): "no such file",
    }
    tracemalloc.start()
    try:
        for path, message in cases.items():
            with pytest.raises(OptionError) as refused:
                files.check(path, "LoRA file")
            assert message in str(refused.value) and str(refused.value).startswith(f"LoRA file {path!r}")
            assert "root:x" not in str(refused.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # nothing was read
    # the catalog lists none of them, and the page can name only catalog entries
    assert sorted(files.loras()) == ["background_1", "character_2"]
    big = files.lora_dir / "big.safetensors"
    big.write_bytes(b"\0" * 2048)
    small = AllowedFiles(LORAS, files.lora_dir, tmp_path / "uploads", max_lora_bytes=1024)
    with pytest.raises(OptionError, match=r"is 0.0 MB; the limit is 0.0 MB"):
        small.check(big, "LoRA file")


def test_a_profile_path_from_the_page_is_checked_like_a_lora(files):
    for path, message in (("/dev/zero", "outside the folders"), ("/etc/passwd", "outside the folders")):
        with pytest.raises(OptionError, match=message):
            build_requests(_form(profile=path), files, _Base(), DEFAULTS)


def test_uploads_take_safetensors_and_json_only(files, tmp_path):
    source = tmp_path / "x.ckpt"
    source.write_bytes(b"pickle")
    with pytest.raises(OptionError, match=r"upload 'x.ckpt': only .safetensors LoRAs and .json profiles"):
        files.add_upload(source, "x.ckpt")
    lora = tmp_path / "my lora (v2).safetensors"
    lora.write_bytes(Path(LORAS["character_2"]["file"]).read_bytes())
    assert files.add_upload(lora, lora.name) == "my_lora__v2_.safetensors"
    entry = files.loras()["my_lora__v2_"]
    assert entry.origin == "upload" and entry.file.parent == files.upload_dir


# --------------------------------------------------------------------------- form caps


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "x" * 31_000_000}, "the prompt is 31000000 characters; the limit is 2000"),
        (
            {"methods": ["merge", "switch", "composite", "cmlora-offline", "cmlora-online"]},
            "5 methods chosen; the limit is 4 per job",
        ),
        ({"steps": 1000}, "steps must be an integer in [1, 200], got 1000"),
        ({"width": 8192}, "width must be in [8, 1024] pixels, got 8192"),
        (
            {"steps": 200, "width": 128, "height": 128},
            "this job is too large: 2 methods x 200 steps x 128x128 px is 1600 method-steps at 64 px; "
            "the limit is 400",
        ),
        ({"steps": "many"}, "steps must be an integer, got 'many'"),
        ({"height": 60}, "height must be a positive multiple of 8, got 60"),
        ({"methods": []}, "choose at least one method"),
        ({"methods": ["magic"]}, "unknown method(s) ['magic']"),
        ({"rows": [["nobody", 1, "", 1]]}, "unknown LoRA 'nobody': choose one of background_1, character_2"),
        ({"rows": [["character_2", 1, "hat", 1]]}, "LoRA 'character_2': unknown category 'hat'"),
        ({"options": '{"bogus": 1}'}, "method option(s) ['bogus'] apply to none of the chosen methods"),
        ({"options": '{"tau": 0}', "methods": ["switch"]}, "tau"),
        ({"options": "[1]"}, "method options must be a JSON object"),
    ],
)
def test_oversized_or_bad_jobs_are_refused_with_a_clear_message(files, change, message):
    tracemalloc.start()
    try:
        with pytest.raises(OptionError) as refused:
            build_requests(_form(**change), files, _Base(), DEFAULTS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(refused.value)
    assert peak < 2_000_000  # the check holds no copies of the (possibly huge) input


def test_requests_follow_the_table_order_and_carry_each_methods_options(files):
    form = _form(
        rows=[["background_1", 0.8, "background", 2], ["character_2", 1.0, "character", 1]],
        methods=["switch", "cmlora-offline"],
        options='{"tau": 2, "cache_interval": 2}',
    )
    switch, cmlora = build_requests(form, files, _Base(), DEFAULTS)
    assert [lora.name for lora in switch.loras] == ["character_2", "background_1"]
    assert (switch.label, dict(switch.options)) == ("switch", {"tau": 2})
    assert (cmlora.label, dict(cmlora.options)) == ("cmlora-offline", {"cache_interval": 2})
    assert switch.seeds == (3,) and switch.steps == 3 and switch.loras[0].triggers == ("nekomi",)


def test_a_record_maps_back_to_catalog_names_and_refuses_foreign_files(files):
    record = {
        "method": "switch",
        "method_label": "switch",
        "options": {"text_encoder": "first", "tau": 2, "order": ["character_2"]},
        "loras": [
            {
                "name": "character_2",
                "file": LORAS["character_2"]["file"],
                "weight": 0.5,
                "category": "character",
            }
        ],
        "steps": 4,
        "seed": 9,
        "width": 64,
        "height": 64,
    }
    form = form_from_record(record, files)
    assert form.rows == [["character_2", 0.5, "character", 1]]
    assert json.loads(form.options) == {"text_encoder": "first", "tau": 2} and form.methods == ["switch"]
    foreign = {**record, "loras": [{"name": "shadow", "file": "/etc/shadow"}]}
    with pytest.raises(OptionError, match=r"'/etc/shadow' is outside the folders this app may read"):
        form_from_record(foreign, files)
    with pytest.raises(OptionError, match="not a cmlora record"):
        form_from_record({"hello": 1}, files)


# --------------------------------------------------------------------------- guard


def _guarded(names=("127.0.0.1", "localhost", "::1"), max_body=1000):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def echo(request: Request):
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(routes=[Route("/", echo, methods=["GET", "POST"])])
    return TestClient(RequestGuard(app, names=names, max_body=max_body), base_url="http://127.0.0.1:7860")


def test_guard_refuses_foreign_hosts_cross_site_requests_and_large_bodies():
    client = _guarded()
    ok = client.post("/", content=b"x" * 10)
    assert ok.status_code == 200 and ok.json() == {"bytes": 10}
    assert (
        ok.headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in ok.headers["content-security-policy"]
    )
    refusals = [
        ({"host": "evil.example:7860"}, 403, "host 'evil.example' refused"),
        ({"origin": "http://evil.example"}, 403, "cross-origin request from 'http://evil.example' refused"),
        ({"origin": "http://127.0.0.1:9999"}, 403, "cross-origin request"),
        ({"origin": "null"}, 403, "cross-site request refused"),
        ({"sec-fetch-site": "cross-site"}, 403, "cross-site request refused"),
    ]
    for headers, status, message in refusals:
        answer = client.post("/", content=b"{}", headers=headers)
        assert answer.status_code == status and message in answer.json()["error"], (headers, answer.text)
    assert client.post("/", content=b"{}", headers={"origin": "http://127.0.0.1:7860"}).status_code == 200
    big = client.post("/", content=b"x" * 5000)
    assert (
        big.status_code == 413
        and "request body too large (0.0 MB; the limit is 0.0 MB)" in big.json()["error"]
    )

    def chunks():
        for _ in range(50):
            yield b"x" * 100

    chunked = client.post("/", content=chunks())
    assert chunked.status_code == 413 and "request body too large" in chunked.json()["error"]
    for bad in ("-5", "abc"):
        answer = client.post("/", content=b"{}", headers={"content-length": bad})
        assert answer.status_code == 400 and "is not a byte count" in answer.json()["error"]


def test_loopback_only_unless_remote_is_asked_for_with_a_password():
    assert is_loopback("127.0.0.1") and is_loopback("[::1]") and is_loopback("localhost")
    assert host_name("[::1]:7860") == "::1" and host_name("127.0.0.1:80") == "127.0.0.1"
    assert check_bind("127.0.0.1", False, False) is None
    with pytest.raises(OptionError, match="--allow-remote and --auth-file"):
        check_bind("0.0.0.0", False, False)
    with pytest.raises(OptionError, match="needs --auth-file FILE"):
        check_bind("0.0.0.0", True, False)
    assert check_bind("0.0.0.0", True, True).startswith("WARNING: listening on 0.0.0.0")


# --------------------------------------------------------------------------- command


def test_ui_command_defaults_and_install_hint(monkeypatch, tmp_path):
    from cmlora.app.ui import command
    from cmlora.app.ui.serve import read_auth_file

    parser = argparse.ArgumentParser(prog="cmlora")
    add_ui_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui", "--lora-dir", "d", "--port", "0"])
    assert (args.host, args.port, args.allow_remote, args.auth_file, args.lora_dir) == (
        "127.0.0.1",
        0,
        False,
        None,
        "d",
    )
    monkeypatch.setattr(command, "gradio_missing", lambda: INSTALL_HINT)
    with pytest.raises(OptionError, match=r'pip install "cmlora\[ui\]"'):
        command.cmd_ui(args)
    auth = tmp_path / "auth"
    auth.write_text("# users\nann:correct horse\n")
    assert read_auth_file(str(auth)) == (("ann", "correct horse"),)
    auth.write_text("ann:short\n")
    with pytest.raises(OptionError, match="line 1: write user:password with a password of 8 or more"):
        read_auth_file(str(auth))


def test_every_method_has_help():
    from cmlora.app.ui.help import METHOD_HELP
    from cmlora.methods import METHOD_LABELS

    assert sorted(METHOD_HELP) == sorted(METHOD_LABELS)
    assert all(text.endswith(".") and text.count(". ") == 0 for text in METHOD_HELP.values())

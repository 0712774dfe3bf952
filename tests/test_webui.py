"""``cmlora ui``: the JSON API on a real server (thread, port 0) and the page in headless chromium.

One server for the module (the tiny pipeline, two tiny LoRAs in a --lora-dir): jobs run one at a
time anyway, and starting the pipeline once keeps the added suite time small.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import assert_same_state, pipeline_state

from cmlora.errors import OptionError
from cmlora.webui import check_host, make_app, make_server
from cmlora.webui.server import form_from_record

TERMINAL = ("done", "cancelled", "error")


@contextmanager
def _serving(app):
    """The app on a loopback port in a thread; its URL while the block runs, then all closed."""
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        app.close()


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from cmlora.models import load_base
    from cmlora.tiny import write_random_lora

    base = load_base("tiny-sd15", "cpu", "fp32")
    folder = tmp_path_factory.mktemp("ui-loras")
    write_random_lora(base.pipe, folder / "hero.safetensors", seed=1, rank=2)
    write_random_lora(base.pipe, folder / "forest.safetensors", seed=2, rank=2)
    app = make_app(base, folder)
    with _serving(app) as url:
        yield {"url": url, "app": app, "base": base, "folder": folder}


@pytest.fixture(scope="module")
def mini_ui():
    """The app as `cmlora ui` starts it with no options: the embedded mini model and its LoRAs."""
    from cmlora.models import load_base

    app = make_app(load_base(None, "cpu", "fp32"))
    with _serving(app) as url:
        yield {"url": url, "app": app}


def call(url: str, path: str, body: object | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait(url: str, job_id: str, until=lambda s: s["state"] in TERMINAL, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = call(url, f"/api/jobs/{job_id}")[1]
        if until(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


JOB = {
    "loras": [
        {"name": "hero", "weight": 1.0, "category": "character"},
        {"name": "forest", "weight": 0.8, "category": "background"},
    ],
    "methods": ["merge", "cmlora-offline"],
    "prompt": "a photo",
    "seed": 3,
    "steps": 3,
    "width": 16,
    "height": 16,
    "guidance": 7.5,
}


def test_two_methods_side_by_side_with_records(ui):
    from PIL import Image

    url = ui["url"]
    status, loras = call(url, "/api/loras")
    assert status == 200 and sorted(lora["name"] for lora in loras["loras"]) == ["forest", "hero"]
    status, job = call(url, "/api/jobs", JOB)
    assert status == 200, job
    done = wait(url, job["id"])
    assert done["state"] == "done", done
    results = {r["method_label"]: r for r in done["results"]}
    assert list(results) == ["merge", "cmlora-offline"]
    assert (results["merge"]["full_calls"], results["merge"]["cached_calls"]) == (3, 0)
    # cmlora with 2 LoRAs: every LoRA full at step 0, then most calls cached.
    cm = results["cmlora-offline"]
    assert cm["full_calls"] + cm["cached_calls"] == 6 and cm["full_calls"] >= 2 and cm["cached_calls"] >= 1
    assert all(p["step"] == 3 and p["state"] == "done" for p in done["methods"])
    assert all(r["seconds"] > 0 and r["macs"] > 0 for r in results.values())

    with urllib.request.urlopen(url + cm["image_url"], timeout=10) as response:
        png = response.read()
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (16, 16)
        record = json.loads(image.info["cmlora"])
    assert record["method_label"] == "cmlora-offline" and record["seed"] == 3
    assert [lora["name"] for lora in record["loras"]] == ["hero", "forest"]
    with urllib.request.urlopen(url + cm["record_url"] + "?download=x", timeout=10) as response:
        assert "attachment" in response.headers["Content-Disposition"]
        assert json.loads(response.read())["full_calls"] == cm["full_calls"]

    # The record pasted back gives the same request, and regenerates the same image.
    status, parsed = call(url, "/api/parse-record", {"text": json.dumps(record)})
    assert status == 200
    form = parsed["form"]
    assert form["methods"] == ["cmlora-offline"] and form["steps"] == 3 and form["seed"] == 3
    assert [(lora["name"], lora["weight"], lora["category"]) for lora in form["loras"]] == [
        ("hero", 1.0, "character"),
        ("forest", 0.8, "background"),
    ]
    again = wait(url, call(url, "/api/jobs", form)[1]["id"])
    assert again["state"] == "done", again
    with urllib.request.urlopen(url + again["results"][0]["image_url"], timeout=10) as response:
        with Image.open(io.BytesIO(response.read())) as image2, Image.open(io.BytesIO(png)) as image1:
            assert image2.tobytes() == image1.tobytes()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 0}, "steps must be an integer in [1, 1000]"),
        ({"height": 20}, "height must be a positive multiple of 8"),
        ({"steps": "many"}, "steps must be an integer"),
        ({"methods": ["magic"]}, "unknown method 'magic'"),
        ({"methods": []}, "choose at least one method"),
        ({"loras": [{"name": "nobody"}]}, "unknown LoRA 'nobody'"),
        ({"loras": [{"name": "x", "file": "/no/such/file.safetensors"}]}, "does not exist"),
        ({"profile": "/no/such/profile.json"}, "does not exist"),
        ({"options": '{"tau": 0}', "methods": ["switch"]}, "tau"),
        ({"options": '{"bogus": 1}'}, "apply to none of the chosen methods"),
    ],
)
def test_bad_input_is_a_400_with_a_clear_message(ui, change, message):
    status, answer = call(ui["url"], "/api/jobs", {**JOB, **change})
    assert status == 400 and message in answer["error"], answer


def test_errors_leave_the_server_working(ui):
    url = ui["url"]
    assert call(url, "/api/jobs/nope")[0] == 404
    request = urllib.request.Request(
        url + "/api/jobs", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=10)
    assert bad.value.code == 400
    # A cross-site form post (no JSON content type) is refused before anything runs.
    request = urllib.request.Request(url + "/api/jobs", data=b"{}", headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 415
    # A corrupt LoRA file is found by the run: the job reports it, the next job runs.
    broken = ui["folder"] / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    try:
        job = call(url, "/api/jobs", {**JOB, "loras": [{"name": "broken"}], "methods": ["merge"]})[1]
        failed = wait(url, job["id"])
        assert failed["state"] == "error" and "broken.safetensors" in failed["error"], failed
    finally:
        broken.unlink()
    # A crash in a request handler is a 500 with a short message; the server goes on.
    app = ui["app"]
    app.settings = lambda: 1 / 0
    try:
        status, answer = call(url, "/api/settings")
    finally:
        del app.settings
    assert status == 500 and "ZeroDivisionError" in answer["error"]
    assert call(url, "/api/jobs", {**JOB, "profile": str(ui["folder"])})[0] == 400  # a folder, not a file
    ok = wait(url, call(url, "/api/jobs", {**JOB, "methods": ["merge"]})[1]["id"])
    assert ok["state"] == "done"


def test_cancel_stops_the_job_and_restores_the_pipeline(ui):
    url, pipe = ui["url"], ui["base"].pipe
    before = pipeline_state(pipe)
    job = call(url, "/api/jobs", {**JOB, "methods": ["composite", "merge"], "steps": 1000})[1]
    running = wait(url, job["id"], until=lambda s: s["methods"][0]["step"] >= 1)
    assert running["state"] == "running", running
    call(url, f"/api/jobs/{job['id']}/cancel", {})
    stopped = wait(url, job["id"])
    assert stopped["state"] == "cancelled" and stopped["results"] == []
    assert stopped["methods"][0]["step"] < 1000
    assert_same_state(before, pipeline_state(pipe))
    later = wait(url, call(url, "/api/jobs", {**JOB, "methods": ["merge"]})[1]["id"])
    assert later["state"] == "done" and later["results"][0]["full_calls"] == 3


def test_loopback_only_unless_allowed():
    assert check_host("127.0.0.1", False) is None and check_host("localhost", False) is None
    assert check_host("::1", False) is None
    with pytest.raises(OptionError, match="--allow-remote"):
        check_host("0.0.0.0", False)
    assert "WARNING" in check_host("0.0.0.0", True)


def test_form_from_record_maps_derived_options_back():
    record = {
        "method": "switch",
        "method_label": "switch",
        "options": {"text_encoder": "first", "tau": 2, "order": ["a", "b"]},
        "loras": [{"name": "a", "file": "/x/a.safetensors", "weight": 1.0, "category": "character"}],
        "steps": 4,
        "seed": 1,
    }
    form = form_from_record(record)
    assert form["options"] == {"text_encoder": "first", "tau": 2} and form["methods"] == ["switch"]
    with pytest.raises(OptionError, match="not a cmlora record"):
        form_from_record({"hello": 1})


def test_model_loras_with_triggers_and_demo_fallback(ui):
    from cmlora.models import BaseModel

    base, folder = ui["base"], ui["folder"]
    ids = {
        "hero_1": {
            "file": str(folder / "hero.safetensors"),
            "category": "character",
            "triggers": ["red hair"],
        }
    }
    app = make_app(BaseModel(base.pipe, "mini-like", lora_ids=ids))
    try:
        assert app.catalog() == {"hero_1": {**ids["hero_1"]}}
        spec = app.parse_job({**JOB, "loras": [{"name": "hero_1", "weight": 0.5}]})
        assert spec.loras[0].triggers == ("red hair",) and spec.loras[0].category == "character"
    finally:
        app.close()
    demo = make_app(BaseModel(base.pipe, "tiny-sd15", note="tiny random"))  # no LoRAs of its own
    try:
        catalog = demo.catalog()
        assert {k: v["category"] for k, v in catalog.items()} == {
            "demo_background": "background",
            "demo_character": "character",
        }
    finally:
        demo.close()
    assert not any(Path(v["file"]).exists() for v in catalog.values())  # temporary demo files removed


def test_ui_subcommand_help():
    import argparse

    from cmlora.webui import add_ui_subcommand

    parser = argparse.ArgumentParser(prog="cmlora")
    add_ui_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui", "--lora-dir", "d", "--port", "0"])
    assert args.host == "127.0.0.1" and args.lora_dir == "d" and args.port == 0 and not args.allow_remote


# --------------------------------------------------------------------------- browser


def _browser():
    chromium, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
    driver = driver or "/usr/bin/chromedriver"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install selenium")
    import os

    if not (os.path.exists(chromium) and os.path.exists(driver)):
        pytest.skip("no chromium/chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def _job_of(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, "status").text.split()[1].rstrip(":")


def test_page_end_to_end_in_headless_chromium(mini_ui):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ui = mini_ui
    browser = _browser()
    try:
        browser.get(ui["url"] + "/")
        wait_for = WebDriverWait(browser, 60, poll_frequency=0.1).until
        wait_for(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        for name in ("character_2", "background_1"):
            browser.find_element(By.ID, f"lora-{name}").click()
        assert len(browser.find_elements(By.CSS_SELECTOR, "#selected tbody tr")) == 2
        # the LoRAs' trigger words are filled into the prompt
        prompt = browser.find_element(By.ID, "prompt").get_attribute("value")
        assert "nekomi" in prompt and "sunsetbg" in prompt, prompt
        for label in ("none", "merge", "switch", "composite", "cmlora-offline"):
            box = browser.find_element(By.ID, f"method-{label}")
            if box.is_selected() != (label in ("merge", "cmlora-offline")):
                box.click()
        for field, value in (("steps", "3"), ("width", "64"), ("height", "64")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait_for(lambda b: b.find_element(By.ID, "status").get_attribute("data-state") in TERMINAL)
        assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done"
        cards = browser.find_elements(By.CSS_SELECTOR, ".result")
        assert [c.find_element(By.TAG_NAME, "h3").text for c in cards] == ["merge", "cmlora-offline"]
        for card in cards:
            image = card.find_element(By.TAG_NAME, "img")
            wait_for(lambda b, image=image: b.execute_script("return arguments[0].naturalWidth", image) == 64)
        assert cards[0].find_element(By.CLASS_NAME, "calls").text == "3 full + 0 cached UNet calls"
        assert "cached UNet calls" in cards[1].find_element(By.CLASS_NAME, "calls").text
        assert browser.find_element(By.ID, "progress-merge").get_attribute("value") == "3"
        browser.save_screenshot("/tmp/webui.png")

        # Paste the cmlora image's record back: the form takes its settings.
        with urllib.request.urlopen(
            ui["url"] + "/api/images/" + _job_of(browser) + "/1.json", timeout=10
        ) as r:
            record_text = r.read().decode()
        browser.find_element(By.ID, "steps").clear()
        browser.find_element(By.ID, "steps").send_keys("7")
        browser.execute_script("document.getElementById('record').value = arguments[0]", record_text)
        browser.find_element(By.ID, "fill").click()
        wait_for(lambda b: b.find_element(By.ID, "steps").get_attribute("value") == "3")
        assert browser.find_element(By.ID, "method-cmlora-offline").is_selected()
        assert not browser.find_element(By.ID, "method-merge").is_selected()
        assert len(browser.find_elements(By.CSS_SELECTOR, "#selected tbody tr")) == 2

        browser.find_element(By.ID, "steps").clear()
        browser.find_element(By.ID, "steps").send_keys("0")
        browser.find_element(By.ID, "generate").click()
        error = browser.find_element(By.ID, "error")
        wait_for(lambda b: error.is_displayed())
        assert "steps must be an integer in [1, 1000], got 0" in error.text
        assert len(browser.find_elements(By.CSS_SELECTOR, ".result")) == 2  # earlier results stay
    finally:
        browser.quit()

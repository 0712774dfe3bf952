"""``cmlora ui`` live: the Gradio app on the mini model, over HTTP and in headless Chromium.

One server for the module (the app as ``cmlora ui`` starts it with no options): jobs run one at a
time anyway, and loading the model once keeps the suite time small. Screenshots of each state are
written to ``outputs/ui-screens/`` (not committed) so a person can look at them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SCREENS = Path(__file__).resolve().parents[1] / "outputs" / "ui-screens"
TERMINAL = ("done", "cancelled", "error")


@pytest.fixture(scope="module")
def live():
    from cmlora.app.ui.serve import ServeOptions, start
    from cmlora.models import load_base

    app = start(load_base(None, "cpu", "fp32"), ServeOptions(port=0), quiet=True)
    try:
        yield app
    finally:
        app.close()


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_binds_loopback_and_refuses_foreign_hosts_and_large_bodies(live):
    import psutil

    port = int(live.url.rsplit(":", 1)[1].strip("/"))
    assert live.demo.server_name == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with urllib.request.urlopen(live.url, timeout=30) as page:
        assert page.status == 200 and page.headers["X-Frame-Options"] == "DENY"
    join = live.url + "gradio_api/queue/join"
    assert _post(join, b"{}", {"Host": "rebound.example.com"}) == (
        403,
        {
            "error": "host 'rebound.example.com' refused: open the app at http://127.0.0.1 (or a name it was started for)"
        },
    )
    status, answer = _post(join, b"{}", {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 403 and "cross-origin request from 'http://evil.example' refused" in answer["error"]
    # A 31 MB prompt is refused from its Content-Length, before it is read.
    before = psutil.Process().memory_info().rss
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(
            b"POST /gradio_api/queue/join HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 31000000\r\n\r\n" + b'{"data": ["' + b"x" * 65536
        )
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "the limit is 2.1 MB" in reply
    assert psutil.Process().memory_info().rss - before < 20_000_000


# --------------------------------------------------------------------------- browser


def _browser(width: int, height: int, downloads: Path):
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver)):
        pytest.fail(
            "the browser test needs Chromium and chromedriver: apt-get install chromium chromium-driver "
            "(and pip install selenium)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return browser


def _status(browser) -> tuple[str, str]:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, "#status .cm-status")
    return (found[0].get_attribute("data-state"), found[0].text) if found else ("", "")


def _set_number(browser, elem_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value, Keys.TAB)


def _in_view(browser, element) -> bool:
    return browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight;",
        element,
    )


def _checked_methods(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    labels = browser.find_elements(By.CSS_SELECTOR, "#methods label")
    return [label.text.strip() for label in labels if label.find_element(By.TAG_NAME, "input").is_selected()]


@pytest.mark.parametrize("width, height", [(1400, 1000), (420, 900)])
def test_a_session_in_headless_chromium(live, tmp_path, width, height):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    SCREENS.mkdir(parents=True, exist_ok=True)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = _browser(width, height, downloads)
    shot = lambda name: browser.save_screenshot(str(SCREENS / f"{width}-{name}.png"))  # noqa: E731
    try:
        wait_for = WebDriverWait(browser, 120, poll_frequency=0.1).until
        browser.get(live.url)
        wait_for(lambda b: _status(b)[0] == "idle")
        # pick 3 LoRAs: their trigger words go into the prompt
        picker = browser.find_element(By.CSS_SELECTOR, "#loras input")
        for name in ("character_2", "background_1", "style_1"):
            picker.click()
            picker.send_keys(name)
            option = f"[role=option][aria-label^='{name} ']"
            wait_for(lambda b, option=option: b.find_elements(By.CSS_SELECTOR, option))
            browser.find_element(By.CSS_SELECTOR, option).click()
            wait_for(lambda b, name=name: name in b.find_element(By.ID, "lora-table").text)
        picker.send_keys(Keys.ESCAPE)
        prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
        wait_for(lambda b: "inkline" in prompt.get_attribute("value"))
        assert all(t in prompt.get_attribute("value") for t in ("nekomi", "sunsetbg", "inkline"))
        # three methods side by side, 3 steps
        browser.find_element(By.XPATH, "//*[@id='methods']//label[normalize-space()='composite']").click()
        assert _checked_methods(browser) == ["merge", "composite", "cmlora-offline"]
        _set_number(browser, "steps", "3")
        browser.find_element(By.ID, "generate").click()
        wait_for(lambda b: _status(b)[0] in ("running", *TERMINAL))
        shot("1-progress")
        status_box = browser.find_element(By.ID, "status")
        assert _in_view(browser, status_box)  # at 420 px Generate scrolled it into view
        wait_for(lambda b: _status(b)[0] in TERMINAL)
        state, text = _status(browser)
        assert state == "done", text
        rows = browser.find_elements(By.CSS_SELECTOR, "#status .cm-method")
        assert [row.get_attribute("data-label") for row in rows] == ["merge", "composite", "cmlora-offline"]
        assert all(row.get_attribute("data-state") == "done" and "3/3 steps" in row.text for row in rows)
        cards = [browser.find_element(By.ID, f"card-{k}") for k in range(3)]
        infos = [browser.find_element(By.ID, f"card-info-{k}").text for k in range(3)]
        assert (
            infos[0].startswith("merge · seed 0 · 64×64 · 3 steps")
            and "3 full + 0 cached UNet calls" in infos[0]
        )
        assert "cached UNet calls" in infos[2] and "GMAC" in infos[2] and "settings: " in infos[2]
        for card in cards:
            image = card.find_element(By.TAG_NAME, "img")
            wait_for(lambda b, image=image: b.execute_script("return arguments[0].naturalWidth", image) == 64)
        if width == 1400:
            assert all(_in_view(browser, card) for card in cards) and _in_view(browser, status_box)
        else:
            browser.execute_script("arguments[0].scrollIntoView()", cards[0])
        shot("2-results")

        # download the cmlora-offline PNG: it carries its record
        browser.find_element(By.CSS_SELECTOR, "#card-download-2").click()
        wait_for(lambda b: [p for p in downloads.iterdir() if p.suffix == ".png"])
        png = next(p for p in downloads.iterdir() if p.suffix == ".png")
        with Image.open(png) as image:
            record = json.loads(image.info["cmlora"])
            pixels = image.tobytes()
        assert record["method_label"] == "cmlora-offline" and record["seed"] == 0 and record["steps"] == 3
        assert [lora["name"] for lora in record["loras"]] == ["character_2", "background_1", "style_1"]

        # a long job, cancelled while it runs
        _set_number(browser, "steps", "100")
        browser.find_element(By.ID, "generate").click()
        wait_for(
            lambda b: (
                _status(b)[0] == "running" and "1/100" not in _status(b)[1] and " 0/100" not in _status(b)[1]
            )
        )
        shot("3-running")
        started = time.monotonic()
        browser.find_element(By.ID, "cancel").click()
        wait_for(lambda b: _status(b)[0] in TERMINAL)
        # stopped long before its 100 steps: the wall bound is loose because a loaded machine slows
        # each step (the step counts are the exact part)
        assert _status(browser)[0] == "cancelled" and time.monotonic() - started < 15
        done = [
            int(bar.get_attribute("value"))
            for bar in browser.find_elements(By.CSS_SELECTOR, "#status .cm-method progress")
        ]
        assert len(done) == 3 and all(steps < 100 for steps in done), done
        shot("4-cancelled")

        # reload: the session's gallery is still there
        browser.refresh()
        wait_for(lambda b: _status(b)[0] in ("cancelled", "idle"))
        browser.execute_script("document.getElementById('history').scrollIntoView()")
        try:
            wait_for(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history img")) == 3)
        finally:
            shot("5-reloaded")

        # load the PNG back and make it again, pixel for pixel
        browser.find_element(By.CSS_SELECTOR, "#load-record input[type=file]").send_keys(str(png))
        wait_for(lambda b: _status(b)[0] == "loaded")
        assert _checked_methods(browser) == ["cmlora-offline"]
        assert browser.find_element(By.CSS_SELECTOR, "#steps input").get_attribute("value") == "3"
        browser.find_element(By.ID, "generate").click()
        wait_for(lambda b: _status(b)[0] in TERMINAL)
        assert _status(browser)[0] == "done", _status(browser)[1]
        image = browser.find_element(By.CSS_SELECTOR, "#card-0 img")
        with urllib.request.urlopen(image.get_attribute("src"), timeout=30) as response:
            with Image.open(io.BytesIO(response.read())) as again:
                assert again.tobytes() == pixels and json.loads(again.info["cmlora"])["seed"] == 0
        shot("6-regenerated")
        assert (
            browser.find_elements(By.CSS_SELECTOR, "#card-1") == []
            or not browser.find_element(By.ID, "card-1").is_displayed()
        )
    finally:
        browser.quit()


def test_queue_flood_is_refused_and_cancel_acts_fast(live):
    """Last in the module: it fills Gradio's queue of the live server."""
    import psutil

    from cmlora.app.ui.jobs import new_token

    with urllib.request.urlopen(live.url + "config", timeout=30) as response:
        config = json.loads(response.read())
    fn_index = next(k for k, dep in enumerate(config["dependencies"]) if dep.get("api_name") == "generate")
    table = {
        "headers": ["LoRA", "weight", "category", "order"],
        "data": [["character_1", 1.0, "character", 1]],
    }

    def join(token: str | None, session: str) -> tuple[int, dict]:
        data = [token, table, "tinbot", "", ["merge"], 0, 200, 64, 64, 5.0, 1.0, "", ""]
        body = {"data": data, "fn_index": fn_index, "session_hash": session, "trigger_id": None}
        return _post(
            live.url + "gradio_api/queue/join",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )

    token = new_token()
    assert join(token, "blocker0")[0] == 200  # a 200-step job holds the one generation slot
    deadline = time.monotonic() + 60
    while (
        live.runner.job(token) is None or live.runner.snapshot(live.runner.job(token))["progress"][0].step < 1
    ) and (time.monotonic() < deadline):
        time.sleep(0.05)
    before = psutil.Process().memory_info().rss
    answers = [join(None, f"flood{k:04d}") for k in range(30)]  # no session: each would end at once
    accepted = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] != 200]
    assert len(accepted) == 8 and len(refused) == 22, answers
    assert all("Queue is full" in json.dumps(a[1]) for a in refused), refused[:2]
    assert psutil.Process().memory_info().rss - before < 50_000_000
    blocker = live.runner.job(token)
    assert blocker.state == "running"
    started = time.monotonic()
    live.runner.cancel(token)
    while not blocker.finished_state:
        time.sleep(0.02)
    assert blocker.state == "cancelled" and time.monotonic() - started < 3
    # the flood's events end at once (no session), leaving the queue empty for the next test
    queues = live.demo._queue.event_queue_per_concurrency_id
    deadline = time.monotonic() + 30
    while any(q.queue for q in queues.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(q.queue for q in queues.values())

"""The web page of ``latentdiff serve`` (latentdiff/serve/static) in a real browser: headless Chromium (Debian's
``chromium`` package, which ``.ci/run`` installs) driven by Playwright, against the real server started on a free
loopback port with an API key and two models, the embedded one (32 x 32 images on the CPU) and a tiny random one.

The page talks only AUTOMATIC1111's API; these tests press its buttons as a user does and check what comes back:
the image is a PNG whose ``parameters`` chunk holds our prompt and seed; "reuse parameters" refills the form with
that image's own seed and regenerates the same image; a rejected request shows the server's message; Interrupt
stops a long run; the model menu switches the server's model; without the API key the page says so, and with it
typed into the key field the page works. The tests skip (and say why) only where there is no Chromium.

Set ``LATENTDIFF_SCREENSHOT=docs/images/serve.png`` to save the screenshot of the gallery that the README shows.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.io.images import parse_parameters

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "page-test-key"
KEY_STORAGE = "latentdiff.apiKey"  # app.js's localStorage entry
# Chromium as the project's machines run it: no sandbox (root), no GPU, and no background connections (the network
# is closed; without these flags Chromium keeps trying to reach Google's hosts).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _skip(config, reason: str):
    """Skip, and say why on the terminal (the run's summary does not list skips)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\ntests/test_serve_page.py skipped: {reason}", yellow=True)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ldm_file):
    """``python -m latentdiff serve`` on a free loopback port with API_KEY and two models, the embedded one (32 x 32
    images, the current one) and tests' tiny random one (16 x 16); yields its base URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "latentdiff", "serve", "--port", str(port), "--api-key", API_KEY,
                   "--ckpt", "default", "--ckpt", str(tiny_ldm_file)]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with status {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within 120 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser_context(request, tmp_path_factory):
    """A headless Chromium with a fresh profile (Debian's binary: Playwright downloads no browser)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        _skip(request.config, "no Chromium on this machine (bash .ci/run installs Debian's chromium package)")
    try:
        from playwright import sync_api
    except ImportError:
        _skip(request.config, "the Python package playwright is missing (it is in the dev extra)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 720})
        context.set_default_timeout(60_000)
        yield context
        context.close()


def open_page(context, url: str, key: str | None = API_KEY):
    """A new tab on the page, with ``key`` as the stored API key (None: none stored); waits until the page has
    asked the server for its samplers and models. Uncaught script errors are collected in ``page.errors``."""
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    store = f"localStorage.setItem({KEY_STORAGE!r}, {key!r})" if key else f"localStorage.removeItem({KEY_STORAGE!r})"
    page.add_init_script(store)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='true']")
    return page


def _get_json(url: str, path: str):
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def image_from_src(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def form_values(page) -> dict[str, str]:
    ids = ["prompt", "negative_prompt", "steps", "cfg_scale", "sampler_name", "seed", "width", "height"]
    return {i: page.input_value(f"#{i}") for i in ids}


def test_generate_then_reuse_parameters(browser_context, server):
    page = open_page(browser_context, server)
    progress_requests = []
    page.on("request", lambda r: progress_requests.append(r.url) if "/sdapi/v1/progress" in r.url else None)
    # Records whether the progress bar was ever shown (the test cannot time it: the run may be short).
    page.evaluate("""() => {
        window.progressShown = false;
        const box = document.getElementById('progress-box');
        new MutationObserver(() => { if (!box.hidden) window.progressShown = true; })
            .observe(box, {attributes: true});
    }""")
    assert page.is_hidden("#error")
    unlabelled = page.eval_on_selector_all("input, select, textarea", "els => els.filter(e => !e.labels.length)"
                                           ".map(e => e.id)")
    assert unlabelled == []
    samplers = page.eval_on_selector_all("#sampler_name option", "os => os.map(o => o.value)")
    assert "Euler a" in samplers
    models = page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)")
    assert models == ["default", "tiny"] and page.input_value("#model").startswith("default [")

    page.fill("#prompt", "a photo of a horse")
    page.fill("#negative_prompt", "blurry")
    page.fill("#seed", "1234")
    page.fill("#batch_size", "4")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery .result img').length === 4")
    page.wait_for_selector("#generate:enabled")
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.evaluate("window.progressShown") and page.is_hidden("#progress-box")
    assert progress_requests, "the page did not poll /sdapi/v1/progress while generating"

    figures = page.query_selector_all("#gallery .result")
    for i, figure in enumerate(figures):
        image = image_from_src(figure.query_selector("img").get_attribute("src"))
        assert image.size == (32, 32)  # the embedded model's own size: the page left width and height empty
        text = image.info["parameters"]
        assert figure.query_selector(".infotext").inner_text().strip() == text.strip()
        params = parse_parameters(text)
        assert params["prompt"] == "a photo of a horse"
        assert params["negative_prompt"] == "blurry"
        assert params["Seed"] == str(1234 + i)
    second = np.asarray(image_from_src(figures[1].query_selector("img").get_attribute("src")).convert("RGB"))
    second_params = parse_parameters(image_from_src(figures[1].query_selector("img").get_attribute("src"))
                                     .info["parameters"])

    if os.environ.get("LATENTDIFF_SCREENSHOT"):
        page.focus("#generate")
        page.screenshot(path=os.environ["LATENTDIFF_SCREENSHOT"], clip={"x": 0, "y": 0, "width": 1280, "height": 600})

    # Change the form, then reuse the second image's parameters: they come back with its own seed.
    page.fill("#prompt", "something else")
    page.fill("#negative_prompt", "")
    page.fill("#seed", "-1")
    page.fill("#steps", "3")
    page.fill("#cfg_scale", "1.5")
    page.select_option("#sampler_name", "DDIM")
    figures[1].query_selector("button.reuse").click()
    assert form_values(page) == {
        "prompt": "a photo of a horse", "negative_prompt": "blurry", "steps": second_params["Steps"],
        "cfg_scale": second_params["CFG scale"], "sampler_name": "Euler a", "seed": "1235", "width": "32",
        "height": "32"}

    # Generating again from the reused parameters makes the same image.
    page.fill("#batch_size", "1")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery .result img').length === 5")
    again = image_from_src(page.get_attribute("#gallery .result:first-child img", "src"))
    assert parse_parameters(again.info["parameters"])["Seed"] == "1235"
    diff = np.abs(np.asarray(again.convert("RGB")).astype(int) - second.astype(int))
    assert diff.max() <= 2, diff.max()  # the same noise and weights; batch 4 vs 1 may round a pixel differently
    assert page.errors == []


def test_rejected_request_shows_the_server_message(browser_context, server):
    page = open_page(browser_context, server)
    page.fill("#prompt", "a photo of a horse")
    page.fill("#steps", "0")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "422" in message and "steps" in message, message
    page.wait_for_selector("#generate:enabled")
    assert page.query_selector_all("#gallery .result") == []

    page.fill("#steps", "")
    page.fill("#seed", "1.5")  # refused by the page itself: seeds are whole numbers
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('whole number')")
    assert page.query_selector_all("#gallery .result") == []
    assert page.errors == []


def test_interrupt(browser_context, server):
    page = open_page(browser_context, server)
    page.fill("#prompt", "a photo of a ship")
    page.fill("#steps", "150")  # long enough (thousands of U-Net calls) to be running when Interrupt is pressed
    page.fill("#batch_size", "16")
    page.click("#generate")
    with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/interrupt")) as response:
        page.click("#interrupt")
    assert response.value.ok
    page.wait_for_selector("#generate:enabled")
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.is_disabled("#interrupt") and page.is_hidden("#progress-box")
    assert "Interrupted" in page.inner_text("#status")
    assert page.errors == []


def test_api_key_field(browser_context, server):
    page = open_page(browser_context, server, key=None)
    message = page.inner_text("#error")
    assert ("401" in message or "403" in message) and "API key" in message, message
    assert page.eval_on_selector_all("#model option", "os => os.length") == 0
    for key in ["wrong", API_KEY]:
        loads = int(page.get_attribute("body", "data-loads"))
        page.fill("#api-key", key)
        page.press("#api-key", "Enter")  # saves the key and loads the samplers and models again
        page.wait_for_function(f"Number(document.body.dataset.loads) > {loads}")
        if key == "wrong":
            message = page.inner_text("#error")
            assert page.is_visible("#error") and ("401" in message or "403" in message), message
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert page.eval_on_selector_all("#model option", "os => os.length") >= 1
    assert page.evaluate(f"localStorage.getItem({KEY_STORAGE!r})") == API_KEY
    assert page.errors == []


def test_switch_model(browser_context, server):
    page = open_page(browser_context, server)
    tiny = page.eval_on_selector("#model option:nth-child(2)", "o => o.value")
    assert tiny.startswith("tiny [")
    with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/options") and r.request.method == "POST") as r:
        page.select_option("#model", label="tiny")
    assert r.value.ok and r.value.request.post_data_json == {"sd_model_checkpoint": tiny}
    assert _get_json(server, "/sdapi/v1/options")["sd_model_checkpoint"] == tiny

    page.fill("#prompt", "a photo of a frog")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector("#gallery .result img")
    image = image_from_src(page.get_attribute("#gallery .result img", "src"))
    params = parse_parameters(image.info["parameters"])
    assert image.size == (16, 16) and params["Model"] == "tiny" and params["Seed"] == "7"

    with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/options") and r.request.method == "POST"):
        page.select_option("#model", label="default")  # back to the embedded model, the other tests' one
    assert _get_json(server, "/sdapi/v1/options")["sd_model_checkpoint"].startswith("default [")
    page.click("#gallery .result button.reuse")  # the image's "Model hash" picks its model again
    assert page.input_value("#model") == tiny and page.input_value("#seed") == "7"

    # A model the server does not have (removed since the page loaded): its message, and the choice goes back.
    page.evaluate("document.getElementById('model').append(new Option('gone', 'gone [0123456789]'))")
    page.select_option("#model", "gone [0123456789]")
    page.wait_for_selector("#error:not([hidden])")
    assert "404" in page.inner_text("#error") and "gone" in page.inner_text("#error")
    assert page.input_value("#model").startswith("default [")
    assert page.errors == []

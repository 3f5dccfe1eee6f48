"""The explorer (scripts/serve.py): its API through Starlette's test client, checked against the
library and scripts/explain.py, and its page in a real browser (Debian's headless Chromium)."""

import base64
import io
import json
import os
import shutil
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

from lenet_jax import explain, models
from lenet_jax.report import explain_method, explain_run

require("starlette")
require("httpx2")
from starlette.testclient import TestClient  # noqa: E402

from lenet_jax.serve.app import MAX_BODY, create_app, server_config  # noqa: E402
from lenet_jax.serve.explorer import DEFAULT_METHODS, Explorer  # noqa: E402


@pytest.fixture(scope="module")
def explorer(tiny_run):
    return Explorer(tiny_run, log=lambda message: None)


@pytest.fixture(scope="module")
def client(explorer):
    return TestClient(create_app(explorer, seed=0), base_url=LOCAL)


LOCAL = "http://127.0.0.1:8000"
JSON = {"content-type": "application/json"}


def digit(explorer, index):
    return explorer.test_images[index] / 255.0


def post(client, **body):
    return client.post("/api/explain", json=body)  # json= sends application/json


def test_info_describes_the_run(client, tiny_run):
    info = client.get("/api/info").json()
    assert info["classes"] == [str(k) for k in range(10)]
    assert info["methods"] == list(explain.METHODS) and "occlusion" not in info["default_methods"]
    assert info["composites"] == list(explain.COMPOSITES)
    assert info["feature_layer"] == "conv2" and info["input_size"] == 32
    assert info["run"] == tiny_run.name and info["test_digits"] == 10000
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="draw"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # works offline


def test_probabilities_equal_the_explain_script(client, explorer, tiny_run, tmp_path):
    written = explain_run(tiny_run, "saliency", indices=[3], out=tmp_path / "s.png")
    logits = np.load(written["npz"])["logits"][0]
    answer = post(client, image=digit(explorer, 3).tolist(), methods=[]).json()
    np.testing.assert_allclose(
        answer["probabilities"], jax.nn.softmax(logits), rtol=1e-5, atol=1e-7
    )
    assert answer["predicted"] == answer["target"] == int(logits.argmax())
    assert answer["heatmaps"] == {}


@pytest.mark.parametrize("target", [None, 4])
def test_heatmaps_equal_the_library(client, explorer, target):
    image = digit(explorer, 11)
    answer = post(client, image=image.tolist(), methods=list(explain.METHODS), target=target).json()
    model, params = explorer.model, explorer.params
    x = explorer.inputs.preprocess(jnp.asarray(image * 255, jnp.float32)[None])
    expected_target = answer["predicted"] if target is None else target
    assert answer["target"] == expected_target
    assert set(answer["heatmaps"]) == set(explain.METHODS)
    for name, heat in answer["heatmaps"].items():
        options = {"window": 4, "stride": 2} if name == "occlusion" else {}
        if name == "lrp":
            options["composite"] = "epsilon_plus_flat"
        want = explain_method(name, model, params, x, target=expected_target, **options)[0]
        assert np.asarray(heat).shape == (32, 32)
        np.testing.assert_allclose(
            heat, want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=name
        )
    lrp = answer["lrp"]
    assert lrp["relevance_sum"] == pytest.approx(np.sum(answer["heatmaps"]["lrp"]), rel=1e-4)
    logit = models.explained(model, params)(x)[0, expected_target]
    assert lrp["logit"] == pytest.approx(float(logit), rel=1e-5)
    assert len(lrp["feature_maps"]) == 16


def test_a_composite_and_a_png_upload(client, explorer):
    import matplotlib.pyplot as plt

    image = digit(explorer, 5)
    answer = post(client, image=image.tolist(), methods=["lrp"], composite="epsilon_gamma_box")
    heat = answer.json()["heatmaps"]["lrp"]
    x = explorer.inputs.preprocess(jnp.asarray(image * 255, jnp.float32)[None])
    want = explain_method("lrp", explorer.model, explorer.params, x, composite="epsilon_gamma_box")[
        0
    ]
    np.testing.assert_allclose(heat, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # dark ink on white, as a photographed digit: inverted and laid out as --image reads it
    buf = io.BytesIO()
    plt.imsave(buf, 1 - image, cmap="gray", vmin=0, vmax=1, format="png")
    png = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    answer = post(client, png=png, methods=["saliency"]).json()
    assert np.asarray(answer["image"]).shape == (28, 28)
    assert answer["predicted"] == post(client, image=image.tolist(), methods=[]).json()["predicted"]
    # the page uploads whatever the browser picked: a JPEG is read as the command line reads it
    from PIL import Image

    jpeg = io.BytesIO()
    Image.fromarray(np.uint8(255 * (1 - image))).resize((84, 84)).save(jpeg, "JPEG", quality=95)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
    from_jpeg = post(client, png=url, methods=[]).json()
    assert from_jpeg["predicted"] == answer["predicted"]


BAD = [
    (dict(image=[[0.0] * 28] * 27), '"image" must be 28x28, got shape [27, 28]'),
    (dict(image=[[2.0] * 28] * 28), '"image" values must lie in [0, 1] (ink = 1)'),
    (dict(image=[[float("nan")] * 28] * 28), '"image" holds NaN or infinite values'),
    (dict(image="a 7"), '"image" must be 28 rows of 28 numbers'),
    (dict(), 'give exactly one of "image" (28x28 floats in [0, 1]) and "png"'),
    (dict(image=[[0.0] * 28] * 28, methods=["lime"]), "unknown method 'lime'; choose from "),
    (dict(image=[[0.0] * 28] * 28, composite="zplus"), "unknown composite 'zplus'; choose one of"),
    (dict(image=[[0.0] * 28] * 28, target=10), '"target" must be null or a class 0..9, got 10'),
    (dict(image=[[0.0] * 28] * 28, target="7"), "\"target\" must be null or a class 0..9, got '7'"),
    (dict(png="bm90IGEgcG5n"), "cannot read the picture: UnidentifiedImageError: "),
    (dict(png="%%%"), '"png" is not base64: '),
    (dict(image=[[0.0] * 28] * 28, path="/etc/passwd"), "unknown field 'path'"),
    (dict(image=[["0.5"] * 28] * 28), "\"image\" must hold numbers, got str '0.5'"),
    (dict(image=[[True] * 28] * 28), '"image" must hold numbers, got bool True'),
    (dict(image=[[0.0] * 28] * 27 + [[10**400] + [0.0] * 27]), '"image" holds a number too large'),
    (dict(image=[[0.0] * 28] * 28, composite={"a": 1}), "unknown composite {'a': 1}; choose one"),
    (dict(image=[[0.0] * 28] * 28, composite=["epsilon"]), "unknown composite ['epsilon']; choose"),
    (dict(image=[[0.0] * 28] * 28, composite=""), "unknown composite ''; choose one of"),
    (dict(image=[[0.0] * 28] * 28, composite=False), "unknown composite False; choose one of"),
    (dict(png=None), '"png" must be a base64 string'),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_requests_are_400_with_one_line_and_the_server_goes_on(client, explorer, body, message):
    r = client.post("/api/explain", content=json.dumps(body), headers=JSON)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error.startswith(message) and "\n" not in error
    assert post(client, image=digit(explorer, 0).tolist(), methods=["saliency"]).status_code == 200


def test_not_json_and_oversized_bodies_are_400(client):
    r = client.post("/api/explain", content=b"{image: 7", headers=JSON)
    assert (r.status_code, r.json()) == (400, {"error": "the body is not JSON"})
    r = client.post("/api/explain", content=b" " * (MAX_BODY + 1), headers=JSON)
    assert (r.status_code, r.json()) == (
        400,
        {"error": f"the body must be at most {MAX_BODY} bytes"},
    )
    r = client.get("/api/digit?kind=best")
    assert r.status_code == 400 and r.json()["error"].startswith("unknown kind 'best'")


def test_a_deeply_nested_body_and_a_decompression_bomb_are_400(client):
    from test_image_files import huge_png

    r = client.post("/api/explain", content=b"[" * 100_000 + b"]" * 100_000, headers=JSON)
    assert (r.status_code, r.json()) == (400, {"error": "the body's JSON is nested too deeply"})
    bomb = base64.b64encode(huge_png(14000, 14000)).decode()
    assert len(bomb) < 200
    r = post(client, png=bomb)
    assert r.status_code == 400
    assert r.json()["error"] == (
        "the picture is 196,000,000 pixels; the largest picture read is 16,777,216 pixels "
        "(e.g. 4096x4096)"
    )


def test_other_pages_cannot_drive_it(explorer):
    """A cross-site form or fetch without a preflight sends text/plain; a DNS-rebinding page
    reaches the server under its own host name."""
    body = json.dumps({"image": [[0.0] * 28] * 28})
    local = TestClient(create_app(explorer, seed=0), base_url=LOCAL)
    r = local.post("/api/explain", content=body, headers={"content-type": "text/plain"})
    assert (r.status_code, r.json()) == (
        400,
        {"error": "the body must be application/json, not text/plain"},
    )
    assert local.post("/api/explain", content=body).json()["error"].endswith("not untyped")
    assert local.post("/api/explain", content=body, headers=JSON).status_code == 200
    evil = TestClient(create_app(explorer, seed=0), base_url="http://evil.example.com")
    for path in ("/", "/api/info", "/api/digit"):
        r = evil.get(path)
        assert r.status_code == 400
        assert r.json()["error"].startswith("unknown host 'evil.example.com': this server answers")
    assert (
        TestClient(create_app(explorer), base_url="http://localhost:8000").get("/").status_code
        == 200
    )
    named = TestClient(create_app(explorer, hosts=("box.lan",)), base_url="http://box.lan")
    assert named.get("/api/info").status_code == 200


def test_a_client_that_disconnects_mid_body_is_one_log_line(client, caplog):
    async def receive():
        return {"type": "http.disconnect"}

    import asyncio

    app = client.app
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/explain",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                    (b"content-length", b"100")],
        "query_string": b"",
    }  # fmt: skip
    sent = []

    async def send(message):
        sent.append(message)

    with caplog.at_level("WARNING", logger="lenet_jax.serve"):
        asyncio.run(app(scope, receive, send))
    assert [r.getMessage() for r in caplog.records] == [
        "a client disconnected before sending its whole request"
    ]
    assert sent[0]["status"] == 400


def test_test_digits_and_misclassified_ones(client, explorer):
    for _ in range(3):
        d = client.get("/api/digit?kind=misclassified").json()
        assert d["label"] == int(explorer.test_labels[d["index"]])
        np.testing.assert_allclose(d["image"], digit(explorer, d["index"]))
        assert post(client, image=d["image"], methods=[]).json()["predicted"] != d["label"]


def test_requests_never_compile(client, explorer):
    traces = explorer.traces
    # at start-up: the probabilities, each method but LRP, LRP once per composite
    assert traces == 1 + len(explain.METHODS) - 1 + len(explain.COMPOSITES)
    image = digit(explorer, 8).tolist()
    for composite in explain.COMPOSITES:
        for target in (None, 0, 9):
            body = dict(
                image=image, target=target, composite=composite, methods=list(explain.METHODS)
            )
            assert post(client, **body).status_code == 200
    assert explorer.traces == traces


# ----------------------------------------------------------------------------- a real browser


def _chromium():
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        if os.environ.get("CI"):
            pytest.fail("the browser test needs Debian's chromium and chromium-driver in CI")
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    return found


@pytest.fixture(scope="module")
def server(explorer):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = server_config(create_app(explorer), "127.0.0.1", port, request_timeout=1.0)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join()


def test_drawing_in_a_real_browser_updates_probabilities_and_heatmaps(server, tmp_path):
    chromium, driver_path = _chromium()
    webdriver = require("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1300,950",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    wait = WebDriverWait(browser, 60)

    def answers():
        return int(browser.execute_script("return document.body.dataset.answers || 0"))

    def stroke(points):
        canvas = browser.find_element(By.ID, "draw")
        chain = (
            ActionChains(browser).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
        )
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            chain = chain.move_by_offset(x1 - x0, y1 - y0)
        chain.release().perform()

    def state():
        probs = browser.find_element(By.ID, "probs").text
        maps = browser.execute_script(
            "return [...document.querySelectorAll('#maps canvas')].map(c => c.toDataURL())"
        )
        return probs, maps

    try:
        browser.get(server)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#methods input")) == 8)
        stroke([(0, -100), (0, -50), (0, 0), (0, 50), (0, 100)])  # a 1
        wait.until(lambda b: answers() >= 1 and not b.execute_script("return inflight"))
        first = state()
        assert len(first[1]) == len(DEFAULT_METHODS)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#probs .prob")) == 10
        stroke([(-60, -100), (60, -100), (10, 100)])  # a bar across the top: now a 7
        wait.until(lambda b: state() != first and not b.execute_script("return inflight"))
        second = state()
        assert second[0] != first[0] and all(
            a != b for a, b in zip(first[1], second[1], strict=True)
        )
        assert browser.find_element(By.ID, "error").text == ""
        shot = tmp_path / "explorer.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {shot}")
        # a JPEG picked in the upload dialog is explained; Clear forgets it, caption included
        from PIL import Image

        paper = np.full((84, 84), 255, np.uint8)
        paper[15:70, 38:46] = 0  # a dark "1" on white
        jpeg = tmp_path / "one.jpg"
        Image.fromarray(paper).save(jpeg, "JPEG", quality=95)
        upload = browser.find_element(By.ID, "upload")
        browser.execute_script("arguments[0].hidden = false", upload)
        before = answers()
        upload.send_keys(str(jpeg))
        wait.until(lambda b: answers() > before and not b.execute_script("return inflight"))
        source = browser.find_element(By.ID, "source")
        assert source.text == "Uploaded one.jpg, laid out as an MNIST digit."
        assert browser.find_element(By.ID, "error").text == ""
        browser.find_element(By.ID, "clear").click()
        assert source.text == "Draw a digit: white ink on black, as MNIST."
    finally:
        browser.quit()


@pytest.mark.slow
def test_the_explorer_serves_a_vit_with_attn_lrp(tiny_vit_run):
    """A ViT run: AttnLRP by default, the patch embedding's feature maps, the library's maps."""
    explorer = Explorer(tiny_vit_run, log=lambda message: None)
    client = TestClient(create_app(explorer, seed=0), base_url=LOCAL)
    info = client.get("/api/info").json()
    assert info["default_composite"] == "attn_lrp" and info["feature_layer"] == "embed"
    image = digit(explorer, 5)
    answer = post(client, image=image.tolist(), methods=["lrp"], target=2).json()
    assert answer["lrp"]["composite"] == "attn_lrp"
    assert np.shape(answer["lrp"]["feature_maps"]) == (64,)
    x = explorer.inputs.preprocess(jnp.asarray(image * 255, jnp.float32)[None])
    f = models.explained(explorer.model, explorer.params)
    expected = explain.lrp(f, x, 2, composite="attn_lrp")[0, ..., 0]
    np.testing.assert_allclose(answer["heatmaps"]["lrp"], expected, rtol=1e-4, atol=1e-6)
    cp = post(client, image=image.tolist(), methods=["lrp"], target=2, composite="cp_lrp").json()
    assert cp["lrp"]["composite"] == "cp_lrp" and cp["heatmaps"]["lrp"] != answer["heatmaps"]["lrp"]


def test_slow_and_idle_clients_are_let_go(server):
    """The real server (uvicorn, ``server_config`` with a 1 s request deadline): a client that
    sends half a request head is disconnected; connections beyond the limit get 503 until the idle
    ones are closed, then requests succeed again."""
    import urllib.error
    import urllib.request

    from lenet_jax.serve.app import MAX_CONNECTIONS

    port = int(server.rstrip("/").rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end
    slow.settimeout(5)
    started = time.perf_counter()
    assert slow.recv(1024) == b""  # closed by the server
    assert 0.8 < time.perf_counter() - started < 4
    slow.close()

    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(server + "api/info", timeout=5)
        assert busy.value.code == 503
        time.sleep(1.5)  # the idle connections' deadline passes
        assert urllib.request.urlopen(server + "api/info", timeout=5).status == 200
    finally:
        for s in idle:
            s.close()

"""``patchcore serve``: the real uvicorn server on a free loopback port, driven over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest

for _module in ("fastapi", "httpx", "prometheus_client", "uvicorn"):
    pytest.importorskip(_module, reason="the service tests need the 'serve' extra (pip install '.[serve]')")

import httpx  # noqa: E402
from _deploy import as_array, make_images, png_size, running_server, tiny_model, wait_ready  # noqa: E402
from fastapi import APIRouter, Depends  # noqa: E402
from PIL import Image  # noqa: E402
from test_workflow import run_cli  # noqa: E402

from patchcore.deploy.batching import DynamicBatcher, PixelBudget  # noqa: E402
from patchcore.deploy.calibration import calibrate, normalize_score  # noqa: E402
from patchcore.deploy.errors import DeployError  # noqa: E402
from patchcore.deploy.inference import Predictor  # noqa: E402
from patchcore.deploy.service import (  # noqa: E402
    SHUTDOWN_GRACE_S,
    Principal,
    ScoreEvent,
    ServiceExtension,
    ServiceSettings,
    authenticate,
    create_app,
    require_operator,
)
from patchcore.deploy.uploads import UploadError, decode_upload  # noqa: E402

MAX_BYTES = 40_000
MAX_PIXELS = 200_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_torch_thread):
    base = tmp_path_factory.mktemp("service")
    images = make_images(base / "images")
    model = tiny_model(images)
    raw = model.save(base / "patchcore_raw.pt")
    model.calibration_ = calibrate(Predictor(model), images["calib"], 0.1, source="calib")
    tiny = model.save(base / "patchcore_tiny.pt")
    return {"base": base, "images": images, "tiny": tiny, "raw": raw}


@pytest.fixture(scope="module")
def server(setup):
    settings = ServiceSettings(
        max_batch=8, max_wait_ms=100, max_upload_bytes=MAX_BYTES, max_pixels=MAX_PIXELS
    )
    app = create_app({"tiny": setup["tiny"], "raw": setup["raw"]}, settings)
    with running_server(app) as url:
        wait_ready(url)
        yield url


def _post(url, path, name="image.png", **params):
    with open(path, "rb") as handle:
        return httpx.post(f"{url}/predict", params=params, files={"file": (name, handle.read())}, timeout=60)


def _png(data: str) -> bytes:
    return base64.b64decode(data)


def test_predict_gives_the_scores_of_patchcore_predict_and_decides_with_the_calibration(
    server, setup, tmp_path
):
    images = setup["images"]["good"] + setup["images"]["bad"]
    code, out, _ = run_cli("predict", "-m", setup["tiny"], *images, "-o", tmp_path / "p", "--no-heatmaps")
    assert code == 0
    expected = [json.loads(line) for line in out.splitlines()]
    calibration = Predictor.load(setup["tiny"], device="cpu").calibration
    low, threshold = calibration.score_low, calibration.image_threshold
    for path, want in zip(images, expected, strict=True):
        body = _post(server, path, model="tiny").json()
        # Same float32 arithmetic; only the batch composition (BLAS blocking) may differ.
        assert body["score"] == pytest.approx(want["score"], rel=1e-5)
        assert body["anomalous"] == want["anomalous"]
        assert body["threshold"] == want["threshold"] is not None
        # The normalisation of the service's own score (near the low end it magnifies float noise).
        assert body["normalized_score"] == pytest.approx(
            normalize_score(body["score"], low, threshold), rel=1e-12
        )
        assert body["model"] == "tiny" and body["latency_ms"] > 0 and "calibration" not in body
    assert [r["anomalous"] for r in expected[3:]] == [True, True, True]


def test_heatmap_and_mask_come_as_pngs_of_the_image_size(server, setup):
    body = _post(server, setup["images"]["bad"][0], model="tiny", heatmap="true", mask="true").json()
    assert png_size(_png(body["heatmap_png_base64"])) == (48, 48)
    mask = as_array(_png(body["mask_png_base64"]))
    assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 255}
    assert mask[14:30, 14:30].mean() > 127  # the defect square is in the mask


def test_an_uncalibrated_model_says_so_and_invents_no_decision(server, setup):
    body = _post(server, setup["images"]["bad"][0], model="raw", mask="true").json()
    assert body["anomalous"] is None and body["threshold"] is None and body["mask_png_base64"] is None
    assert body["normalized_score"] is None
    assert body["calibration"].startswith("not calibrated")


def test_models_lists_metadata_and_how_the_threshold_was_set(server):
    models = {m["name"]: m for m in httpx.get(f"{server}/models").json()["models"]}
    assert set(models) == {"tiny", "raw"}
    tiny = models["tiny"]
    assert tiny["backbone"] == "resnet18" and tiny["input_size"] == [48, 48]
    assert tiny["calibrated"] and tiny["threshold"] == tiny["calibration"]["image_threshold"]
    assert "from 20 good images" in tiny["threshold_set_by"]
    assert tiny["training_stats"]["n_train_images"] == 8
    assert models["raw"]["threshold"] is None and "not calibrated" in models["raw"]["threshold_set_by"]


def test_model_choice_errors_are_4xx_json(server, setup):
    response = _post(server, setup["images"]["good"][0])  # two models served, none named
    assert response.status_code == 400 and "model=NAME" in response.json()["detail"]
    response = _post(server, setup["images"]["good"][0], model="nope")
    assert response.status_code == 404 and "nope" in response.json()["detail"]


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height pixels; the file itself is tiny."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * 4))
        + chunk(b"IEND", b"")
    )


def _bad_uploads(setup) -> dict[str, tuple[bytes, int]]:
    good = Path(setup["images"]["good"][0]).read_bytes()
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(
        noise, "PNG"
    )
    assert len(noise.getvalue()) > MAX_BYTES
    return {
        "empty.png": (b"", 400),
        "notes.png": (b"this is not an image at all\n" * 20, 400),
        "truncated.png": (good[: len(good) // 2], 400),
        "huge.png": (noise.getvalue(), 413),
        "bomb.png": (_bomb_png(2000, 2000), 413),
        "body.png": (b"x" * 400_000, 413),  # refused from Content-Length, before the body is read
    }


def test_bad_uploads_get_4xx_json_and_good_requests_around_them_are_answered_correctly(server, setup):
    good_paths = setup["images"]["good"] + setup["images"]["bad"]
    expected = {p.name: _post(server, p, model="tiny").json()["score"] for p in good_paths}
    bad = _bad_uploads(setup)

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:

            async def send(name, data):
                return name, await client.post("/predict?model=tiny", files={"file": (name, data)})

            jobs = [send(n, d) for n, (d, _) in bad.items()]
            jobs += [send(p.name, p.read_bytes()) for p in good_paths for _ in range(2)]
            return await asyncio.gather(*jobs)

    for name, response in asyncio.run(run()):
        if name in bad:
            assert response.status_code == bad[name][1], (name, response.text)
            detail = response.json()["detail"]
            assert name in detail or (name == "body.png" and "exceeds" in detail)
        else:
            assert response.status_code == 200
            assert response.json()["score"] == pytest.approx(expected[name], rel=1e-5)
    assert httpx.get(f"{server}/readyz").status_code == 200


def test_decoding_refuses_a_decompression_bomb_from_its_header_alone():
    with pytest.raises(UploadError) as info:
        decode_upload(_bomb_png(60_000, 60_000), max_bytes=10**6, max_pixels=10**8)
    assert info.value.status == 413


def test_batch_endpoint_scores_several_files_in_order_and_refuses_a_bad_one_by_name(server, setup):
    paths = setup["images"]["bad"] + setup["images"]["good"]
    files = [("file", (p.name, p.read_bytes())) for p in paths]
    body = httpx.post(f"{server}/predict/batch?model=tiny", files=files, timeout=60).json()
    assert [r["image"] for r in body["results"]] == [p.name for p in paths]
    singles = [_post(server, p, model="tiny").json()["score"] for p in paths]
    assert [r["score"] for r in body["results"]] == pytest.approx(singles, rel=1e-5)
    files.append(("file", ("broken.png", b"\x89PNG\r\n")))
    response = httpx.post(f"{server}/predict/batch?model=tiny", files=files, timeout=60)
    assert response.status_code == 400 and "broken.png" in response.json()["detail"]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_errors_latency_and_batch_sizes(server, setup):
    paths = setup["images"]["good"] * 2
    httpx.post(
        f"{server}/predict/batch?model=tiny",
        files=[("file", (p.name, p.read_bytes())) for p in paths],
        timeout=60,
    )
    httpx.post(f"{server}/predict?model=tiny", files={"file": ("x.png", b"")})
    response = httpx.get(f"{server}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("patchcore_requests_total", (("endpoint", "/predict/batch"), ("status", "200")))] >= 1
    assert samples[("patchcore_errors_total", (("endpoint", "/predict"), ("status", "400")))] >= 1
    assert samples[("patchcore_request_latency_seconds_count", (("endpoint", "/predict"),))] >= 1
    batches = samples[("patchcore_batch_size_count", (("model", "tiny"),))]
    images = samples[("patchcore_batch_size_sum", (("model", "tiny"),))]
    assert images == samples[("patchcore_images_total", (("model", "tiny"),))]
    assert batches < images  # concurrent images were scored together


def test_dynamic_batcher_groups_concurrent_items_and_isolates_a_failing_one():
    calls: list[list[int]] = []

    def run_batch(items):
        calls.append(list(items))
        if 13 in items:
            raise ValueError("bad item")
        return [i * 10 for i in items]

    async def main():
        batcher = DynamicBatcher(run_batch, max_batch=4, max_wait=0.5)
        batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(i) for i in [1, 2, 3, 4, 5, 13, 7]), return_exceptions=True
            )
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results[:5] == [10, 20, 30, 40, 50] and results[6] == 70
    assert isinstance(results[5], ValueError)
    assert calls[0] == [1, 2, 3, 4]  # full batch without waiting out max_wait
    assert max(len(c) for c in calls) == 4


def test_cli_serve_with_an_api_key_guards_every_endpoint_but_healthz(setup, tmp_path):
    key = "k" * 20 + "-secret"
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    from _deploy import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "patchcore.app.cli", "serve", "--model", f"line1={setup['tiny']}",
         "--port", str(port), "--api-key-file", str(key_file), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {key}"}
        wait_ready(url, auth)
        for path in ("/models", "/readyz", "/metrics", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(f"{url}{path}", headers=auth).status_code == 200
        # The page shell loads without the key (a browser cannot send one) and holds no data.
        shell = httpx.get(f"{url}/")
        assert shell.status_code == 200 and "line1" not in shell.text and "resnet18" not in shell.text
        image = setup["images"]["bad"][0].read_bytes()
        response = httpx.post(f"{url}/predict", files={"file": ("a.png", image)})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        response = httpx.post(f"{url}/predict", files={"file": ("a.png", image)}, headers=auth, timeout=60)
        assert response.status_code == 200 and response.json()["model"] == "line1"
        assert response.json()["anomalous"] is True
        # SIGTERM ends the server even while a client holds a request open (half its body sent).
        holder = socket.create_connection(("127.0.0.1", port), timeout=30)
        holder.sendall(
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n".encode()
        )
        time.sleep(0.5)
        t0 = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=SHUTDOWN_GRACE_S + 25)
        assert time.monotonic() - t0 < SHUTDOWN_GRACE_S + 25
        holder.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="no chromium")
def test_web_page_in_headless_chromium_shows_score_decision_and_heatmap(setup, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app({"tiny": setup["tiny"]}, ServiceSettings(max_wait_ms=1))
    bad = setup["images"]["bad"][0]
    expected = Predictor.load(setup["tiny"], device="cpu").predict([bad])[0]
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1000,800",
    ):
        options.add_argument(arg)
    with running_server(app) as url:
        wait_ready(url)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            driver.get(f"{url}/")
            WebDriverWait(driver, 30).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 1
            )
            driver.find_element(By.ID, "file").send_keys(str(bad))
            WebDriverWait(driver, 60).until(
                expected_conditions.text_to_be_present_in_element((By.ID, "status"), "scored")
            )
            assert driver.find_element(By.ID, "decision").text == "ANOMALOUS"
            shown = float(driver.find_element(By.ID, "score").text)
            assert shown == pytest.approx(expected.score, rel=1e-4)
            assert float(driver.find_element(By.ID, "threshold").text) == pytest.approx(
                expected.threshold, rel=1e-4
            )
            heat = driver.find_element(By.ID, "heatmap")
            assert heat.get_attribute("src").startswith("data:image/png;base64,")
            assert driver.execute_script("return arguments[0].naturalWidth", heat) == 48
            shot = tmp_path / "page.png"
            driver.save_screenshot(str(shot))
            keep = os.environ.get("PATCHCORE_SCREENSHOT")
            if keep:
                shutil.copy(shot, keep)
            assert Image.open(shot).size[0] > 0
        finally:
            driver.quit()


def test_serve_refuses_a_missing_model_or_key_file_in_one_line(setup, tmp_path):
    code, _, err = run_cli("serve", "--model", tmp_path / "missing.pt")
    assert code == 2 and "missing.pt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("serve", "--model", setup["tiny"], "--api-key-file", tmp_path / "nokey")
    assert code == 2 and "nokey" in err


# --------------------------------------------------------------------------- routes safe by default
# (issue 18) and hostile input (issue 24, service rows), against the real server on loopback.

OPERATOR_KEY = "operator-" + "o" * 20
VIEWER_KEY = "viewer-" + "v" * 20
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
VIEWER = {"Authorization": f"Bearer {VIEWER_KEY}"}
SIDE = 48  # the test images are 48 x 48
REQUEST_PIXELS = 3 * SIDE * SIDE  # three plain images per request; one with a heatmap (x6) is too many


def _extension() -> tuple[ServiceExtension, list[ScoreEvent]]:
    """A station-like extension: a templated route, an operator-only route, a listener."""
    router = APIRouter(prefix="/ext")
    heard: list[ScoreEvent] = []

    @router.get("/items/{item_id}")
    async def item(item_id: str, who: Annotated[Principal, Depends(authenticate)]) -> dict:
        return {"item": item_id, "role": who.role}

    @router.post("/rollback")
    async def rollback(who: Annotated[Principal, Depends(require_operator)]) -> dict:
        return {"done": True, "role": who.role}

    return ServiceExtension(router=router, on_result=heard.append), heard


@pytest.fixture(scope="module")
def guarded(setup, tmp_path_factory):
    """A server with an operator key, a viewer key, an extension and small limits."""
    keys = tmp_path_factory.mktemp("keys")
    (keys / "operator").write_text(OPERATOR_KEY + "\n")
    (keys / "viewer").write_text(VIEWER_KEY)
    settings = ServiceSettings(
        api_key_file=str(keys / "operator"), viewer_key_file=str(keys / "viewer"), max_wait_ms=1,
        max_upload_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_request_pixels=REQUEST_PIXELS,
        max_pixels_in_flight=REQUEST_PIXELS, max_files=8,
    )  # fmt: skip
    extension, heard = _extension()
    app = create_app({"tiny": setup["tiny"]}, settings, extensions=[extension])

    # A route added to the built app by someone who forgot about auth: still behind the key.
    @app.get("/careless")
    async def careless() -> dict:
        return {"secret": 42}

    # And a router included the usual FastAPI way after the app was built.
    late = APIRouter()

    @late.get("/late/{thing}")
    async def late_route(thing: str) -> dict:
        return {"thing": thing}

    app.include_router(late)

    with running_server(app) as url:
        wait_ready(url, OPERATOR)
        yield {"url": url, "app": app, "heard": heard, "port": int(url.rsplit(":", 1)[1])}


def _example_path(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", template)


def test_every_route_but_healthz_and_the_page_shell_answers_401_without_the_key(guarded):
    url, app = guarded["url"], guarded["app"]
    routes = [(r.path, sorted(r.methods)) for r in app.routes if getattr(r, "methods", None)]
    templates = {path for path, _ in routes}
    # The enumeration sees the service's, the extension's, the schema's and the careless route.
    assert {"/predict", "/predict/batch", "/models", "/metrics", "/readyz", "/openapi.json"} <= templates
    assert {"/ext/items/{item_id}", "/ext/rollback", "/careless", "/healthz", "/"} <= templates
    public = set()
    for template, methods in routes:
        for method in methods:
            path = _example_path(template)
            for headers in ({}, {"Authorization": "Bearer wrong-key-of-some-length"}, {"Authorization": OPERATOR_KEY}):
                response = httpx.request(method, f"{url}{path}", headers=headers, timeout=30)
                if response.status_code != 401:
                    public.add(template)
                else:
                    assert response.headers["www-authenticate"] == "Bearer"
            assert httpx.request(method, f"{url}{path}", headers=OPERATOR, timeout=30).status_code != 401
    assert public == {"/healthz", "/"}
    # A router included after the app was built (FastAPI may keep it as one lazy route): guarded too.
    assert httpx.get(f"{url}/late/x").status_code == 401
    assert httpx.get(f"{url}/late/x", headers=OPERATOR).json() == {"thing": "x"}
    # An unknown path says 401 too (no route discovery without the key), and 404 with it.
    assert httpx.get(f"{url}/no/such/route").status_code == 401
    assert httpx.get(f"{url}/no/such/route", headers=OPERATOR).status_code == 404


def test_the_page_shell_loads_without_the_key_and_holds_no_data(guarded):
    shell = httpx.get(f"{guarded['url']}/")
    assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
    assert "tiny" not in shell.text and "resnet18" not in shell.text and "threshold\":" not in shell.text
    assert httpx.get(f"{guarded['url']}/healthz").json() == {"status": "ok"}


def test_the_viewer_key_scores_and_looks_but_operator_routes_answer_403(guarded, setup):
    url = guarded["url"]
    image = setup["images"]["bad"][0].read_bytes()
    for headers, role in ((VIEWER, "viewer"), (OPERATOR, "operator")):
        response = httpx.post(f"{url}/predict", files={"file": ("a.png", image)}, headers=headers, timeout=60)
        assert response.status_code == 200 and response.json()["anomalous"] is True
        assert httpx.get(f"{url}/ext/items/7", headers=headers).json() == {"item": "7", "role": role}
    assert httpx.post(f"{url}/ext/rollback", headers=VIEWER).status_code == 403
    assert httpx.post(f"{url}/ext/rollback", headers=OPERATOR).json() == {"done": True, "role": "operator"}


def test_an_extension_hears_every_scored_image_with_the_predictor_that_scored_it(guarded, setup):
    heard = guarded["heard"]
    heard.clear()
    paths = setup["images"]["good"][:2]
    files = [("file", (p.name, p.read_bytes())) for p in paths]
    body = httpx.post(f"{guarded['url']}/predict/batch", files=files, headers=VIEWER, timeout=60).json()
    assert [e.filename for e in heard] == [p.name for p in paths]
    assert [e.record["score"] for e in heard] == [r["score"] for r in body["results"]]
    assert all(e.principal.role == "viewer" and e.model == "tiny" for e in heard)
    assert all(e.scored.predictor is guarded["app"].state.patchcore.predictors["tiny"] for e in heard)


def test_metrics_are_labelled_by_route_template_and_unknown_paths_share_one_label(guarded):
    url = guarded["url"]
    for item in ("a", "b", "c"):
        httpx.get(f"{url}/ext/items/{item}", headers=OPERATOR)
    for path in ("/x1", "/x2/y", "/x3"):
        httpx.get(f"{url}{path}", headers=OPERATOR)
    samples = _samples(httpx.get(f"{url}/metrics", headers=OPERATOR).text)
    endpoints = {dict(labels).get("endpoint") for (name, labels) in samples if name == "patchcore_requests_total"}
    assert samples[("patchcore_requests_total", (("endpoint", "/ext/items/{item_id}"), ("status", "200")))] >= 3
    assert samples[("patchcore_requests_total", (("endpoint", "other"), ("status", "404")))] >= 3
    assert not any(e.startswith("/ext/items/") and "{" not in e for e in endpoints)
    assert not {"/x1", "/x2/y", "/x3"} & endpoints


def _body_bytes(url: str, endpoint: str) -> float:
    samples = _samples(httpx.get(f"{url}/metrics", headers=OPERATOR).text)
    return samples.get(("patchcore_request_body_bytes_total", (("endpoint", endpoint),)), 0.0)


def _chunked_head(port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Transfer-Encoding: chunked",
             "Content-Type: multipart/form-data; boundary=b0undary"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _send_until_answered(port: int, head: bytes, total: int, chunk: int = 16384) -> tuple[int, int]:
    """Send ``head``, then chunked body bytes until the server answers (or ``total`` is sent);
    (status, body bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = 0
    try:
        sock.sendall(head)
        # A well-formed multipart body: one file part whose content never ends.
        part = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        piece = f"{chunk:x}\r\n".encode() + b"\x00" * chunk + b"\r\n"
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(piece)
            sent += chunk
        select.select([sock], [], [], 30)
        answer = sock.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        answer = b""
    finally:
        sock.close()
    return (int(answer.split()[1]) if answer else 0), sent


def test_a_request_without_the_key_is_refused_before_any_body_byte_is_sent(guarded):
    url, port = guarded["url"], guarded["port"]
    before = _body_bytes(url, "/predict")
    for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            # A 1.5 GB chunked upload announced; not a byte of it sent: the answer comes from the headers.
            sock.sendall(_chunked_head(port, "/predict", headers))
            assert select.select([sock], [], [], 30)[0], "no answer before the body"
            assert sock.recv(65536).split()[1] == b"401"
        finally:
            sock.close()
        status, _ = _send_until_answered(port, _chunked_head(port, "/predict", headers), total=1_500_000_000)
        assert status == 401
    assert _body_bytes(url, "/predict") == before  # nothing of those bodies was read (or spooled)


def test_a_chunked_upload_over_the_limit_is_cut_off_while_it_streams(guarded, setup):
    url, port = guarded["url"], guarded["port"]
    limit = ServiceSettings(max_upload_bytes=MAX_BYTES).max_body_bytes
    before = _body_bytes(url, "/predict")
    status, sent = _send_until_answered(
        port, _chunked_head(port, "/predict", OPERATOR), total=200 * 1024 * 1024
    )
    read = _body_bytes(url, "/predict") - before
    assert status == 413
    assert limit < read <= limit + 256 * 1024  # stopped within a few reads of the limit
    assert sent < 100 * 1024 * 1024  # the client was answered long before its 200 MB were out
    # A legitimate chunked upload (no Content-Length) is scored as usual.
    image = setup["images"]["bad"][0].read_bytes()
    body = (
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b0undary--\r\n"
    )
    response = httpx.post(
        f"{url}/predict", content=iter([body[:100], body[100:]]), timeout=60,
        headers={**OPERATOR, "Content-Type": "multipart/form-data; boundary=b0undary"},
    )  # fmt: skip
    assert "content-length" not in response.request.headers
    assert response.status_code == 200 and response.json()["image"] == "c.png"


def test_a_request_over_its_pixel_budget_is_refused_before_decoding(guarded, setup):
    url = guarded["url"]
    paths = (setup["images"]["good"] + setup["images"]["bad"])[:4]
    files = [("file", (p.name, p.read_bytes())) for p in paths]
    ok = httpx.post(f"{url}/predict/batch", files=files[:3], headers=OPERATOR, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 3
    refused = httpx.post(f"{url}/predict/batch", files=files, headers=OPERATOR, timeout=60)
    assert refused.status_code == 413 and f"over the limit of {REQUEST_PIXELS}" in refused.json()["detail"]
    # A heatmap is the costly part: one image with it is over the same budget, without it is not.
    one = {"file": files[0][1]}
    assert httpx.post(f"{url}/predict", files=one, headers=OPERATOR, timeout=60).status_code == 200
    response = httpx.post(f"{url}/predict?heatmap=true", files=one, headers=OPERATOR, timeout=60)
    assert response.status_code == 413 and "heatmap" in response.json()["detail"]
    # Refused from the headers: a broken file among too many pixels is not even decoded.
    files.append(("file", ("broken.png", b"\x89PNG\r\n")))
    assert httpx.post(f"{url}/predict/batch", files=files, headers=OPERATOR, timeout=60).status_code == 413


def test_the_pixel_budget_admits_in_order_and_a_caller_that_gives_up_releases_its_place():
    async def main():
        budget = PixelBudget(10)
        order: list[str] = []
        release = asyncio.Event()

        async def job(name: str, pixels: int) -> None:
            async with budget.hold(pixels):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(job("a", 6))
        await asyncio.sleep(0.01)
        blocked = asyncio.create_task(job("b", 6))  # must wait for a
        small = asyncio.create_task(job("c", 2))  # fits, but waits behind b (first come first served)
        await asyncio.sleep(0.01)
        assert order == ["a"] and budget.used == 6
        blocked.cancel()  # b's client went away: c goes in, nothing leaks
        await asyncio.sleep(0.01)
        assert order == ["a", "c"] and budget.used == 8
        release.set()
        await asyncio.gather(first, small)
        assert budget.used == 0
        with pytest.raises(ValueError):
            async with budget.hold(11):
                pass

    asyncio.run(main())


class _SlowPredictor(Predictor):
    """The tiny model, taking ``delay`` seconds per call and counting its images."""

    def __init__(self, backend, delay: float):
        super().__init__(backend, per_call_range=False)
        self.delay = delay
        self.scored: list[str] = []

    def predict(self, images, names=None, **kwargs):
        self.scored.extend(names or [])
        time.sleep(self.delay)
        return super().predict(images, names=names, **kwargs)


def test_a_client_that_hangs_up_has_its_queued_image_dropped_not_computed(setup):
    slow = _SlowPredictor(Predictor.load(setup["tiny"], device="cpu").backend, delay=1.5)
    app = create_app({"slow": slow}, ServiceSettings(max_batch=1, max_wait_ms=0))
    image = setup["images"]["good"][0].read_bytes()

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            busy = asyncio.create_task(client.post("/predict", files={"file": ("busy.png", image)}))
            await asyncio.sleep(0.3)  # the worker is now scoring busy.png

            async def hang_up(i):
                async with httpx.AsyncClient(base_url=url, timeout=0.4) as impatient:
                    with pytest.raises(httpx.ReadTimeout):
                        await impatient.post("/predict", files={"file": (f"gone{i}.png", image)})

            await asyncio.gather(*(hang_up(i) for i in range(4)))
            first = await busy
            t0 = time.monotonic()
            after = await client.post("/predict", files={"file": ("after.png", image)})
            return first, after, time.monotonic() - t0

    with running_server(app) as url:
        wait_ready(url)
        slow.scored.clear()  # the warm-up, if any
        first, after, waited = asyncio.run(run(url))
        assert first.status_code == after.status_code == 200
        # Two images computed: the four abandoned ones were dropped from the queue, never scored.
        assert len(slow.scored) == 2, slow.scored
        assert waited < 1.5 + 1.4  # the next request waited for no abandoned work (one call: 1.5 s)
        samples = _samples(httpx.get(f"{url}/metrics").text)
        assert samples[("patchcore_dropped_requests_total", (("endpoint", "/predict"),))] == 4
        assert app.state.patchcore.batchers["slow"].dropped == 4


def test_a_key_less_server_answers_only_to_its_own_host_and_origin(server, setup):
    port = server.rsplit(":", 1)[1]
    assert httpx.get(f"{server}/models", headers={"Host": "evil.example"}).status_code == 403
    assert httpx.get(f"{server}/healthz", headers={"Host": f"evil.example:{port}"}).status_code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        assert httpx.get(f"{server}/models", headers={"Host": host}).status_code == 200
    image = setup["images"]["good"][0].read_bytes()
    for origin, status in (("http://evil.example", 403), ("null", 403), (f"http://127.0.0.1:{port}", 200)):
        response = httpx.post(
            f"{server}/predict?model=tiny", files={"file": ("a.png", image)}, headers={"Origin": origin}, timeout=60
        )
        assert response.status_code == status, origin


def _cli(*argv) -> tuple[int, str]:
    """``patchcore`` in this process, argparse's own exits included: (exit status, stderr)."""
    from patchcore.app import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--threads", "0", "--threads: must be an integer in 1..1024, got 0"),
        ("--max-upload-mb", "nan", "--max-upload-mb: must be a finite number"),
        ("--max-upload-mb", "inf", "--max-upload-mb: must be a finite number"),
        ("--max-wait-ms", "nan", "--max-wait-ms: must be a finite number"),
        ("--max-wait-ms", "1e12", "--max-wait-ms: must be a number in 0..1000"),
        ("--max-batch", "0", "--max-batch: must be an integer in 1..1024"),
        ("--port", "70000", "--port: must be an integer in 0..65535"),
        ("--max-pixels", "1.5", "--max-pixels: must be an integer"),
        ("--runtime", "tensorrt", "--runtime: must be one of torch, onnx, openvino"),
    ],
)
def test_serve_refuses_an_out_of_range_setting_in_one_line(setup, flag, value, says):
    code, err = _cli("serve", "--model", setup["tiny"], flag, value)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_a_folder_as_key_file_and_a_viewer_key_without_an_operator_key(setup, tmp_path):
    code, _, err = run_cli("serve", "--model", setup["tiny"], "--api-key-file", tmp_path)
    assert code == 2 and "is a folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "k").write_text("k" * 20)
    code, _, err = run_cli("serve", "--model", setup["tiny"], "--viewer-key-file", tmp_path / "k")
    assert code == 2 and "needs --api-key-file" in err
    code, _, err = run_cli(
        "serve", "--model", setup["tiny"], "--api-key-file", tmp_path / "k", "--viewer-key-file", tmp_path / "k"
    )
    assert code == 2 and "the same" in err


def test_every_serve_flag_comes_from_one_settings_field_with_its_default():
    from patchcore.app.cli import _parser, _serve_settings
    from patchcore.deploy.settings import Runtime, serve_options

    defaults = _serve_settings(_parser().parse_args(["serve", "--model", "m.pt"]))
    assert defaults == ServiceSettings()
    given = {
        "--host": "0.0.0.0", "--port": "9000", "--api-key-file": "k", "--viewer-key-file": "v",
        "--allow-host": "cam1", "--runtime": "onnx", "--device": "cpu", "--threads": "2", "--max-batch": "4",
        "--max-wait-ms": "2.5", "--max-upload-mb": "1.5", "--max-pixels": "1000", "--max-request-pixels": "2000",
        "--max-pixels-in-flight": "3000", "--max-files": "3",
        "--station-dir": "st", "--watch": "camera", "--watch-settle-s": "2", "--station-recent": "10",
        "--drift-window": "20", "--audit-max-mb": "1",
    }  # fmt: skip
    argv = ["serve", "--model", "m.pt"]
    for _name, option, _ in serve_options():
        argv += [option.flag, given[option.flag]]
    settings = _serve_settings(_parser().parse_args(argv))
    for name, _, default in serve_options():
        assert getattr(settings, name) != default, name
    assert settings.runtime is Runtime.ONNX and settings.max_upload_bytes == int(1.5 * 1024 * 1024)
    assert settings.allowed_hosts == ("cam1",)


def test_serve_on_a_busy_port_exits_2_in_one_line(setup):
    from _deploy import free_socket

    busy = free_socket()
    busy.listen()
    try:
        code, _, err = run_cli("serve", "--model", setup["tiny"], "--port", busy.getsockname()[1])
    finally:
        busy.close()
    assert code == 2 and "cannot listen on 127.0.0.1:" in err and "in use" in err
    assert len(err.strip().splitlines()) == 1


def test_a_model_that_cannot_be_loaded_exits_2_naming_the_file(setup, tmp_path):
    truncated = tmp_path / "patchcore_cut.pt"
    data = Path(setup["tiny"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    code, _, err = run_cli("serve", "--model", truncated, "--port", 0)
    assert code == 2 and str(truncated) in err and len(err.strip().splitlines()) == 1
    # Built from Python with a path (loaded in the background), the public /healthz says it too.
    app = create_app({"cut": truncated})
    with running_server(app, healthy=(200, 503)) as url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/healthz").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(f"{url}/healthz").json()["status"] == "failed"
        assert str(truncated) in httpx.get(f"{url}/readyz").json()["error"]


def test_an_export_folder_with_a_garbage_graph_exits_2_naming_it(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "export"
    folder.mkdir()
    transform = Predictor.load(setup["tiny"], device="cpu").transform.to_dict()
    (folder / "patchcore_export.json").write_text(json.dumps({"preprocessing": transform, "info": {}}))
    (folder / "patchcore.onnx").write_bytes(b"this is no onnx graph" * 10)
    code, _, err = run_cli("serve", "--model", folder, "--runtime", "onnx", "--port", 0)
    assert code == 2 and str(folder) in err and len(err.strip().splitlines()) == 1


class _Tagged(Predictor):
    """A Predictor subclass an extension loads the models with (as the station's versioned one)."""

    def result_fields(self, prediction):
        return {**super().result_fields(prediction), "model_version": 7}


def test_an_extension_chooses_the_class_that_loads_the_models_and_every_answer_comes_from_it(setup):
    app = create_app({"tiny": setup["tiny"]}, extensions=[ServiceExtension(predictor_class=_Tagged)])
    state = app.state.patchcore
    assert state.model_paths == {"tiny": Path(setup["tiny"])}
    with running_server(app) as url:
        wait_ready(url)
        assert isinstance(state.predictors["tiny"], _Tagged)
        image = setup["images"]["good"][0].read_bytes()
        body = httpx.post(f"{url}/predict", files={"file": ("a.png", image)}, timeout=60).json()
        assert body["model_version"] == 7
    with pytest.raises(DeployError, match="several extensions"):
        create_app({"tiny": setup["tiny"]}, extensions=[ServiceExtension(predictor_class=_Tagged)] * 2)


def test_a_cancelled_request_keeps_its_pixels_counted_until_its_thread_ends():
    from patchcore.deploy.service import _on_thread

    async def main():
        budget = PixelBudget(10)
        finished = threading.Event()

        def decode() -> None:  # a decode or heatmap that cannot be stopped once started
            time.sleep(0.6)
            finished.set()

        async def request() -> None:
            async with budget.hold(8):
                await _on_thread(decode)

        task = asyncio.create_task(request())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.2)
        # The client is gone, the thread still works: its pixels still count, a large request still waits.
        assert not finished.is_set() and budget.used == 8
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set() and budget.used == 0

    asyncio.run(main())

"""``patchcore serve``: the real uvicorn server on a free loopback port, driven over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from _deploy import as_array, make_images, png_size, running_server, tiny_model, wait_ready
from PIL import Image
from test_workflow import run_cli

from patchcore.deploy.batching import DynamicBatcher
from patchcore.deploy.calibration import calibrate, normalize_score
from patchcore.deploy.inference import Predictor
from patchcore.deploy.service import ServiceSettings, create_app
from patchcore.deploy.uploads import UploadError, decode_upload

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
    finally:
        process.terminate()
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

"""``patchcore export``: one graph (backbone -> patch features -> nearest-neighbour distance -> upsampled,
smoothed maps) that ONNX Runtime and OpenVINO run with the PyTorch model's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# Exporting needs the 'export' extra and serving the export the 'serve' extra (bash scripts/setup.sh --all
# installs both): skip, not error, without.
pytest.importorskip("onnx", reason='the \'export\' extra is not installed (pip install "patchcore[export]")')
pytest.importorskip("onnxruntime", reason='the \'export\' extra is not installed (pip install "patchcore[export]")')
pytest.importorskip("openvino", reason='the \'export\' extra is not installed (pip install "patchcore[export]")')
pytest.importorskip("fastapi", reason='the \'serve\' extra is not installed (pip install "patchcore[serve]")')
pytest.importorskip("uvicorn", reason='the \'serve\' extra is not installed (pip install "patchcore[serve]")')
pytest.importorskip("httpx", reason='the \'serve\' extra is not installed (pip install "patchcore[serve]")')
pytest.importorskip("prometheus_client", reason='the \'serve\' extra is not installed (pip install "patchcore[serve]")')

import httpx
from _deploy import make_images, running_server, tiny_model, wait_ready
from PIL import Image
from test_workflow import run_cli

from patchcore import PatchCore
from patchcore.deploy.calibration import calibrate
from patchcore.deploy.errors import DeployError
from patchcore.deploy.export import EXPORT_META, ExportableGraph, export_model
from patchcore.deploy.inference import Predictor
from patchcore.deploy.service import ServiceSettings, create_app
from patchcore.engine.persistence import state_digest as _state_digest

# float32 throughout; the graph sums in another order (convolution instead of unfold + mean, ||x||^2 -
# 2x.b + ||b||^2 instead of the index's distances): differences are a few float32 ulps of the largest
# values involved, far below 1e-4 of the score range.
RTOL = 1e-4


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_torch_thread):
    base = tmp_path_factory.mktemp("export")
    images = make_images(base / "images")
    model = tiny_model(images)
    model.calibration_ = calibrate(Predictor(model), images["calib"], 0.1, source="calib")
    path = model.save(base / "patchcore_tiny.pt")
    test = images["good"] + images["bad"]
    batch = torch.stack(Predictor(model).to_tensors([Image.open(p) for p in test]))
    reference = model.predict(batch)
    return {"base": base, "images": images, "model": model, "path": path, "batch": batch, "ref": reference}


def test_graph_in_torch_reproduces_the_estimator_on_real_images(setup):
    graph = ExportableGraph(setup["model"], chunk=100).eval()  # several bank blocks
    with torch.no_grad():
        scores, maps = graph(setup["batch"])
    assert _rel(scores.numpy(), setup["ref"].image_scores) < RTOL
    assert _rel(maps.numpy(), setup["ref"].anomaly_maps) < RTOL


@pytest.mark.parametrize(
    "params",
    [
        {"num_neighbors": 3},
        {"target_embed_dimension": None, "pretrain_embed_dimension": None},
        {"distance": "squared_l2", "smoothing_sigma": 0},
    ],
)
def test_graph_covers_k_neighbours_plain_concatenation_and_squared_distances(setup, params):
    model = PatchCore(**{**setup["model"].get_params(), **params, "device": "cpu"}).fit(
        [str(p) for p in setup["images"]["train"]]
    )
    reference = model.predict(setup["batch"])
    with torch.no_grad():
        scores, maps = ExportableGraph(model, chunk=257).eval()(setup["batch"])
    assert _rel(scores.numpy(), reference.image_scores) < RTOL
    assert _rel(maps.numpy(), reference.anomaly_maps) < RTOL


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exported_graph_matches_pytorch_in_its_runtime_and_serves_the_same_decisions(setup, fmt, tmp_path):
    out = tmp_path / fmt
    code, stdout, err = run_cli("export", "-m", setup["path"], "--format", fmt, "--out", out)
    assert code == 0, err
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["preprocessing"]["imagesize"] == 48 and meta["inputs"]["images"] == ["N", 3, 48, 48]
    assert meta["calibration"]["image_threshold"] == setup["model"].calibration_.image_threshold
    runtime = Predictor.load(out, runtime=fmt)
    scores, maps = runtime.backend.score(setup["batch"])
    assert scores.shape == (6,) and maps.shape == (6, 48, 48)
    assert _rel(scores, setup["ref"].image_scores) < RTOL
    assert _rel(maps, setup["ref"].anomaly_maps) < RTOL
    test = setup["images"]["good"] + setup["images"]["bad"]
    torch_records = Predictor(setup["model"]).predict(test)
    for got, want in zip(runtime.predict(test), torch_records, strict=True):
        assert got.score == pytest.approx(want.score, rel=RTOL)
        assert got.anomalous == want.anomalous and got.threshold == want.threshold


def test_serve_runs_the_exported_onnx_model(setup, tmp_path):
    export_model(setup["path"], "onnx", tmp_path / "onnx")
    app = create_app({"tiny": tmp_path / "onnx"}, ServiceSettings(runtime="onnx", max_wait_ms=1))
    expected = Predictor(setup["model"]).predict(setup["images"]["bad"][:1])[0]
    with running_server(app) as url:
        wait_ready(url)
        models = httpx.get(f"{url}/models").json()["models"]
        assert models[0]["runtime"] == "onnx" and models[0]["backbone"] == "resnet18"
        path = setup["images"]["bad"][0]
        body = httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes())}, timeout=60).json()
    assert body["score"] == pytest.approx(expected.score, rel=RTOL)
    assert body["anomalous"] is True and body["threshold"] == expected.threshold


def test_export_refuses_what_the_graph_cannot_express(setup, tmp_path):
    model = PatchCore.from_state_dict(setup["model"].state_dict(), device="cpu")
    model.reweight = True  # the paper's Eq. 7 needs a second search the graph does not have
    with pytest.raises(DeployError, match="reweight"):
        export_model(model, "onnx", tmp_path / "x")
    state = setup["model"].state_dict()
    state["params"]["imagesize"] = None  # sizes follow each image's aspect: no single graph size
    state["digest"] = _state_digest(state)
    model = PatchCore.from_state_dict(state, device="cpu")
    with pytest.raises(DeployError, match="fixed input size"):
        export_model(model, "onnx", tmp_path / "z")
    code, _, err = run_cli("export", "-m", tmp_path / "missing.pt", "--out", tmp_path / "y")
    assert code == 2 and "missing.pt" in err

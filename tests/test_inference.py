"""The shared prediction path: thread-safe, and the same numbers as the estimator."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore import PatchCore
from patchcore.deploy.inference import Predictor


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(6, 3, 32, 32)).astype(np.float32))
    model = PatchCore(
        backbone="resnet18", weights="random", resize=32, imagesize=32, device="cpu", percentage=0.5,
        batch_size=4,
    )  # fmt: skip
    return model.fit(images)


def test_eight_threads_predicting_on_one_model_get_exactly_the_serial_results(fitted):
    rng = np.random.default_rng(1)
    queries = [torch.from_numpy(rng.normal(size=(1, 3, 32, 32)).astype(np.float32)) for _ in range(50)]
    # A fresh copy, so the threads also race to build the extractor and the index on first use.
    model = PatchCore.from_state_dict(fitted.state_dict(), device="cpu")
    serial = PatchCore.from_state_dict(fitted.state_dict(), device="cpu")
    expected = [serial.predict(q) for q in queries]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        try:
            start.wait()
            results[worker] = [model.predict(q) for q in queries]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for worker in range(8):
        for got, want in zip(results[worker], expected, strict=True):
            np.testing.assert_array_equal(got.image_scores, want.image_scores)
            np.testing.assert_array_equal(got.anomaly_maps, want.anomaly_maps)
    # The model still works afterwards.
    np.testing.assert_array_equal(model.predict(queries[0]).image_scores, expected[0].image_scores)


def test_predictor_records_carry_the_estimators_scores_and_native_size_maps(fitted, tmp_path):
    paths = []
    for i, size in enumerate([(40, 48), (32, 32)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    records = Predictor(fitted).predict(paths)
    direct = fitted.predict([str(p) for p in paths])
    np.testing.assert_allclose([r.score for r in records], direct.image_scores, rtol=1e-6)
    assert records[0].unit_map.shape == (40, 48)
    assert all(0.0 <= r.unit_map.min() and r.unit_map.max() <= 1.0 for r in records)
    assert all(r.anomalous is None for r in records)  # no calibration: no invented decision

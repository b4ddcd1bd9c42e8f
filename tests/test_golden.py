"""Reproduce what the reference PatchCore code computes on real data (../shared/golden/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from patchcore import PatchCore
from patchcore.data.transforms import ImageTransform, load_image
from patchcore.engine.backbones import FeatureExtractor, load_backbone
from patchcore.engine.coreset import ApproximateGreedyCoreset, project
from patchcore.engine.features import patch_features
from patchcore.engine.index import MemoryBankIndex
from patchcore.engine.scoring import anomaly_maps, image_scores, patch_scores

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"
GOLDEN = GOLDEN_DIR / "elpv_effnetlite0_112.npz"

pytestmark = pytest.mark.skipif(
    not GOLDEN.is_file(),
    reason=f"golden fixtures not found at {GOLDEN} (only present beside the dev checkout)",
)

RTOL = 1e-4


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def golden_meta() -> dict:
    return json.loads(GOLDEN.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    network, _, layers = load_backbone("efficientnet-lite0")
    return FeatureExtractor(network, layers)


def assert_close(actual, expected, rtol=RTOL):
    """Relative error measured against the array's scale, so near-zero entries do not dominate."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert error <= rtol, f"relative error {error:.3g} > {rtol}"


def test_transform_reproduces_reference_input_tensors(golden, golden_meta):
    import elpv_dataset

    root = Path(elpv_dataset.__file__).parent / "data"
    transform = ImageTransform(resize=128, imagesize=112)
    train = torch.stack([transform(load_image(root / name)) for name in golden_meta["train_files"]])
    test = torch.stack([transform(load_image(root / name)) for name in golden_meta["test_files"]])
    assert_close(train.numpy(), golden["train_images"])
    assert_close(test.numpy(), golden["test_images"])


def test_hooked_layer_outputs_match_reference(golden, extractor):
    maps = extractor(torch.from_numpy(golden["test_images"][:1]))
    assert list(maps) == ["_blocks.4", "_blocks.10"]
    assert_close(maps["_blocks.4"].numpy(), golden["test0_layer_blocks4"])
    assert_close(maps["_blocks.10"].numpy(), golden["test0_layer_blocks10"])


def test_patch_features_match_reference(golden, extractor):
    maps = extractor(torch.from_numpy(golden["train_images"]))
    features, grid = patch_features(list(maps.values()), 3, 1, 1024, 1024)
    assert grid == (14, 14)
    assert_close(features.numpy(), golden["train_features"])
    maps = extractor(torch.from_numpy(golden["test_images"][:1]))
    features, _ = patch_features(list(maps.values()), 3, 1, 1024, 1024)
    assert_close(features.numpy(), golden["test0_features"])


def test_patch_features_from_reference_layer_maps(golden):
    # Independent of the backbone: the aggregation alone, from the reference's own layer outputs.
    layer_maps = [
        torch.from_numpy(golden["test0_layer_blocks4"]),
        torch.from_numpy(golden["test0_layer_blocks10"]),
    ]
    features, _ = patch_features(layer_maps, 3, 1, 1024, 1024)
    assert_close(features.numpy(), golden["test0_features"])


@pytest.mark.parametrize("method", ["pruned", "fused"])
def test_coreset_projection_and_indices_match_reference(golden, method):
    projected = project(golden["train_features"], golden["coreset_projection_weight"])
    assert_close(projected.numpy(), golden["coreset_projected"])
    sampler = ApproximateGreedyCoreset(percentage=0.1, method=method)
    indices = sampler.select_projected(
        torch.from_numpy(golden["coreset_projected"]), golden["coreset_start_points"]
    )
    np.testing.assert_array_equal(indices, golden["coreset_indices"])
    np.testing.assert_array_equal(golden["train_features"][indices], golden["memory_bank"])


def test_scores_and_maps_match_reference_in_squared_l2_mode(golden, extractor):
    index = MemoryBankIndex(golden["memory_bank"])
    maps = extractor(torch.from_numpy(golden["test_images"]))
    features, grid = patch_features(list(maps.values()), 3, 1, 1024, 1024)
    squared, _ = index.search(features.numpy(), 1)
    scores = patch_scores(squared, "squared_l2").reshape(4, *grid)
    assert_close(scores, golden["test_patch_scores"])
    assert_close(image_scores(scores), golden["test_image_scores"])
    assert_close(anomaly_maps(scores, (112, 112), 4.0), golden["test_anomaly_maps"])


def test_estimator_end_to_end_matches_reference(golden, monkeypatch):
    # Force the golden projection and start points through the estimator's own fit path.
    monkeypatch.setattr(
        ApproximateGreedyCoreset, "projection", lambda self, dim, rng: golden["coreset_projection_weight"]
    )
    monkeypatch.setattr(
        ApproximateGreedyCoreset, "start_points", lambda self, n, rng: golden["coreset_start_points"]
    )
    model = PatchCore(
        backbone="efficientnet-lite0", resize=128, imagesize=112, distance="squared_l2", device="cpu"
    ).fit(torch.from_numpy(golden["train_images"]))
    np.testing.assert_array_equal(model.coreset_indices_, golden["coreset_indices"])
    prediction = model.predict(torch.from_numpy(golden["test_images"]))
    assert_close(prediction.patch_scores, golden["test_patch_scores"])
    assert_close(prediction.image_scores, golden["test_image_scores"])
    assert_close(prediction.anomaly_maps, golden["test_anomaly_maps"])

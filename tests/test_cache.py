"""Feature cache: hits reuse features (no backbone pass), any change of data or feature settings misses."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore import PatchCore
from patchcore.app.cache import fit_cached
from patchcore.engine.features import PatchFeatures


class CachedModel:
    """A small PatchCore whose ``fit`` goes through the application's feature cache in ``cache_dir``."""

    def __init__(self, cache_dir, **overrides):
        params = dict(
            backbone="resnet18", weights="random", resize=32, imagesize=32, device="cpu",
            percentage=0.25, batch_size=4,
        )  # fmt: skip
        params.update(overrides)
        self.model = PatchCore(**params)
        self.cache_dir = str(cache_dir)

    def fit(self, images) -> PatchCore:
        return fit_cached(self.model, images, self.cache_dir)


def small_model(cache_dir, **overrides) -> CachedModel:
    return CachedModel(cache_dir, **overrides)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32))


def forbid_backbone(monkeypatch):
    def fail(self, images):
        raise AssertionError("the backbone ran on a cache hit")

    monkeypatch.setattr(PatchFeatures, "__call__", fail)


def test_second_fit_with_same_data_and_settings_hits_and_gives_the_same_bank(tmp_path, images, monkeypatch):
    first = small_model(tmp_path).fit(images)
    assert first.stats_.feature_cache == "miss"
    forbid_backbone(monkeypatch)
    second = small_model(tmp_path).fit(images)
    assert second.stats_.feature_cache == "hit"
    np.testing.assert_array_equal(first.memory_bank_, second.memory_bank_)
    assert second.stats_.n_patches == first.stats_.n_patches
    assert second.stats_.n_train_images == 5


def test_new_coreset_percentage_or_k_reuses_the_cached_features(tmp_path, images, monkeypatch):
    small_model(tmp_path).fit(images)
    forbid_backbone(monkeypatch)
    other = small_model(tmp_path, percentage=0.5, num_neighbors=3, sampler="random").fit(images)
    assert other.stats_.feature_cache == "hit"
    assert other.stats_.memory_size == int(other.stats_.n_patches * 0.5)


@pytest.mark.parametrize(
    "change",
    [{"patchsize": 5}, {"target_embed_dimension": 256}, {"layers": ["layer2"]}, {"precision": "bf16"}],
)
def test_changed_feature_settings_miss(tmp_path, images, change):
    small_model(tmp_path).fit(images)
    assert small_model(tmp_path, **change).fit(images).stats_.feature_cache == "miss"


def test_changed_images_miss(tmp_path, images):
    small_model(tmp_path).fit(images)
    changed = images.clone()
    changed[0, 0, 0, 0] += 1.0
    assert small_model(tmp_path).fit(changed).stats_.feature_cache == "miss"


def test_rewritten_image_file_invalidates_the_cache(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    cache = tmp_path / "cache"
    assert small_model(cache).fit(paths).stats_.feature_cache == "miss"
    assert small_model(cache).fit(paths).stats_.feature_cache == "hit"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 10**18))  # a different modification time, whatever the clock resolution
    assert small_model(cache).fit(paths).stats_.feature_cache == "miss"


def test_a_damaged_cache_entry_is_never_used(tmp_path, images):
    first = small_model(tmp_path).fit(images)
    (feature_file,) = tmp_path.glob("*/features.f32")
    with open(feature_file, "r+b") as handle:
        handle.truncate(100)
    again = small_model(tmp_path).fit(images)
    assert again.stats_.feature_cache == "miss"
    np.testing.assert_array_equal(first.memory_bank_, again.memory_bank_)


def test_generic_iterables_are_not_cached(tmp_path, images):
    model = small_model(tmp_path).fit(iter([images[:3], images[3:]]))
    assert model.stats_.feature_cache == "unsupported input"
    assert not any(tmp_path.iterdir())


def test_failed_extraction_leaves_no_cache_entry(tmp_path, images, monkeypatch):
    def fail(self, images):
        raise RuntimeError("backbone exploded")

    monkeypatch.setattr(PatchFeatures, "__call__", fail)
    with pytest.raises(RuntimeError, match="exploded"):
        small_model(tmp_path).fit(images)
    assert list(tmp_path.iterdir()) == []

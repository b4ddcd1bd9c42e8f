"""The disk-backed feature store: rows come back exactly, by slices and index arrays."""

from __future__ import annotations

import numpy as np
import pytest

from patchcore.engine.store import FeatureStore, open_features


@pytest.fixture()
def rows() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(1000, 7)).astype(np.float32)


@pytest.fixture()
def stored(tmp_path, rows):
    store = FeatureStore(tmp_path / "features.f32")
    for start in range(0, len(rows), 300):  # several appends, as batches come
        store.append(rows[start : start + 300])
    return store.array()


def test_slices_rows_and_index_arrays_read_back_exactly(stored, rows):
    assert stored.shape == rows.shape and len(stored) == len(rows)
    np.testing.assert_array_equal(stored[10:250], rows[10:250])
    np.testing.assert_array_equal(stored[::7], rows[::7])
    np.testing.assert_array_equal(stored[-1], rows[-1])
    index = np.array([999, 5, 6, 7, 0, 5, 3, 4, -2])  # unsorted, duplicated, runs, negative
    np.testing.assert_array_equal(stored[index], rows[index])
    np.testing.assert_array_equal(np.asarray(stored), rows)


def test_out_of_range_rows_raise_index_error(stored):
    with pytest.raises(IndexError):
        stored[1000]
    with pytest.raises(IndexError):
        stored[np.array([0, 1000])]


def test_rows_of_another_width_are_refused(tmp_path, rows):
    store = FeatureStore(tmp_path / "f.f32")
    store.append(rows)
    with pytest.raises(ValueError, match="width"):
        store.append(rows[:, :3])


def test_a_file_whose_size_disagrees_with_its_shape_is_refused(tmp_path, stored):
    with pytest.raises(ValueError, match="bytes"):
        open_features(stored.path, 1001, 7)


def test_an_empty_store_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        FeatureStore(tmp_path / "f.f32").array()


@pytest.mark.parametrize("durable", [True, False])
def test_only_a_durable_store_waits_for_the_disk_and_both_keep_every_row(tmp_path, monkeypatch, durable):
    # A fit's scratch features (durable=False) skip fsync (they are deleted after the fit); a cache's
    # entry (durable, the default) must be on disk before it is renamed into place.
    import os as os_module

    synced = []
    monkeypatch.setattr(os_module, "fsync", lambda fd: synced.append(fd))
    store = FeatureStore(tmp_path / "f.f32", durable=durable)
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    store.append(rows[:2])
    store.append(rows[2:].T.copy().T)  # a non-contiguous view's values, appended as rows
    features = store.array()
    assert bool(synced) == durable
    assert np.array_equal(features[0:6], rows)

"""Feature caching on disk (an application concern: the estimator only extracts and fits features): training patch features are reused when the data and feature settings are
unchanged, so a new coreset percentage, sampler or k does not run the backbone again.

The cache key is explicit: a SHA-256 over the data fingerprint (every image file's path, size and
modification time, or the bytes of in-memory tensors) and every setting that changes the features
(backbone, weights id, layers, transform, patch size and stride, embedding dimensions, precision, feature
format version). A cache entry is written to a temporary folder and renamed into place when complete, so a
half-written entry is never visible; an entry whose file size disagrees with its metadata is not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.model import PatchCore, ProgressCallback
from ..engine.store import FeatureStore, open_features

__all__ = ["FEATURE_FORMAT_VERSION", "CacheEntry", "FeatureCache", "data_fingerprint", "fit_cached"]

# Bump when the patch-feature computation changes: old entries then no longer match any key.
FEATURE_FORMAT_VERSION = 1


def _file_record(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def data_fingerprint(images: Any) -> str | None:
    """A digest identifying the images, or None when they cannot be identified without reading them
    all (a generic iterable of batches): then nothing is cached."""
    digest = hashlib.sha256()
    if isinstance(images, (torch.Tensor, np.ndarray)):
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        array = np.ascontiguousarray(array)
        digest.update(f"array:{array.dtype}:{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
        return digest.hexdigest()
    dataset = getattr(images, "dataset", None)  # a DataLoader
    samples = getattr(dataset, "samples", None)
    if samples is not None and hasattr(dataset, "transform"):
        records = [_file_record(Path(s.image_path)) for s in samples]
        transform = (
            dataset.transform.to_dict() if hasattr(dataset.transform, "to_dict") else repr(dataset.transform)
        )
        digest.update(json.dumps({"files": records, "transform": transform}).encode())
        return digest.hexdigest()
    if (
        isinstance(images, (list, tuple))
        and images
        and all(isinstance(i, (str, os.PathLike)) for i in images)
    ):
        digest.update(json.dumps({"files": [_file_record(Path(i)) for i in images]}).encode())
        return digest.hexdigest()
    return None


class CacheEntry:
    """A complete cache entry: memory-mapped features and their metadata."""

    def __init__(self, directory: Path, meta: dict[str, Any]):
        self.directory = directory
        self.meta = meta

    def features(self) -> np.ndarray:
        return open_features(self.directory / "features.f32", self.meta["n_rows"], self.meta["dim"])


class FeatureCache:
    """A folder of cache entries, one sub-folder per key."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @staticmethod
    def key(fingerprint: str, settings: dict[str, Any]) -> str:
        payload = json.dumps(
            {"data": fingerprint, "settings": settings, "format": FEATURE_FORMAT_VERSION}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def lookup(self, key: str) -> CacheEntry | None:
        directory = self.root / key
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            entry = CacheEntry(directory, meta)
            if meta.get("key") != key or meta.get("format") != FEATURE_FORMAT_VERSION:
                return None
            entry.features()  # checks the file size against the metadata
        except (OSError, ValueError, KeyError):
            return None
        return entry

    @contextlib.contextmanager
    def writer(self, key: str):
        """Yields (FeatureStore, meta dict to fill); on success the entry is renamed into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        store = FeatureStore(staging / "features.f32")
        meta: dict[str, Any] = {"key": key, "format": FEATURE_FORMAT_VERSION}
        try:
            yield store, meta
            store.close()
            meta.update(n_rows=store.n_rows, dim=store.dim)
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
            target = self.root / key
            if target.exists():  # a stale or concurrent entry: replace it
                shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        except BaseException:
            store.close()
            shutil.rmtree(staging, ignore_errors=True)
            raise


def fit_cached(
    model: PatchCore,
    images: Any,
    cache_dir: str | os.PathLike | None,
    *,
    progress: ProgressCallback | None = None,
) -> PatchCore:
    """``model.fit(images)``, reusing the training features kept in ``cache_dir`` when the images and the
    feature settings are unchanged (``stats_["feature_cache"]``: off, hit, miss or unsupported input)."""
    if cache_dir is None:
        return model.fit(images, progress=progress)
    fingerprint = data_fingerprint(images)
    if fingerprint is None:
        model.fit(images, progress=progress)
        model.stats_["feature_cache"] = "unsupported input"
        return model
    t0 = time.perf_counter()
    cache = FeatureCache(cache_dir)
    key = cache.key(fingerprint, model.feature_settings())
    entry = cache.lookup(key)
    status = "hit" if entry is not None else "miss"
    if entry is None:
        with cache.writer(key) as (store, meta):
            meta.update(model.extract_features(images, store, progress=progress))
        entry = cache.lookup(key)
        if entry is None:  # pragma: no cover - the entry was just renamed into place
            raise RuntimeError(f"feature cache entry {key} in {cache.root} vanished after writing")
    model.fit_features(
        entry.features(), entry.meta, progress=progress, extract_seconds=time.perf_counter() - t0
    )
    model.stats_["feature_cache"] = status
    return model

"""Feature caching on disk (an application concern: the estimator only extracts and fits features): training patch features are reused when the data and feature settings are
unchanged, so a new coreset percentage, sampler or k does not run the backbone again.

The cache key is explicit: a SHA-256 over the data fingerprint (every image file's path, size and
modification time, or the bytes of in-memory tensors) and every setting that changes the features
(backbone, weights id, layers, transform, patch size and stride, embedding dimensions, precision, feature
format version). A cache entry is written to a private staging folder and renamed into place when
complete, so a half-written entry is never visible; its SHA-256 is recorded and checked on every read (a
corrupted entry is recomputed, with a warning); concurrent runs sharing a cache never delete what another
reads (see :class:`FeatureCache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.model import PatchCore, ProgressCallback
from ..engine.store import FeatureFile, FeatureStore, open_features
from ..fileio import atomic_write_text
from .runs import process_alive

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: renames alone (still atomic per entry)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("patchcore")

__all__ = ["FEATURE_FORMAT_VERSION", "CacheEntry", "FeatureCache", "data_fingerprint", "fit_cached"]

# Bump when the patch-feature computation or the entry layout changes: old entries then match no key.
# 2: entries carry the SHA-256 of their features.
FEATURE_FORMAT_VERSION = 2


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
    """A complete, verified cache entry: its features and their metadata."""

    def __init__(self, directory: Path, meta: dict[str, Any]):
        self.directory = directory
        self.meta = meta

    def features(self) -> FeatureFile:
        return open_features(self.directory / "features.f32", self.meta["n_rows"], self.meta["dim"])


class _HashingStore(FeatureStore):
    """A feature store that hashes the rows as they are written (the entry's checksum, no second pass)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.sha256 = hashlib.sha256()

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        super().append(rows)
        self.sha256.update(memoryview(rows).cast("B"))


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class FeatureCache:
    """A folder of cache entries, one sub-folder per key.

    Safe to share between concurrent runs (processes or threads, on one machine or a shared file system):
    an entry is built in a private staging folder and renamed into place; a complete entry is never
    modified or deleted while valid, so a reader can never lose what it reads; every read verifies the
    entry's SHA-256, and a corrupted entry is recomputed with a warning and replaced under the cache's lock
    (re-checked there, so a valid entry that another run just installed is kept). Staging folders of
    processes that died (kill -9) are removed when a cache is next opened on that machine.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._remove_stale()

    @staticmethod
    def key(fingerprint: str, settings: dict[str, Any]) -> str:
        payload = json.dumps(
            {"data": fingerprint, "settings": settings, "format": FEATURE_FORMAT_VERSION}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def lookup(self, key: str) -> CacheEntry | None:
        """The verified entry for ``key``, or None (absent, incomplete, or corrupted: then with a warning)."""
        directory = self.root / key
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key or meta.get("format") != FEATURE_FORMAT_VERSION:
                return None
            entry = CacheEntry(directory, meta)
            entry.features()  # checks the file size against the metadata
            actual = _file_sha256(directory / "features.f32")
            if actual != meta["sha256"]:
                raise ValueError(f"checksum {actual[:12]}... does not match the recorded {meta['sha256'][:12]}...")
        except FileNotFoundError:
            return None  # being replaced by another run right now: a miss
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("feature cache entry %s is corrupted (%s): recomputing it", directory, exc)
            return None
        return entry

    @contextlib.contextmanager
    def _lock(self):
        """The cache's lock for renames and removals (not held while reading or extracting)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _private_name(self, kind: str) -> Path:
        return self.root / f".{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _remove_stale(self) -> None:
        """Remove staging / trash folders of processes on this machine that no longer run."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            kind, _, rest = path.name[1:].partition("-")
            if not path.name.startswith(".") or kind not in ("staging", "trash"):
                continue
            parts = rest.rsplit("-", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            if not process_alive(int(parts[1]), parts[0]):
                log.info("removing %s, left by a run that was stopped", path)
                shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def writer(self, key: str):
        """Yields (FeatureStore, meta dict to fill); on success the entry is renamed into place (or, when
        another run installed a valid entry first, that one is kept and this copy dropped)."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self._private_name("staging")
        staging.mkdir()
        store = _HashingStore(staging / "features.f32")
        meta: dict[str, Any] = {"key": key, "format": FEATURE_FORMAT_VERSION}
        try:
            yield store, meta
            store.close()
            meta.update(n_rows=store.n_rows, dim=store.dim, sha256=store.sha256.hexdigest())
            atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2))
            self._install(key, staging)
        finally:
            store.close()
            shutil.rmtree(staging, ignore_errors=True)

    def _install(self, key: str, staging: Path) -> None:
        target = self.root / key
        with self._lock():
            if target.exists():
                if self.lookup(key) is not None:
                    return  # another run installed a valid entry first: keep theirs, drop ours
                trash = self._private_name("trash")
                os.rename(target, trash)  # out of the way atomically; removed below
            else:
                trash = None
            os.rename(staging, target)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


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
        model.stats_ = replace(model.stats_, feature_cache="unsupported input")
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
        if entry is None:  # pragma: no cover - valid entries are never removed
            raise RuntimeError(f"feature cache entry {key} in {cache.root} vanished after writing")
    model.fit_features(
        entry.features(), entry.meta, progress=progress, extract_seconds=time.perf_counter() - t0
    )
    model.stats_ = replace(model.stats_, feature_cache=status)
    return model

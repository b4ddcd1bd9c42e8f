"""What the FAISS kinds (``flat``, ``ivf``, ``hnsw``) share: chunked searches above FAISS's BLAS threshold,
the bank kept beside the FAISS index, the exact fallback of the approximate kinds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import GrowableRows, SearchKind, SearchSettings

__all__ = ["MIN_CHUNK_ROWS", "FaissSearch", "blas_min_rows", "faiss_has_gpu"]

# An exact FAISS search computes distances with BLAS matrix products (one per block of 4096 queries x 1024
# bank vectors) only when it holds at least ``faiss.cvar.distance_compute_blas_threshold`` query elements
# (rows x dim; 128000 in FAISS 1.15); below that it loops vector by vector. Chunks are kept above both.
MIN_CHUNK_ROWS = 1024


def faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def blas_min_rows(dim: int) -> int:
    """The fewest queries of width ``dim`` that FAISS's exact search computes with BLAS."""
    import faiss

    threshold = int(getattr(faiss.cvar, "distance_compute_blas_threshold", 20))
    return max(1, math.ceil(threshold / max(1, dim)))


class FaissSearch(SearchKind):
    """A FAISS index over the bank, searched in chunks of ``chunk_rows`` queries (raised to at least
    ``MIN_CHUNK_ROWS`` and :func:`blas_min_rows`, so that exact search runs on BLAS; a last chunk too short
    for BLAS joins the one before it). Chunks bound the temporary memory; FAISS spreads each call over its
    OpenMP threads. Subclasses build the index (:meth:`_build`) and may drop rows without a rebuild
    (:meth:`_drop_tail`)."""

    def __init__(self, bank: np.ndarray, settings: SearchSettings, device: str = "cpu"):
        self._rows = GrowableRows(np.ascontiguousarray(bank, dtype=np.float32))
        self.settings = settings
        self.chunk_rows = max(int(settings.chunk_rows), MIN_CHUNK_ROWS, blas_min_rows(self.dim))
        self.on_gpu = device == "cuda"
        self._gpu_resources: Any = None
        self._exact: FaissSearch | None = None
        self.index = self._build(self.bank)

    @property
    def bank(self) -> np.ndarray:
        return self._rows.view

    def _build(self, bank: np.ndarray) -> Any:
        """The FAISS index holding ``bank`` (on the GPU when ``self.on_gpu``)."""
        raise NotImplementedError

    def _to_gpu(self, index: Any) -> Any:  # pragma: no cover - needs a CUDA build of faiss
        import faiss

        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    def _before_search(self, k: int) -> None:
        """Per-search settings of the FAISS index (HNSW's candidate list)."""

    def chunks(self, n: int):
        """(start, stop) slices of at most chunk_rows queries; a short tail joins the chunk before it."""
        bounds = list(range(0, n, self.chunk_rows)) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < blas_min_rows(self.dim):
            del bounds[-2]
        return zip(bounds[:-1], bounds[1:], strict=True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate kinds: a query for which fewer than k rows were found (an IVF probe of small cells)
        is answered exactly."""
        distances = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        self._before_search(k)
        for start, stop in self.chunks(len(queries)):
            distances[start:stop], indices[start:stop] = self.index.search(queries[start:stop], k)
        if not self.exact:
            missing = np.flatnonzero((indices < 0).any(axis=1))
            if len(missing):
                distances[missing], indices[missing] = self.exact_reference().search(queries[missing], k)
        # FAISS's BLAS path can return tiny negatives for (near-)identical vectors.
        np.maximum(distances, 0.0, out=distances)
        return distances, indices

    def add(self, rows: np.ndarray) -> None:
        self.index.add(rows)
        self._rows.append(rows)
        if self._exact is not None:
            self._exact.add(rows)

    def truncate(self, n_rows: int) -> None:
        if n_rows == len(self):
            return
        self._rows.truncate(n_rows)
        if not self._drop_tail(n_rows):
            self.index = self._build(self.bank)
        if self._exact is not None:
            self._exact.truncate(n_rows)

    def _drop_tail(self, n_rows: int) -> bool:
        """Remove the index's rows from ``n_rows`` on in place; False where FAISS cannot (then it is rebuilt).

        CPU flat and IVF indexes remove by id range and keep the order of what stays (an IVF cell's list
        keeps its first entries), so the index answers as it did before the rows were added."""
        import faiss

        if self.on_gpu:  # pragma: no cover - needs a CUDA build of faiss
            return False
        try:
            self.index.remove_ids(faiss.IDSelectorRange(n_rows, self.index.ntotal))
        except RuntimeError:  # FAISS: "not implemented for this type of index"
            return False
        return int(self.index.ntotal) == n_rows

    def exact_reference(self) -> SearchKind:
        if self.exact:
            return self
        if self._exact is None:
            from .flat import FlatSearch

            self._exact = FlatSearch(self.bank, SearchSettings(chunk_rows=self.chunk_rows))
        return self._exact

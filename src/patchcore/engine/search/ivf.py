"""``ivf``: FAISS's ``IndexIVFFlat``, an inverted file of ``nlist`` k-means cells; approximate.

The cells are trained on the bank itself with a fixed seed, so two builds on the same bank give the same
index and the same results; a query visits the ``nprobe`` nearest cells. Rows added later join the cells
trained at build time (the cells are not retrained). On the GPU when asked and FAISS has one (trained on
the CPU, then copied).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Devices, Placement, SearchSettings
from .faiss_common import FaissSearch
from .registry import register_search_kind

__all__ = ["IVF_SEED", "MIN_POINTS_PER_CELL", "IvfSearch", "ivf_nlist"]

IVF_SEED = 1234  # faiss ClusteringParameters seed for the IVF k-means (fixed: deterministic builds)
MIN_POINTS_PER_CELL = 39  # faiss warns below 39 training points per k-means centroid


def ivf_nlist(n_bank: int) -> int:
    """IVF cell count for a bank of ``n_bank`` vectors: about 4 sqrt(M), at most M / 39, at least 1."""
    return max(1, min(round(4 * math.sqrt(n_bank)), n_bank // MIN_POINTS_PER_CELL))


@register_search_kind
class IvfSearch(FaissSearch):
    name = "ivf"
    exact = False

    def __init__(self, bank: np.ndarray, settings: SearchSettings, device: str = "cpu"):
        self.nprobe = int(settings.nprobe)
        self.nlist = ivf_nlist(len(bank)) if settings.nlist is None else int(settings.nlist)
        if not 1 <= self.nlist <= len(bank):
            raise ValueError(f"nlist must be in [1, {len(bank)}] (the bank size), got {settings.nlist}")
        self._trained_rows = len(bank)  # a rebuild trains on these rows again: the same cells
        super().__init__(bank, settings, device)

    @classmethod
    def place(cls, use_gpu: bool, devices: Devices) -> Placement:
        if not use_gpu:
            return Placement("ivf", "cpu", "on the CPU")
        if devices.faiss_gpu:
            return Placement("ivf", "cuda", "FAISS has GPU support: IndexIVFFlat on the GPU")
        return Placement("ivf", "cpu", "FAISS has no GPU support: IndexIVFFlat on the CPU")

    def _build(self, bank: np.ndarray) -> Any:
        import faiss

        quantizer = faiss.IndexFlatL2(bank.shape[1])
        index = faiss.IndexIVFFlat(quantizer, bank.shape[1], self.nlist, faiss.METRIC_L2)
        index.cp.seed = IVF_SEED
        index.cp.verbose = False
        index.train(bank[: self._trained_rows])
        index.nprobe = min(self.nprobe, self.nlist)
        self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        index.add(bank)  # fill on the CPU, where it was trained: a GPU copy takes the lists and nprobe
        if self.on_gpu:  # pragma: no cover - needs a CUDA build of faiss
            index = self._to_gpu(index)
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(self.nprobe, self.nlist))
        return index

    def truncate(self, n_rows: int) -> None:
        self._trained_rows = min(self._trained_rows, n_rows)
        super().truncate(n_rows)

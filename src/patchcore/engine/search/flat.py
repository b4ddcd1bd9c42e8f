"""``flat``: exact search by FAISS's ``IndexFlatL2`` (the reference's), on the GPU where FAISS has one."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Devices, Placement
from .faiss_common import FaissSearch
from .registry import register_search_kind

__all__ = ["FlatSearch"]


@register_search_kind
class FlatSearch(FaissSearch):
    """Brute force, ``||a||^2 - 2 a.b + ||b||^2`` in BLAS float32 products (clamped at 0)."""

    name = "flat"
    exact = True

    @classmethod
    def place(cls, use_gpu: bool, devices: Devices) -> Placement:
        """On a CUDA device: FAISS's GPU index when FAISS has GPU support; otherwise the ``torch`` kind on
        CUDA (exact torch products, float64 re-ranking: the same neighbours); the CPU when torch sees no CUDA."""
        if not use_gpu:
            return Placement("flat", "cpu", "on the CPU")
        if devices.faiss_gpu:
            return Placement("flat", "cuda", "FAISS has GPU support: IndexFlatL2 on the GPU")
        if devices.torch_cuda:
            return Placement(
                "torch", "cuda", "FAISS has no GPU support: the exact 'torch' kind on CUDA instead (same neighbours)"
            )
        return Placement("flat", "cpu", "no CUDA device visible to torch: on the CPU")

    def _build(self, bank: np.ndarray) -> Any:
        import faiss

        index = faiss.IndexFlatL2(bank.shape[1])
        if self.on_gpu:  # pragma: no cover - needs a CUDA build of faiss
            index = self._to_gpu(index)
        index.add(bank)
        return index

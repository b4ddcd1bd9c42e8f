"""``pruned``: exact search on the CPU with a certified principal-component lower bound that skips most
bank rows (the numba kernel is :mod:`.pruned_kernel`).

Same neighbours as ``flat`` up to float32 rounding of the distances (its distances are float64 sums of
squared differences, not FAISS's ``||a||^2 - 2 a.b + ||b||^2``, so they differ from ``flat``'s in the last
bits). Rows added later are projected on the basis computed at build time; the bound stays certified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import Devices, Placement, SearchKind, SearchSettings
from .registry import register_search_kind

if TYPE_CHECKING:
    from .pruned_kernel import PrunedExactSearch

__all__ = ["PrunedSearch"]


@register_search_kind
class PrunedSearch(SearchKind):
    name = "pruned"
    exact = True

    def __init__(self, bank: np.ndarray, settings: SearchSettings, device: str = "cpu"):
        from .pruned_kernel import PrunedExactSearch  # numba compiles on first use: only when asked for

        self.kernel: PrunedExactSearch = PrunedExactSearch(bank, precision=settings.search_precision)
        self.search_precision = self.kernel.precision

    @classmethod
    def place(cls, use_gpu: bool, devices: Devices) -> Placement:
        """On a CUDA device: the ``torch`` kind there (exact torch products, float64 re-ranking: the same
        neighbours; the pruned kernel is CPU code); the CPU when torch sees no CUDA device."""
        if not use_gpu:
            return Placement("pruned", "cpu", "on the CPU")
        if devices.torch_cuda:
            return Placement("torch", "cuda", "the pruned kernel runs on the CPU: the exact 'torch' kind on CUDA instead")
        return Placement("pruned", "cpu", "no CUDA device visible to torch: on the CPU")

    @property
    def bank(self) -> np.ndarray:
        return self.kernel.bank

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.kernel.search(queries, k)

    def add(self, rows: np.ndarray) -> None:
        self.kernel.add(rows)

    def truncate(self, n_rows: int) -> None:
        self.kernel.truncate(n_rows)

"""``hnsw``: FAISS's ``IndexHNSWFlat`` (M=32, efConstruction=80), a proximity graph searched with
``ef_search`` candidates; approximate, CPU only (FAISS has no GPU HNSW).

Graph construction is multi-threaded, so its exact shape (and which near neighbour a query finds) can vary
between builds unless FAISS runs on one thread. Added rows join the graph; :meth:`HnswSearch.truncate`
rebuilds it (FAISS cannot remove graph nodes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import SearchSettings
from .faiss_common import FaissSearch
from .registry import register_search_kind

__all__ = ["HNSW_EF_CONSTRUCTION", "HNSW_M", "HnswSearch"]

HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 80


@register_search_kind
class HnswSearch(FaissSearch):
    name = "hnsw"
    exact = False

    def __init__(self, bank: np.ndarray, settings: SearchSettings, device: str = "cpu"):
        self.ef_search = int(settings.ef_search)
        super().__init__(bank, settings, "cpu")

    def _build(self, bank: np.ndarray) -> Any:
        import faiss

        index = faiss.IndexHNSWFlat(bank.shape[1], HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = self.ef_search
        index.add(bank)
        return index

    def _before_search(self, k: int) -> None:
        self.index.hnsw.efSearch = max(self.ef_search, k)

    def _drop_tail(self, n_rows: int) -> bool:
        return False

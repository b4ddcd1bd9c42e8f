"""The memory bank's nearest-neighbour index (FAISS), searched in chunks.

FAISS returns squared L2 distances. ``distance="euclidean"`` (the paper, our default) takes their square
root; ``distance="squared_l2"`` keeps them (what the reference code reports).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DISTANCES", "MemoryBankIndex", "faiss_has_gpu"]

DISTANCES = ("euclidean", "squared_l2")


def faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class MemoryBankIndex:
    """Exact L2 search over the memory bank (``IndexFlatL2``; on the GPU when asked and available)."""

    def __init__(self, bank: np.ndarray, use_gpu: bool = False, chunk_rows: int = 16384):
        import faiss

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"the memory bank must be a non-empty (M, D) array, got shape {bank.shape}")
        self.bank = bank
        self.dim = bank.shape[1]
        self.chunk_rows = chunk_rows
        index = faiss.IndexFlatL2(self.dim)
        self.on_gpu = bool(use_gpu and faiss_has_gpu())
        if self.on_gpu:  # pragma: no cover - needs a CUDA build of faiss
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        index.add(bank)
        self.index = index

    def __len__(self) -> int:
        return len(self.bank)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (n, k) and bank indices (n, k) of the k nearest bank vectors."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        k = min(k, len(self.bank))
        distances = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.chunk_rows):
            stop = start + self.chunk_rows
            distances[start:stop], indices[start:stop] = self.index.search(queries[start:stop], k)
        # FAISS's BLAS path can return tiny negatives for (near-)identical vectors.
        np.maximum(distances, 0.0, out=distances)
        return distances, indices

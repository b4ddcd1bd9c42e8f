"""The memory bank's nearest-neighbour index (FAISS), searched in chunks.

FAISS returns squared L2 distances. ``distance="euclidean"`` (the paper, our default) takes their square
root; ``distance="squared_l2"`` keeps them (what the reference code reports).

Three kinds of index (``kind``):

- ``"flat"`` (default): exact search, ``IndexFlatL2`` (the reference's; on the GPU when asked and available;
  with a CUDA device but a FAISS without GPU support, ``_torch_search``: torch matrix products on the GPU
  with float64 re-ranking, the same answer; ``pruned`` on a CUDA device takes that path too).
- ``"pruned"``: exact search too, on the CPU, with a certified principal-component lower bound that skips
  most bank vectors (see ``_pruned_search``); needs numba. Same neighbours as ``flat`` up to float32
  rounding of the distances (its distances are computed as sums of squared differences, not by FAISS's
  ``||a||^2 - 2 a.b + ||b||^2``, so they differ from ``flat``'s in the last bits).
- ``"ivf"``: ``IndexIVFFlat``, an inverted file of ``nlist`` k-means cells (trained on the bank itself with a
  fixed seed, so two builds on the same bank give the same index and the same results); a query visits the
  ``nprobe`` nearest cells. On the GPU when asked and available (trained on the CPU, then copied).
- ``"hnsw"``: ``IndexHNSWFlat`` (M=32, efConstruction=80), a proximity graph searched with ``ef_search``
  candidates. CPU only (FAISS has no GPU HNSW). Graph construction is multi-threaded, so its exact shape
  (and which near neighbour a query finds) can vary between builds unless FAISS runs on one thread.

The approximate kinds may miss a query's true nearest bank vector, never invent a closer one: their
distances are those of real bank vectors, so (up to float32 rounding) they are >= the exact ones and patch
scores can only go up. ``MemoryBankIndex.recall`` measures how often they find the exact neighbours.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DISTANCES", "INDEX_KINDS", "MemoryBankIndex", "blas_min_rows", "faiss_has_gpu", "ivf_nlist"]

DISTANCES = ("euclidean", "squared_l2")
INDEX_KINDS = ("flat", "pruned", "ivf", "hnsw")

HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 80
IVF_SEED = 1234  # faiss ClusteringParameters seed for the IVF k-means (fixed: deterministic builds)
MIN_POINTS_PER_CELL = 39  # faiss warns below 39 training points per k-means centroid
# An exact FAISS search computes distances with BLAS matrix products (one per block of 4096 queries x 1024
# bank vectors) only when it holds at least ``faiss.cvar.distance_compute_blas_threshold`` query elements
# (rows x dim; 128000 in FAISS 1.15); below that it loops vector by vector. Chunks are kept above both.
MIN_CHUNK_ROWS = 1024


def faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def ivf_nlist(n_bank: int) -> int:
    """IVF cell count for a bank of ``n_bank`` vectors: about 4 sqrt(M), at most M / 39, at least 1."""
    return max(1, min(round(4 * math.sqrt(n_bank)), n_bank // MIN_POINTS_PER_CELL))


class MemoryBankIndex:
    """L2 nearest-neighbour search over the memory bank: exact (``kind="flat"``) or approximate.

    Parameters
    ----------
    bank: (M, D) memory bank, copied to float32.
    use_gpu: put ``flat`` and ``ivf`` indexes on the GPU when FAISS has one (``hnsw`` stays on the CPU).
    chunk_rows: queries per FAISS call, raised to at least ``MIN_CHUNK_ROWS`` and :func:`blas_min_rows`, so
        that exact search runs on BLAS; a last chunk too short for BLAS is merged into the one before it.
        (Chunks bound the temporary memory; FAISS spreads each call over its OpenMP threads.)
    kind: ``flat`` (exact, default), ``ivf`` or ``hnsw``; see the module docstring.
    nprobe: IVF cells visited per query (>= 1; more = slower, higher recall).
    ef_search: HNSW candidate list size per query (>= 1; raised to k when k is larger).
    nlist: IVF cell count; None = :func:`ivf_nlist` of the bank size.
    threads: when given, ``faiss.omp_set_num_threads(threads)``: FAISS's OpenMP thread count for build and
        search. This is process-wide and is not restored afterwards; None leaves it as it is (by default
        FAISS uses every core OpenMP sees).
    search_precision: ``pruned`` only: the precision of its candidate bound's matrix product, ``auto``
        (bf16 where the CPU multiplies bf16 natively: AMX or AVX512-BF16; float32 elsewhere), ``bf16`` or
        ``fp32``. The answer is exact in every mode; the chosen one is logged and kept in
        ``search_precision``.
    """

    def __init__(
        self,
        bank: np.ndarray,
        use_gpu: bool = False,
        chunk_rows: int = 16384,
        kind: str = "flat",
        nprobe: int = 8,
        ef_search: int = 64,
        nlist: int | None = None,
        threads: int | None = None,
        search_precision: str = "auto",
    ):
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
        if int(nprobe) < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if int(ef_search) < 1:
            raise ValueError(f"ef_search must be >= 1, got {ef_search}")
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            faiss.omp_set_num_threads(int(threads))
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"the memory bank must be a non-empty (M, D) array, got shape {bank.shape}")
        self.bank = bank
        self.dim = bank.shape[1]
        self.kind = kind
        self.chunk_rows = max(int(chunk_rows), MIN_CHUNK_ROWS, blas_min_rows(self.dim))
        self.nprobe = int(nprobe)
        self.ef_search = int(ef_search)
        self.threads = threads
        self.nlist: int | None = None
        self._exact: MemoryBankIndex | None = None
        gpu = bool(use_gpu and kind in ("flat", "ivf") and faiss_has_gpu())
        self._pruned = None
        self._torch = None
        self.search_precision = "fp32"

        if kind in ("flat", "pruned") and use_gpu and not gpu and _torch_cuda():  # pragma: no cover - GPU
            # A CUDA device but FAISS without GPU support: exact search by torch matrix products there.
            from ._torch_search import TorchExactSearch

            self._torch = TorchExactSearch(bank, "cuda")
            self.on_gpu = True
            self.index = None
            return
        if kind == "pruned":
            from ._pruned_search import PrunedExactSearch

            self._pruned = PrunedExactSearch(bank, precision=search_precision)
            self.search_precision = self._pruned.precision
            self.on_gpu = False
            self.index = None
            return
        if kind == "flat":
            index = faiss.IndexFlatL2(self.dim)
        elif kind == "ivf":
            self.nlist = ivf_nlist(len(bank)) if nlist is None else int(nlist)
            if not 1 <= self.nlist <= len(bank):
                raise ValueError(f"nlist must be in [1, {len(bank)}] (the bank size), got {nlist}")
            quantizer = faiss.IndexFlatL2(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_L2)
            index.cp.seed = IVF_SEED
            index.cp.verbose = False
            index.train(bank)
            index.nprobe = min(self.nprobe, self.nlist)
            self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        else:
            index = faiss.IndexHNSWFlat(self.dim, HNSW_M)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = self.ef_search

        self.on_gpu = gpu
        if gpu:  # pragma: no cover - needs a CUDA build of faiss
            self._gpu_resources = faiss.StandardGpuResources()
            if kind == "ivf":
                index.add(bank)  # fill on the CPU, where it was trained: the copy takes lists and nprobe
                index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(self.nprobe, self.nlist))
            else:
                index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
                index.add(bank)
        else:
            index.add(bank)
        self.index = index

    def __len__(self) -> int:
        return len(self.bank)

    @property
    def exact(self) -> bool:
        return self.kind in ("flat", "pruned")

    def _chunks(self, n: int):
        """(start, stop) slices of at most chunk_rows queries; a short tail joins the chunk before it."""
        bounds = list(range(0, n, self.chunk_rows)) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < blas_min_rows(self.dim):
            del bounds[-2]
        return zip(bounds[:-1], bounds[1:], strict=True)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (n, k) and bank indices (n, k) of the k nearest bank vectors (k <= M).

        Approximate kinds: the k nearest bank vectors FAISS found (distances >= the exact ones); a query
        for which fewer than k were found (an IVF probe of small cells) is answered exactly.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), len(self.bank))
        distances = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        if self._pruned is not None:
            distances, indices = self._pruned.search(queries, k)
            return distances, indices
        if self._torch is not None:  # pragma: no cover - GPU
            return self._torch.search(queries, k)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        for start, stop in self._chunks(len(queries)):
            distances[start:stop], indices[start:stop] = self.index.search(queries[start:stop], k)
        if not self.exact:
            missing = np.flatnonzero((indices < 0).any(axis=1))
            if len(missing):
                distances[missing], indices[missing] = self._exact_index().search(queries[missing], k)
        # FAISS's BLAS path can return tiny negatives for (near-)identical vectors.
        np.maximum(distances, 0.0, out=distances)
        return distances, indices

    def _exact_index(self) -> MemoryBankIndex:
        if self.exact:
            return self
        if self._exact is None:
            self._exact = MemoryBankIndex(self.bank, chunk_rows=self.chunk_rows)  # flat
        return self._exact

    def recall(self, queries: np.ndarray, k: int = 1) -> float:
        """Agreement with exact search: the mean over queries of |found k-set & exact k-set| / k.

        For k=1 the fraction of queries whose nearest bank vector is the exact one; 1.0 for ``flat``.
        The exact answers come from a CPU ``IndexFlatL2`` on the same bank (built on first use).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim or len(queries) == 0:
            raise ValueError(f"recall needs queries of shape (n >= 1, {self.dim}), got {queries.shape}")
        if self.exact:
            return 1.0
        _, found = self.search(queries, k)
        _, truth = self._exact_index().search(queries, k)
        k = found.shape[1]
        if k == 1:
            return float(np.mean(found[:, 0] == truth[:, 0]))
        hits = sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(found, truth, strict=True))
        return hits / (len(queries) * k)


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def blas_min_rows(dim: int) -> int:
    """The fewest queries of width ``dim`` that FAISS's exact search computes with BLAS."""
    import faiss

    threshold = int(getattr(faiss.cvar, "distance_compute_blas_threshold", 20))
    return max(1, math.ceil(threshold / max(1, dim)))

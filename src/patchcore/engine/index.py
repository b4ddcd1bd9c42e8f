"""The memory bank's nearest-neighbour index: the facade the estimator, scoring and the benchmarks use.

FAISS returns squared L2 distances. ``distance="euclidean"`` (the paper, our default) takes their square
root; ``distance="squared_l2"`` keeps them (what the reference code reports).

The kinds of index (``kind``, one module each under :mod:`patchcore.engine.search`, listed in
``INDEX_KINDS`` from the registry):

- ``"flat"`` (default): exact search, ``IndexFlatL2`` (the reference's).
- ``"pruned"``: exact search too, on the CPU, with a certified principal-component lower bound that skips
  most bank vectors (see :mod:`~patchcore.engine.search.pruned_kernel`); numba. Same neighbours as ``flat``
  up to float32 rounding of the distances.
- ``"ivf"``: ``IndexIVFFlat``, an inverted file of ``nlist`` k-means cells (trained on the bank itself with a
  fixed seed, so two builds on the same bank give the same index and the same results); a query visits the
  ``nprobe`` nearest cells.
- ``"hnsw"``: ``IndexHNSWFlat`` (M=32, efConstruction=80), a proximity graph searched with ``ef_search``
  candidates. CPU only. Graph construction is multi-threaded, so its exact shape (and which near neighbour
  a query finds) can vary between builds unless FAISS runs on one thread.
- ``"torch"``: exact search by torch matrix products with float64 re-ranking (same neighbours as ``pruned``).

The device rule (``use_gpu``: the model runs on a CUDA device), each kind's ``place``, logged at INFO when the
index is built: ``flat`` and ``ivf`` run on FAISS's GPU index when FAISS has GPU support; otherwise ``flat``
runs as the ``torch`` kind on CUDA, and ``pruned`` (CPU code) always does; ``hnsw`` stays on the CPU.

The approximate kinds may miss a query's true nearest bank vector, never invent a closer one: their
distances are those of real bank vectors, so (up to float32 rounding) they are >= the exact ones and patch
scores can only go up. ``MemoryBankIndex.recall`` measures how often they find the exact neighbours.

The index grows in place (:meth:`MemoryBankIndex.add`) and shrinks back (:meth:`MemoryBankIndex.truncate`).
"""

from __future__ import annotations

import numpy as np

from .search import SEARCH_KINDS, SearchKind, SearchSettings, make_search, search_kind
from .search.base import as_rows
from .search.faiss_common import MIN_CHUNK_ROWS, blas_min_rows, faiss_has_gpu
from .search.ivf import ivf_nlist

__all__ = [
    "DISTANCES",
    "INDEX_KINDS",
    "MIN_CHUNK_ROWS",
    "MemoryBankIndex",
    "blas_min_rows",
    "faiss_has_gpu",
    "ivf_nlist",
]

DISTANCES = ("euclidean", "squared_l2")
INDEX_KINDS = tuple(SEARCH_KINDS)


class MemoryBankIndex:
    """L2 nearest-neighbour search over the memory bank: exact (``kind="flat"``) or another registered kind.

    Parameters
    ----------
    bank: (M, D) memory bank, copied to float32.
    use_gpu: the model runs on a CUDA device: each kind decides where it runs (see the module docstring).
    chunk_rows: FAISS kinds: queries per FAISS call, raised to at least ``MIN_CHUNK_ROWS`` and
        :func:`blas_min_rows`, so that exact search runs on BLAS; a last chunk too short for BLAS is merged
        into the one before it.
    kind: a name in ``INDEX_KINDS``; see the module docstring.
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

    ``searcher`` is the built :class:`~patchcore.engine.search.SearchKind` (its ``name`` is the kind that
    runs, which the device rule may have changed: ``kind`` keeps the one asked for).
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

        search_kind(kind)  # an unknown kind: a ValueError naming the known ones, before any work
        settings = SearchSettings(
            use_gpu=bool(use_gpu), chunk_rows=int(chunk_rows), nprobe=int(nprobe), ef_search=int(ef_search),
            nlist=nlist, search_precision=search_precision,
        )  # fmt: skip
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            faiss.omp_set_num_threads(int(threads))
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"the memory bank must be a non-empty (M, D) array, got shape {bank.shape}")
        self.dim = bank.shape[1]
        self.kind = kind
        self.chunk_rows = max(int(chunk_rows), MIN_CHUNK_ROWS, blas_min_rows(self.dim))
        self.nprobe = int(nprobe)
        self.ef_search = int(ef_search)
        self.threads = threads
        self.searcher: SearchKind = make_search(kind, bank, settings)

    @property
    def bank(self) -> np.ndarray:
        """The (M, D) float32 rows searched (grows with :meth:`add`)."""
        return self.searcher.bank

    @property
    def exact(self) -> bool:
        return self.searcher.exact

    @property
    def on_gpu(self) -> bool:
        return self.searcher.on_gpu

    @property
    def search_precision(self) -> str:
        return self.searcher.search_precision

    @property
    def nlist(self) -> int | None:
        return getattr(self.searcher, "nlist", None)

    def __len__(self) -> int:
        return len(self.searcher)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (n, k) and bank indices (n, k) of the k nearest bank vectors (k <= M).

        Approximate kinds: the k nearest bank vectors FAISS found (distances >= the exact ones); a query
        for which fewer than k were found (an IVF probe of small cells) is answered exactly.
        """
        queries = as_rows(queries, self.dim, "queries")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self.searcher.search(queries, min(int(k), len(self)))

    def add(self, rows: np.ndarray) -> None:
        """Append (n, D) rows to the bank in place (indices len(self) .. len(self) + n - 1).

        No kind rebuilds what it already holds: ``flat``/``hnsw`` add to the FAISS index, ``ivf`` adds to
        the cells trained at build time, ``pruned`` projects the rows on its build-time basis, ``torch``
        concatenates. Exact kinds stay exact. Rows must be finite."""
        rows = as_rows(rows, self.dim, "rows to add", finite=True)
        if len(rows):
            self.searcher.add(rows)

    def truncate(self, n_rows: int) -> None:
        """Drop the rows from ``n_rows`` on (1 <= n_rows <= len(self)): the undo of :meth:`add`; searches
        then answer as before those rows were added (``hnsw`` rebuilds its graph, which may differ)."""
        n_rows = int(n_rows)
        if not 1 <= n_rows <= len(self):
            raise ValueError(f"n_rows must be in [1, {len(self)}], got {n_rows}")
        self.searcher.truncate(n_rows)

    def recall(self, queries: np.ndarray, k: int = 1) -> float:
        """Agreement with exact search: the mean over queries of |found k-set & exact k-set| / k.

        For k=1 the fraction of queries whose nearest bank vector is the exact one; 1.0 for exact kinds.
        The exact answers come from a CPU ``IndexFlatL2`` on the same bank (built on first use).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim or len(queries) == 0:
            raise ValueError(f"recall needs queries of shape (n >= 1, {self.dim}), got {queries.shape}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self.searcher.recall(queries, min(int(k), len(self)))

"""The protocol every search kind follows, the settings they read, and the growable row buffer they share.

A search kind holds a memory bank of float32 rows and answers k-nearest-neighbour queries in squared L2
distance. It grows in place (:meth:`SearchKind.add` appends rows; nothing already in the bank is rebuilt)
and shrinks back (:meth:`SearchKind.truncate` drops the last rows: the undo of ``add``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["Devices", "GrowableRows", "Placement", "SearchKind", "SearchSettings", "aligned_empty", "as_rows"]


@dataclass(frozen=True)
class SearchSettings:
    """What the kinds read (each kind reads its own fields; the others are ignored).

    use_gpu: the model runs on a CUDA device: each kind's :meth:`SearchKind.place` decides what that means.
    chunk_rows: FAISS kinds: queries per FAISS call (raised to what FAISS computes with BLAS).
    nprobe: ``ivf``: cells visited per query. ef_search: ``hnsw``: candidate list size per query.
    nlist: ``ivf``: cell count; None = :func:`~patchcore.engine.search.ivf.ivf_nlist` of the bank size.
    search_precision: ``pruned``: ``auto``, ``bf16`` or ``fp32`` prefix products (the answer is exact in all).
    """

    use_gpu: bool = False
    chunk_rows: int = 16384
    nprobe: int = 8
    ef_search: int = 64
    nlist: int | None = None
    search_precision: str = "auto"

    def __post_init__(self) -> None:
        if int(self.nprobe) < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        if int(self.ef_search) < 1:
            raise ValueError(f"ef_search must be >= 1, got {self.ef_search}")


@dataclass(frozen=True)
class Placement:
    """Where a kind runs, decided by :meth:`SearchKind.place`: the kind that is built, its device, and why."""

    kind: str
    device: str
    reason: str


def as_rows(rows: np.ndarray, dim: int | None = None, what: str = "rows", finite: bool = False) -> np.ndarray:
    """``rows`` as a C-contiguous float32 (n, D) array; ``dim``: the width it must have; ``finite``: refuse
    NaN and infinities."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or (dim is not None and rows.shape[1] != dim):
        raise ValueError(f"{what} must have shape (n, {dim if dim is not None else 'D'}), got {rows.shape}")
    if finite and not np.isfinite(rows).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    return rows


@dataclass(frozen=True)
class Devices:
    """What the device rule looks at: torch sees a CUDA device; FAISS is a GPU build with a GPU."""

    torch_cuda: bool = False
    faiss_gpu: bool = False

    @classmethod
    def detect(cls) -> Devices:
        import torch

        from .faiss_common import faiss_has_gpu

        return cls(torch_cuda=torch.cuda.is_available(), faiss_gpu=faiss_has_gpu())


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type, alignment: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``alignment``-byte boundary (as torch's
    allocations do), so BLAS sees the same alignment in a grown buffer as in a freshly built one."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + alignment, dtype=np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)


class GrowableRows:
    """A (n, ...) array that grows at its end in amortised O(rows added): spare capacity, geometric growth.

    ``view`` is the first n rows, C-contiguous (a row slice of a C-contiguous buffer). It starts as exactly
    its initial rows, not copied (no spare capacity until the first :meth:`append`, which copies into a
    buffer of its own: the caller's array is never written), so an index that never grows holds what it
    held before this class existed.
    """

    def __init__(self, initial: np.ndarray):
        self._data = np.ascontiguousarray(initial)
        self._n = len(initial)
        self._owned = False  # the buffer may be the caller's array: never written, only read

    @classmethod
    def allocate(cls, n: int, shape: tuple[int, ...], dtype: np.dtype | type) -> GrowableRows:
        """``n`` uninitialised rows of ``shape`` (an aligned buffer of its own), to be filled through ``view``."""
        rows = cls(aligned_empty((n, *shape), dtype))
        rows._owned = True
        return rows

    @property
    def view(self) -> np.ndarray:
        return self._data[: self._n]

    def __len__(self) -> int:
        return self._n

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=self._data.dtype)
        if rows.shape[1:] != self._data.shape[1:]:
            raise ValueError(f"rows of shape {rows.shape[1:]} cannot join rows of shape {self._data.shape[1:]}")
        needed = self._n + len(rows)
        if needed > len(self._data) or not self._owned:
            capacity = max(needed, self._n + self._n // 4 + 1024)
            grown = aligned_empty((capacity, *self._data.shape[1:]), self._data.dtype)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
            self._owned = True
        self._data[self._n : needed] = rows
        self._n = needed

    def truncate(self, n_rows: int) -> None:
        """Keep the first ``n_rows`` rows (the capacity stays; the rows beyond are dropped)."""
        if not 0 <= n_rows <= self._n:
            raise ValueError(f"cannot truncate {self._n} rows to {n_rows}")
        self._n = n_rows


class SearchKind(ABC):
    """One way of searching the memory bank (FAISS's index API, in small).

    Subclasses set ``name`` (registered with :func:`~patchcore.engine.search.register_search_kind`) and
    ``exact``, and implement :meth:`search`, :meth:`add`, :meth:`truncate` and :attr:`bank`.
    Constructed as ``Kind(bank, settings, device)``, ``bank`` a float32 (M, D) array with M >= 1.
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    on_gpu: bool = False
    search_precision: str = "fp32"  # the precision of the products that rank candidates (pruned: bf16 or fp32)

    @abstractmethod
    def __init__(self, bank: np.ndarray, settings: SearchSettings, device: str = "cpu") -> None:
        """Build over ``bank`` (float32 (M, D), M >= 1) on ``device`` (``cpu`` or ``cuda``)."""

    @classmethod
    def place(cls, use_gpu: bool, devices: Devices) -> Placement:
        """Where this kind runs when the model is on a CUDA device (``use_gpu``) and ``devices`` are there;
        default: the CPU."""
        if use_gpu:
            return Placement(cls.name, "cpu", f"{cls.name!r} has no GPU version: it runs on the CPU")
        return Placement(cls.name, "cpu", "on the CPU")

    @property
    @abstractmethod
    def bank(self) -> np.ndarray:
        """The (M, D) float32 rows searched, in the order their indices refer to."""

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def __len__(self) -> int:
        return len(self.bank)

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (n, k) float32 >= 0 and bank indices (n, k) int64 of the k nearest rows.

        ``queries``: float32 (n, D), C-contiguous; 1 <= k <= len(self) (the facade checks both).
        Exact kinds: the k nearest, ties to the smaller index. Approximate kinds: rows they found, so each
        distance is >= the exact one up to float32 rounding.
        """

    @abstractmethod
    def add(self, rows: np.ndarray) -> None:
        """Append float32 (n, D) rows (indices len(self) ..) in place, without rebuilding the bank before."""

    @abstractmethod
    def truncate(self, n_rows: int) -> None:
        """Keep the first ``n_rows`` rows (1 <= n_rows <= len(self)): searches then answer as they did when
        the bank had those rows."""

    def exact_reference(self) -> SearchKind:
        """An exact search over the same rows (for :meth:`recall`); approximate kinds may keep one cached."""
        from .flat import FlatSearch

        return FlatSearch(self.bank, SearchSettings())

    def recall(self, queries: np.ndarray, k: int = 1) -> float:
        """Agreement with exact search: the mean over queries of |found k-set & exact k-set| / k (1.0 if exact)."""
        if self.exact:
            return 1.0
        _, found = self.search(queries, k)
        _, truth = self.exact_reference().search(queries, k)
        k = found.shape[1]
        if k == 1:
            return float(np.mean(found[:, 0] == truth[:, 0]))
        hits = sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(found, truth, strict=True))
        return hits / (len(queries) * k)

"""A disk-backed feature store: patch vectors stream to a file as batches come and are read back in
chunks, so peak memory does not grow with the number of training images.

Reads use explicit positioned reads, not a memory map: pages of a map that has been read once count in the
process's resident set until the kernel needs them back, which makes peak RSS grow with the data set even
though the memory is reclaimable. Explicit reads keep the resident set at one chunk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["FeatureFile", "FeatureStore", "open_features"]


class FeatureStore:
    """Append-only float32 rows (N, D) in a raw file; ``array()`` gives a read-only memmap of them."""

    def __init__(self, path: str | os.PathLike, durable: bool = True):
        # durable=False: a scratch file deleted after use (a fit's streamed features): closing it does not
        # wait for the disk (fsync of 1.3 GB on ELPV mono: ~0.6 s here); what a cache keeps stays durable.
        self.durable = durable
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: BinaryIO | None = open(self.path, "wb")
        self.n_rows = 0
        self.dim: int | None = None

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise ValueError(f"feature rows must be 2-d, got shape {rows.shape}")
        if self.dim is None:
            self.dim = rows.shape[1]
        elif rows.shape[1] != self.dim:
            raise ValueError(f"feature rows of width {rows.shape[1]} appended to a store of width {self.dim}")
        if self._handle is None:
            raise ValueError("the feature store is closed")
        self._handle.write(rows.data.cast("B"))  # the array's own bytes: no copy (~100 MB per batch)
        self.n_rows += len(rows)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            if self.durable:
                os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def array(self) -> FeatureFile:
        """The rows written so far, readable by slices and index arrays (closes the store for writing)."""
        self.close()
        if self.n_rows == 0 or self.dim is None:
            raise ValueError("the feature store is empty")
        return open_features(self.path, self.n_rows, self.dim)


def open_features(path: str | os.PathLike, n_rows: int, dim: int) -> FeatureFile:
    """A feature file of ``n_rows`` x ``dim`` float32, checked against its size on disk."""
    expected = n_rows * dim * 4
    actual = os.path.getsize(path)
    if actual != expected:
        raise ValueError(
            f"feature file {path} has {actual} bytes, expected {expected} ({n_rows} x {dim} float32)"
        )
    return FeatureFile(path, n_rows, dim)


class FeatureFile:
    """Read-only (N, D) float32 rows on disk with the slicing a numpy array offers: ``f[a:b]`` (one
    contiguous read), ``f[i]`` and ``f[index_array]`` (rows in the order asked, runs of consecutive rows
    read together)."""

    dtype = np.dtype(np.float32)

    def __init__(self, path: str | os.PathLike, n_rows: int, dim: int):
        self.path = Path(path)
        self.shape = (int(n_rows), int(dim))
        self._row_bytes = self.shape[1] * 4

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    def _read(self, fd: int, start: int, count: int) -> np.ndarray:
        out = np.empty((count, self.shape[1]), dtype=np.float32)
        view = out.data.cast("B")
        offset, done = start * self._row_bytes, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"unexpected end of feature file {self.path}")
            done += n
        return out

    def __getitem__(self, key) -> np.ndarray:
        n = self.shape[0]
        with open(self.path, "rb", buffering=0) as handle:
            fd = handle.fileno()
            if isinstance(key, slice):
                start, stop, step = key.indices(n)
                if step != 1:
                    return self[np.arange(start, stop, step)]
                return self._read(fd, start, max(0, stop - start))
            if isinstance(key, (int, np.integer)):
                index = int(key) + (n if key < 0 else 0)
                if not 0 <= index < n:
                    raise IndexError(f"row {key} out of range for {n} rows")
                return self._read(fd, index, 1)[0]
            indices = np.asarray(key, dtype=np.int64).reshape(-1)
            if indices.size and (indices.min() < -n or indices.max() >= n):
                raise IndexError(f"row index out of range for {n} rows")
            indices = np.where(indices < 0, indices + n, indices)
            order = np.argsort(indices, kind="stable")
            sorted_rows = indices[order]
            out = np.empty((len(indices), self.shape[1]), dtype=np.float32)
            # Runs of consecutive rows become one read each.
            breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
            for run in np.split(np.arange(len(sorted_rows)), breaks):
                if len(run) == 0:
                    continue
                out[order[run]] = self._read(fd, int(sorted_rows[run[0]]), len(run))
            return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)

"""A disk-backed feature store: patch vectors stream to a file as batches come, and are read back as a
memory map, so peak memory does not grow with the number of training images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["FeatureStore"]


class FeatureStore:
    """Append-only float32 rows (N, D) in a raw file; ``array()`` gives a read-only memmap of them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "wb")
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
        self._handle.write(rows.tobytes())
        self.n_rows += len(rows)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def array(self) -> np.ndarray:
        """The rows written so far, memory-mapped read-only (closes the store for writing)."""
        self.close()
        if self.n_rows == 0 or self.dim is None:
            raise ValueError("the feature store is empty")
        return open_features(self.path, self.n_rows, self.dim)


def open_features(path: str | os.PathLike, n_rows: int, dim: int) -> np.ndarray:
    expected = n_rows * dim * 4
    actual = os.path.getsize(path)
    if actual != expected:
        raise ValueError(
            f"feature file {path} has {actual} bytes, expected {expected} ({n_rows} x {dim} float32)"
        )
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n_rows, dim))

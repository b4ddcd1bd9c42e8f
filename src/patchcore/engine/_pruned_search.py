"""Exact k-nearest-neighbour search with a certified principal-component bound (``kind="pruned"``).

The distance over the first m principal components of the bank is a lower bound of the full distance (an
orthogonal rotation preserves distances; dropping coordinates can only shrink them). On PatchCore features
the first 128 of 1024 components hold about 90% of the variance, so for a test patch only ~1% of the bank
vectors have a prefix distance below the true nearest-neighbour distance. Per query: the prefix distances to
the whole bank come from one matrix product (m/D of the exact search's work); the exact distances of the r
prefix-nearest vectors give an upper bound u on the k-th nearest distance; every vector whose prefix bound
(minus a float-error margin) is below u gets its exact distance; the k smallest are the answer. Exact up to
float32 rounding of the distances themselves.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .principal import principal_basis

PREFIX_DIM = 128
SEEDS = 4  # prefix-nearest candidates whose exact distances seed the upper bound
QUERY_BLOCK = 512
RELATIVE_MARGIN = 1e-3  # float-error allowance of the prefix bound, relative to the centred norms


# Reassociation lets LLVM vectorise the float64 sums; no 'nnan'/'ninf' (the kernel uses inf sentinels).
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(inline="always", fastmath=_FAST)
def _squared_distance(a: np.ndarray, b: np.ndarray) -> np.float32:
    # Sum of squared differences in float64: exact differences, no cancellation, and no float32
    # subnormals (tiny squared differences would underflow to subnormals, which are ~100x slower).
    total = 0.0
    for i in range(a.shape[0]):
        d = np.float64(a[i]) - np.float64(b[i])
        total += d * d
    return np.float32(total)


@njit(inline="always")
def _insert(values: np.ndarray, labels: np.ndarray, value: np.float32, label: int) -> None:
    """Insert into an ascending top-k list (ties: the smaller bank index first)."""
    k = values.shape[0]
    if value > values[k - 1] or (value == values[k - 1] and label >= labels[k - 1]):
        return
    position = k - 1
    while position > 0 and (
        values[position - 1] > value or (values[position - 1] == value and labels[position - 1] > label)
    ):
        values[position] = values[position - 1]
        labels[position] = labels[position - 1]
        position -= 1
    values[position] = value
    labels[position] = label


@njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)
def pruned_knn(
    queries: np.ndarray,  # (B, D) float32
    bank: np.ndarray,  # (M, D) float32
    prefix_d2: np.ndarray,  # (B, M) float32: squared prefix distances (from a matrix product)
    margin_q: np.ndarray,  # (B,) float32: per-query allowance on prefix_d2
    margin_b: np.ndarray,  # (M,) float32: per-bank-vector allowance on prefix_d2
    k: int,
    out_d2: np.ndarray,  # (B, k) float32
    out_index: np.ndarray,  # (B, k) int64
    computed: np.ndarray,  # (B,) int64: exact distances computed per query
) -> None:
    n_queries, n_bank = prefix_d2.shape
    seeds = min(max(SEEDS, k), n_bank)
    for q in prange(n_queries):
        row = prefix_d2[q]
        query = queries[q]
        # 1. The `seeds` smallest prefix distances: their exact distances bound the k-th nearest.
        seed_values = np.full(seeds, np.inf, dtype=np.float32)
        seed_labels = np.full(seeds, n_bank, dtype=np.int64)
        for j in range(n_bank):
            _insert(seed_values, seed_labels, row[j], j)
        best = np.full(k, np.inf, dtype=np.float32)
        best_labels = np.full(k, n_bank, dtype=np.int64)
        for s in range(seeds):
            j = seed_labels[s]
            _insert(best, best_labels, _squared_distance(query, bank[j]), j)
        count = seeds
        # 2. Every vector whose certified lower bound is below the current k-th distance: exact distance.
        allowance = margin_q[q]
        for j in range(n_bank):
            if row[j] - allowance - margin_b[j] <= best[k - 1]:
                already = False
                for s in range(seeds):
                    if seed_labels[s] == j:
                        already = True
                if not already:
                    count += 1
                    _insert(best, best_labels, _squared_distance(query, bank[j]), j)
        for i in range(k):
            out_d2[q, i] = best[i]
            out_index[q, i] = best_labels[i]
        computed[q] = count


class PrunedExactSearch:
    """Exact L2 k-NN over a bank, pruned by a principal-component prefix bound."""

    def __init__(self, bank: np.ndarray, prefix_dim: int = PREFIX_DIM):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        mean, basis = principal_basis(torch.from_numpy(self.bank), prefix_dim)
        self.basis = basis.float().contiguous()
        self.mean32 = mean.float()
        centred = torch.from_numpy(self.bank).double() - mean
        prefix = (centred @ basis).float()
        self.bank_prefix = prefix.contiguous()
        self.bank_prefix_sq = (prefix.double() ** 2).sum(1).float()
        # The float32 prefix of a vector and its float32 squared-distance formula err by far less than
        # 1e-3 of the centred squared norms (a rotation and a 128-term dot product in float32).
        self.margin_bank = (RELATIVE_MARGIN * (centred**2).sum(1) + 1e-6).float().numpy()
        self.last_exact_fraction = 0.0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), len(self.bank))
        n = len(queries)
        out_d2 = np.empty((n, k), dtype=np.float32)
        out_index = np.empty((n, k), dtype=np.int64)
        computed = np.empty(n, dtype=np.int64)
        for start in range(0, n, QUERY_BLOCK):
            block = torch.from_numpy(queries[start : start + QUERY_BLOCK])
            centred = block - self.mean32
            prefix = centred @ self.basis
            # ||a||^2 - 2 a.b + ||b||^2 in float32; the margins cover its rounding.
            prefix_d2 = torch.addmm(
                self.bank_prefix_sq.unsqueeze(0), prefix, self.bank_prefix.T, beta=1, alpha=-2
            )
            prefix_d2.add_((prefix * prefix).sum(1, keepdim=True))
            margin_q = (RELATIVE_MARGIN * (centred.double() ** 2).sum(1) + 1e-6).float().numpy()
            stop = start + len(block)
            pruned_knn(
                block.numpy(), self.bank, prefix_d2.numpy(), margin_q, self.margin_bank, k,
                out_d2[start:stop], out_index[start:stop], computed[start:stop],
            )  # fmt: skip
        self.last_exact_fraction = float(computed.sum()) / max(1, n * len(self.bank))
        return out_d2, out_index

"""The greedy coreset loop as one fused, multi-threaded numba kernel with exact pruning.

Per pick i the reference computes d = min(d, ||z - z_i||) for all N points, streaming N x 128 floats. Only a
small fraction of points (about 0.1% on real features) actually get closer to the new point than to
everything picked before. A certified lower bound decides which ones can: the distance over the first m
principal components (an orthogonal rotation preserves distances, and dropping coordinates can only shrink
them). Points whose bound, minus a generous float-error margin, is already >= d[j] cannot change; every
other point gets the exact float32 distance by the reference's formula (-2 a.b + ||a||^2 + ||b||^2, clamped,
square root). So the selected indices are the reference's, up to last-bit rounding of the dot products.
The argmax for the next pick (first index on ties) is found in the same pass.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

CHUNKS = 64  # work units per pick, in index order (fixes the order of the argmax reduction)
BLOCK = 512  # points whose bounds are computed together (vectorised across points)


@njit(inline="always")
def _exact_dot(a: np.ndarray, b: np.ndarray) -> np.float32:
    # Eight independent partial sums: fast without fastmath, and the same order on every run.
    n = a.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    k = 0
    while k + 8 <= n:
        s0 += a[k] * b[k]
        s1 += a[k + 1] * b[k + 1]
        s2 += a[k + 2] * b[k + 2]
        s3 += a[k + 3] * b[k + 3]
        s4 += a[k + 4] * b[k + 4]
        s5 += a[k + 5] * b[k + 5]
        s6 += a[k + 6] * b[k + 6]
        s7 += a[k + 7] * b[k + 7]
        k += 8
    while k < n:
        s0 += a[k] * b[k]
        k += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(inline="always", fastmath={"reassoc", "contract"})
def _tail_dot(row: np.ndarray, u: np.ndarray) -> np.float32:
    # A bound, not a distance: its order of summation is free (the allowance covers m float32 products).
    total = np.float32(0.0)
    for k in range(row.shape[0]):
        total += np.float32(row[k]) * u[k]
    return total


@njit(parallel=True, cache=True, nogil=True)
def greedy_picks(
    z: np.ndarray,  # (N, D) float32: the features the greedy loop runs on
    sq: np.ndarray,  # (N,) float32: ||z_j||^2
    q_head: np.ndarray,  # (h, N) int8: the first h coordinates of the quantised prefix, transposed
    q_tail: np.ndarray,  # (N, m - h) int8: the other coordinates, one row per point
    scale: np.ndarray,  # (m,) float32: dequantisation scale of each prefix coordinate
    qsq_head: np.ndarray,  # (N,) float32: ||dequantised head_j||^2 minus its float-error allowance
    qsq: np.ndarray,  # (N,) float32: ||dequantised prefix_j||^2 minus its float-error allowance
    slack: np.ndarray,  # (N,) float32: certified slack of the bound for point j (see prefix_bound_data)
    cn: np.ndarray,  # (N,) float32: c ||z_j||^2, the float formula's allowance (see prefix_bound_data)
    d: np.ndarray,  # (N,) float32: current min distances, updated in place
    first: int,  # the next pick (the argmax of d on entry)
    n_picks: int,
    chosen: np.ndarray,  # (n_picks,) int64, out
    computed: np.ndarray,  # (CHUNKS,) int64, in/out: exact distances computed per chunk
) -> int:
    """Run ``n_picks`` greedy steps starting with ``first``; returns the argmax of d after the last one.

    Point j is skipped when ||p_j - p_i||^2 (dequantised prefixes) >= (d_j + slack_j + slack_i +
    (cn_j + cn_i) / (2 d_j))^2, or when d_j = 0: then the reference's float distance cannot fall below d_j,
    so min(d_j, distance) = d_j. The head's partial distance (a lower bound of the prefix's) is tested
    first, vectorised across points; a point's tail is read only when the head cannot exclude it.
    """
    n = z.shape[0]
    head = q_head.shape[0]
    tail = q_tail.shape[1]
    chunk = (n + CHUNKS - 1) // CHUNKS
    best_value = np.empty(CHUNKS, dtype=np.float32)
    best_index = np.empty(CHUNKS, dtype=np.int64)
    scratch = np.empty((CHUNKS, BLOCK), dtype=np.float32)
    u = np.empty(head, dtype=np.float32)
    u_tail = np.empty(tail, dtype=np.float32)
    minus_two = np.float32(-2.0)
    zero = np.float32(0.0)
    tiny = np.float32(1e-30)
    pick = first
    for step in range(n_picks):
        chosen[step] = pick
        zi = z[pick]
        sq_i = sq[pick]
        qsq_i = qsq[pick]
        head_sq_i = qsq_head[pick]
        slack_i = slack[pick]
        cn_i = cn[pick]
        for k in range(head):
            # dequantised p_i[k] times the scale of coordinate k: sum_k q_jk * u_k = p_j . p_i
            u[k] = np.float32(q_head[k, pick]) * scale[k] * scale[k]
        for k in range(tail):
            u_tail[k] = np.float32(q_tail[pick, k]) * scale[head + k] * scale[head + k]
        for c in prange(CHUNKS):
            acc = scratch[c]
            local_value = np.float32(-1.0)
            local_index = -1
            count = 0
            stop_chunk = min((c + 1) * chunk, n)
            for start in range(c * chunk, stop_chunk, BLOCK):
                size = min(BLOCK, stop_chunk - start)
                # Slices (not offset indexing) let LLVM vectorise the loops below.
                d_block = d[start : start + size]
                head_sq_block = qsq_head[start : start + size]
                slack_block = slack[start : start + size]
                cn_block = cn[start : start + size]
                for t in range(size):
                    acc[t] = zero
                for k in range(head):
                    uk = u[k]
                    row = q_head[k, start : start + size]
                    for t in range(size):
                        acc[t] += np.float32(row[t]) * uk
                for t in range(size):
                    dj = d_block[t]
                    # d_j = 0 cannot decrease; the guard also keeps the division finite.
                    reach = dj + slack_block[t] + slack_i + (cn_block[t] + cn_i) / max(dj + dj, tiny)
                    within = reach * reach
                    if dj > zero and minus_two * acc[t] + head_sq_block[t] + head_sq_i < within:
                        j = start + t
                        full = acc[t] + _tail_dot(q_tail[j], u_tail)
                        if minus_two * full + qsq[j] + qsq_i < within:
                            count += 1
                            squared = minus_two * _exact_dot(z[j], zi) + sq[j] + sq_i
                            if squared < zero:
                                squared = zero
                            distance = np.float32(np.sqrt(squared))
                            if distance < dj:
                                dj = distance
                                d_block[t] = dj
                    if dj > local_value:
                        local_value = dj
                        local_index = start + t
            best_value[c] = local_value
            best_index[c] = local_index
            computed[c] += count
        # Chunks are in index order and '>' is strict: the first index wins ties, as in torch.argmax.
        pick = best_index[0]
        value = best_value[0]
        for c in range(1, CHUNKS):
            if best_value[c] > value:
                value = best_value[c]
                pick = best_index[c]
    return pick


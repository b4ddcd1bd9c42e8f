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


@njit(inline="always")
def _reach_terms(dj, slack_j, cn_j, head_sq_j):
    """Per-point terms of the skip test that change only when d_j does: (a_j, b_j, head_sq_live_j) with
    a_j = d_j + slack_j + cn_j b_j and b_j = 1 / (2 d_j), so that the reach is a_j + slack_i + cn_i b_j
    (no division per point and pick). A point at d_j = 0 cannot decrease: its live head norm is +inf,
    which fails the test."""
    if dj > np.float32(0.0):
        b = np.float32(1.0) / (dj + dj)
        return dj + slack_j + cn_j * b, b, head_sq_j
    return np.float32(0.0), np.float32(0.0), np.float32(np.inf)


@njit(inline="always")
def _block_argmax(d, start, stop):
    """(largest value, first index holding it) of d[start:stop] (strict '>': the first index wins ties)."""
    value = np.float32(-1.0)
    index = -1
    for j in range(start, stop):
        if d[j] > value:
            value = d[j]
            index = j
    return value, index


@njit(cache=True, nogil=True, fastmath={"contract"})
def _head_test(q_head, start, size, u, acc, a_block, b_block, head_sq_block, slack_i, cn_i, head_sq_i, mask) -> int:  # fmt: skip
    """The head's partial prefix products of points start..start+size with the pick (into ``acc``) and the
    skip test on them (into ``mask``); returns how many points it lets through.

    Four head rows per pass over ``acc`` (a quarter of its loads and stores) and fused multiply-adds: this
    pass streams every point's head bytes once per pick and is bound by that traffic. A function of its
    own so that the contraction stays out of the exact distances (their rounding matches the reference's).
    It is a bound: a fused multiply-add only removes roundings, which the allowances already cover."""
    head = q_head.shape[0]
    zero = np.float32(0.0)
    minus_two = np.float32(-2.0)
    for t in range(size):
        acc[t] = zero
    k = 0
    while k + 4 <= head:
        u0, u1, u2, u3 = u[k], u[k + 1], u[k + 2], u[k + 3]
        r0 = q_head[k, start : start + size]
        r1 = q_head[k + 1, start : start + size]
        r2 = q_head[k + 2, start : start + size]
        r3 = q_head[k + 3, start : start + size]
        for t in range(size):
            acc[t] += (np.float32(r0[t]) * u0 + np.float32(r1[t]) * u1) + (
                np.float32(r2[t]) * u2 + np.float32(r3[t]) * u3
            )
        k += 4
    while k < head:
        uk = u[k]
        row = q_head[k, start : start + size]
        for t in range(size):
            acc[t] += np.float32(row[t]) * uk
        k += 1
    through = 0
    for t in range(size):
        reach = a_block[t] + slack_i + cn_i * b_block[t]
        test = minus_two * acc[t] + head_sq_block[t] + head_sq_i < reach * reach
        mask[t] = test
        through += test
    return through


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
    so min(d_j, distance) = d_j. Per block of ``BLOCK`` points the head's partial distance (a lower bound of
    the prefix's) and the test run in loops LLVM vectorises (the test's result is counted, then only the
    points it lets through are visited); a point's tail is read only there. The argmax is kept per block
    (d only decreases, so a block's maximum moves only when its own maximal point got closer) and the next
    pick is the first of the block maxima in index order: the first index on ties, as torch.argmax.
    """
    n = z.shape[0]
    head = q_head.shape[0]
    tail = q_tail.shape[1]
    n_blocks = (n + BLOCK - 1) // BLOCK
    per_chunk = (n_blocks + CHUNKS - 1) // CHUNKS
    scratch = np.empty((CHUNKS, BLOCK), dtype=np.float32)
    passed = np.zeros((CHUNKS, BLOCK), dtype=np.bool_)  # BLOCK is a multiple of 8: whole words
    u = np.empty(head, dtype=np.float32)
    u_tail = np.empty(tail, dtype=np.float32)
    minus_two = np.float32(-2.0)
    zero = np.float32(0.0)
    # Per-point terms and block maxima for this call (d changes only inside this kernel meanwhile).
    reach_a = np.empty(n, dtype=np.float32)
    reach_b = np.empty(n, dtype=np.float32)
    head_sq_live = np.empty(n, dtype=np.float32)
    block_value = np.empty(n_blocks, dtype=np.float32)
    block_index = np.empty(n_blocks, dtype=np.int64)
    for b in prange(n_blocks):
        stop = min((b + 1) * BLOCK, n)
        for j in range(b * BLOCK, stop):
            reach_a[j], reach_b[j], head_sq_live[j] = _reach_terms(d[j], slack[j], cn[j], qsq_head[j])
        block_value[b], block_index[b] = _block_argmax(d, b * BLOCK, stop)
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
            mask = passed[c]
            words = mask.view(np.uint64)
            count = 0
            for b in range(c * per_chunk, min((c + 1) * per_chunk, n_blocks)):
                start = b * BLOCK
                size = min(BLOCK, n - start)
                # Slices (not offset indexing) let LLVM vectorise the loops below.
                a_block = reach_a[start : start + size]
                b_block = reach_b[start : start + size]
                head_sq_block = head_sq_live[start : start + size]
                through = _head_test(
                    q_head, start, size, u, acc, a_block, b_block, head_sq_block, slack_i, cn_i, head_sq_i, mask
                )
                if through == 0:
                    continue
                rescan = False
                # The mask read 8 flags at a time (most words are zero: ~2 % of points pass the head).
                for w in range((size + 7) // 8):
                    if words[w] == 0:
                        continue
                    for t in range(8 * w, min(8 * w + 8, size)):
                        if not mask[t]:
                            continue
                        j = start + t
                        reach = a_block[t] + slack_i + cn_i * b_block[t]
                        full = acc[t] + _tail_dot(q_tail[j], u_tail)
                        if minus_two * full + qsq[j] + qsq_i < reach * reach:
                            count += 1
                            squared = minus_two * _exact_dot(z[j], zi) + sq[j] + sq_i
                            if squared < zero:
                                squared = zero
                            distance = np.float32(np.sqrt(squared))
                            if distance < d[j]:
                                d[j] = distance
                                reach_a[j], reach_b[j], head_sq_live[j] = _reach_terms(
                                    distance, slack[j], cn[j], qsq_head[j]
                                )
                                rescan = rescan or j == block_index[b]
                if rescan:
                    block_value[b], block_index[b] = _block_argmax(d, start, start + size)
            computed[c] += count
        # Blocks are in index order and '>' is strict: the first index wins ties, as in torch.argmax.
        pick = block_index[0]
        value = block_value[0]
        for b in range(1, n_blocks):
            if block_value[b] > value:
                value = block_value[b]
                pick = block_index[b]
    return pick

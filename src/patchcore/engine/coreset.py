"""Memory-bank subsampling (SPEC section 4): approximate greedy coreset, exact greedy, random, identity.

Every sampler takes its randomness from a ``numpy.random.Generator`` the caller owns (the estimator seeds
one per fit), so the same seed always selects the same indices. Features may be a numpy array, a
memory-mapped array or a tensor of shape (N, D); they are read in chunks and never copied whole into a
wider dtype. No N x N matrix is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .principal import principal_basis
from .records import CoresetSpace

__all__ = [
    "ApproximateGreedyCoreset",
    "GreedyCoreset",
    "IdentitySampler",
    "RandomSampler",
    "Sampler",
    "SAMPLERS",
    "bank_distances",
    "continue_coreset",
    "coreset_size",
    "covering_radius",
    "greedy_select",
    "prefix_bound_data",
    "make_sampler",
    "random_projection",
    "project",
    "reference_greedy_select",
    "start_distances",
]

ProgressCallback = Callable[[int, int], None]  # (done, total)

_CHUNK_ROWS = 65536
_BASIS_ROWS = 65536  # points the pruning basis is computed from (an evenly strided sample)


def coreset_size(n: int, percentage: float) -> int:
    """Target size ``int(n * percentage)`` (floor), at least 1 and at most n."""
    return min(n, max(1, int(n * percentage)))


def _as_tensor(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.float()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    # A read-only memmap chunk: copy it (torch does not take non-writable arrays).
    return torch.from_numpy(rows if rows.flags.writeable else rows.copy())


def random_projection(in_dim: int, out_dim: int, rng: np.random.Generator) -> np.ndarray:
    """The reference's random linear map W (out_dim, in_dim), U(-1/sqrt(in_dim), 1/sqrt(in_dim))."""
    bound = 1.0 / math.sqrt(in_dim)
    return rng.uniform(-bound, bound, size=(out_dim, in_dim)).astype(np.float32)


def project(features, weight: np.ndarray | None, chunk_rows: int = _CHUNK_ROWS) -> torch.Tensor:
    """y = x W^T for all rows, streamed in chunks (W None: the features themselves, as float32)."""
    n = len(features)
    out_dim = features.shape[1] if weight is None else weight.shape[0]
    out = torch.empty((n, out_dim), dtype=torch.float32)
    w = None if weight is None else torch.from_numpy(np.ascontiguousarray(weight))
    for start in range(0, n, chunk_rows):
        rows = _as_tensor(features[start : start + chunk_rows])
        out[start : start + len(rows)] = rows if w is None else rows @ w.T
    return out


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances with the reference's formula and operation order (bit-compatible)."""
    a_sq = (a * a).sum(1, keepdim=True)
    b_sq = (b * b).sum(1).reshape(1, -1)
    return (-2 * a.mm(b.T) + a_sq + b_sq).clamp(0, None).sqrt()


def start_distances(z: torch.Tensor, start_points: np.ndarray, chunk_rows: int = _CHUNK_ROWS) -> torch.Tensor:
    """Initial distance of every point: the MEAN of its distances to the start points."""
    anchors = z[torch.as_tensor(np.asarray(start_points), dtype=torch.long)]
    out = torch.empty(len(z), dtype=torch.float32)
    for start in range(0, len(z), chunk_rows):
        out[start : start + chunk_rows] = _pairwise_distances(z[start : start + chunk_rows], anchors).mean(1)
    return out


GREEDY_METHODS = ("auto", "pruned", "fused")
_FLOAT_FORMULA_C = 1e-4  # allowance c of the reference's float32 squared-distance formula (see prefix_bound_data)
# Principal components in the pruning bound, and how many of them are tested for every point before the
# rest is read (per point, only where the head cannot exclude it). Every pick streams the head's bytes for
# all points, so the head sets the cost and the full prefix the number of exact distances. Chosen by
# measurement (NOTES.md, "Exactness of the pruned coreset"); every choice gives the same picks.
PREFIX_DIM = 64
HEAD_DIM = 32


def greedy_select(
    z: torch.Tensor,
    n_select: int,
    min_distances: torch.Tensor,
    progress: ProgressCallback | None = None,
    method: str = "auto",
    stats: dict | None = None,
) -> np.ndarray:
    """The greedy loop: pick i = argmax(d) (first index on ties), then d = min(d, ||z - z_i||).

    ``method="pruned"`` (the default when numba is installed) skips, with a certified bound, the points the
    new pick cannot move and computes the exact distance for the rest; ``"fused"`` streams all of z once
    per pick. Both use the reference's distance formula; they can differ from each other and from the
    reference only where two distances are equal to float32 precision. ``min_distances`` is updated in place.
    ``stats``, if given, receives the method used and the fraction of exact distances computed.
    """
    if method not in GREEDY_METHODS:
        raise ValueError(f"unknown greedy method {method!r}; known: {', '.join(GREEDY_METHODS)}")
    n_select = int(n_select)
    if n_select <= 0:
        return np.empty(0, dtype=np.int64)
    if method == "auto":
        method = "pruned" if _numba_available() else "fused"
    if stats is not None:
        stats["method"] = method
        stats["exact_fraction"] = 1.0
    if method == "pruned":
        return _pruned_greedy_select(z, n_select, min_distances, progress, stats)
    return _fused_greedy_select(z, n_select, min_distances, progress)


def _numba_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def _fused_greedy_select(
    z: torch.Tensor, n_select: int, min_distances: torch.Tensor, progress: ProgressCallback | None
) -> np.ndarray:
    # Squared norms once, one matrix-vector product per pick, all updates in place.
    n = len(z)
    z = z.contiguous()
    squared_norms = (z * z).sum(1)
    distances = torch.empty(n, dtype=torch.float32)
    chosen = np.empty(n_select, dtype=np.int64)
    report_every = max(1, n_select // 100)
    for step in range(n_select):
        index = int(torch.argmax(min_distances))
        chosen[step] = index
        # -2 a.b + ||a||^2 + ||b||^2, clamped at 0 before the square root, as the reference computes it.
        torch.addmv(squared_norms, z, z[index], beta=1.0, alpha=-2.0, out=distances)
        distances.add_(squared_norms[index]).clamp_(min=0).sqrt_()
        torch.minimum(min_distances, distances, out=min_distances)
        if progress is not None and (step % report_every == 0 or step == n_select - 1):
            progress(step + 1, n_select)
    return chosen


def prefix_bound_data(z: torch.Tensor, prefix_dim: int = PREFIX_DIM) -> dict[str, np.ndarray]:
    """What the pruned loop needs: an int8 principal-component prefix of z, each point's slack and cn.

    The true distance T between two points is at least the distance A between their prefixes (an orthogonal
    rotation followed by dropping coordinates), and |A - P| <= e_j + e_i for P, the distance of the
    dequantised prefixes (e the quantisation errors, computed in float64). The reference's float32 squared
    distance r^2 satisfies r^2 >= T^2 - c (||z_j||^2 + ||z_i||^2) with c = 1e-4, far above the worst case of
    a 128-term float32 dot product (about 2.5e-5). So P >= d_j + slack_j + slack_i + (cn_j + cn_i) / (2 d_j),
    with slack = e (padded) and cn = c ||z||^2 (rounded up), gives T >= d_j + delta and
    T^2 >= d_j^2 + 2 d_j delta >= d_j^2 + c (||z_j||^2 + ||z_i||^2), hence r >= d_j: the point keeps d_j.
    (Adding sqrt(c) ||z|| to the slack instead, the linear form, would widen the bound about 100-fold.)

    The prefix is split: the first ``HEAD_DIM`` coordinates (``q_head``, one column per point) give a
    partial distance that is itself a lower bound of P, tested for every point; the rest (``q_tail``, one row
    per point) is read only for the points the head cannot exclude.
    """
    n = len(z)
    # Any orthonormal basis and any centre make the bound certified (the picks do not depend on them, only
    # the number of exact distances does): the principal directions of an evenly strided sample of at most
    # _BASIS_ROWS points prune as well at a fraction of the float64 covariance's cost.
    mean, basis = principal_basis(z[:: max(1, -(-n // _BASIS_ROWS))], prefix_dim, _CHUNK_ROWS)
    m = basis.shape[1]

    def prefix_rows(start: int) -> torch.Tensor:
        return (z[start : start + _CHUNK_ROWS].double() - mean) @ basis

    largest = torch.zeros(m, dtype=torch.float64)
    for start in range(0, n, _CHUNK_ROWS):
        largest = torch.maximum(largest, prefix_rows(start).abs().amax(0))
    scale = (largest / 127.0).clamp(min=1e-30)
    head = min(HEAD_DIM, m)
    quantised_head = np.empty((head, n), dtype=np.int8)  # columns: vectorised across points
    quantised_tail = np.empty((n, m - head), dtype=np.int8)  # rows: read only for the points that need it
    head_squared = np.empty(n, dtype=np.float32)
    prefix_squared = np.empty(n, dtype=np.float32)
    slack = np.empty(n, dtype=np.float32)
    cn = np.empty(n, dtype=np.float32)
    squared_norms = (z * z).sum(1)
    for start in range(0, n, _CHUNK_ROWS):
        prefix = prefix_rows(start)
        levels = torch.round(prefix / scale).clamp_(-127, 127)
        dequantised = levels * scale
        stop = start + len(prefix)
        quantised_head[:, start:stop] = levels[:, :head].T.to(torch.int8).numpy()
        quantised_tail[start:stop] = levels[:, head:].to(torch.int8).numpy()
        error = (dequantised - prefix).norm(dim=1)
        norm = torch.sqrt(squared_norms[start:stop].double())
        slack[start:stop] = (error * (1 + 1e-3) + 1e-6 * (norm + 1)).numpy()
        cn[start:stop] = (_FLOAT_FORMULA_C * (1 + 1e-3) * squared_norms[start:stop].double()).numpy()
        # Minus an allowance for the float32 error of -2 acc + qsq_j + qsq_i in the kernel.
        prefix_squared[start:stop] = ((dequantised * dequantised).sum(1) * (1 - 1e-5) - 1e-6).numpy()
        head_part = dequantised[:, :head]
        head_squared[start:stop] = ((head_part * head_part).sum(1) * (1 - 1e-5) - 1e-6).numpy()
    return {
        "sq": squared_norms.numpy(),
        "q_head": quantised_head,
        "q_tail": quantised_tail,
        "qsq_head": head_squared,
        "scale": scale.float().numpy(),
        "qsq": prefix_squared,
        "slack": slack,
        "cn": cn,
    }


def _pruned_greedy_select(
    z: torch.Tensor,
    n_select: int,
    min_distances: torch.Tensor,
    progress: ProgressCallback | None,
    stats: dict | None,
) -> np.ndarray:
    from .greedy_kernel import CHUNKS, greedy_picks

    z_np = np.ascontiguousarray(z.numpy() if isinstance(z, torch.Tensor) else z, dtype=np.float32)
    bound = prefix_bound_data(torch.from_numpy(z_np))
    d = min_distances.numpy()  # shares memory: updated in place like the fused loop
    chosen = np.empty(n_select, dtype=np.int64)
    computed = np.zeros(CHUNKS, dtype=np.int64)
    pick = int(np.argmax(d))
    # Picks run in slices so the progress bar moves; the kernel releases the GIL.
    step = max(1, n_select // 100)
    for start in range(0, n_select, step):
        count = min(step, n_select - start)
        pick = int(
            greedy_picks(
                z_np, bound["sq"], bound["q_head"], bound["q_tail"], bound["scale"], bound["qsq_head"],
                bound["qsq"], bound["slack"], bound["cn"], d,
                pick, count, chosen[start : start + count], computed,
            )
        )  # fmt: skip
        if progress is not None:
            progress(start + count, n_select)
    if stats is not None:
        stats["exact_fraction"] = float(computed.sum()) / (n_select * len(z_np))
    return chosen


def reference_greedy_select(z: torch.Tensor, n_select: int, start_points: np.ndarray) -> np.ndarray:
    """The reference implementation's loop, op for op (torch.cat + min per pick). Slow: a baseline."""
    distances = _pairwise_distances(z, z[torch.as_tensor(start_points, dtype=torch.long)])
    anchor = torch.mean(distances, dim=-1).reshape(-1, 1)
    chosen = []
    for _ in range(n_select):
        index = torch.argmax(anchor).item()
        chosen.append(index)
        new = _pairwise_distances(z, z[index : index + 1])
        anchor = torch.min(torch.cat([anchor, new], dim=-1), dim=1).values.reshape(-1, 1)
    return np.asarray(chosen, dtype=np.int64)


def covering_radius(z, indices: np.ndarray, chunk_rows: int = _CHUNK_ROWS) -> float:
    """max over points of the Euclidean distance to the nearest selected point (exact, chunked)."""
    import faiss

    selected = np.ascontiguousarray(np.asarray(z[np.sort(np.asarray(indices))], dtype=np.float32))
    index = faiss.IndexFlatL2(selected.shape[1])
    index.add(selected)
    radius = 0.0
    for start in range(0, len(z), chunk_rows):
        rows = np.ascontiguousarray(np.asarray(z[start : start + chunk_rows], dtype=np.float32))
        distances, _ = index.search(rows, 1)
        radius = max(radius, float(np.sqrt(max(distances.max(), 0.0))))
    return radius


def _radius(min_distances: torch.Tensor) -> float:
    """The covering radius the greedy loop left: every point's distance to its nearest pick (or, never
    larger, to the start points' mean) is at most this."""
    return float(min_distances.max()) if len(min_distances) else 0.0


def bank_distances(z: torch.Tensor, bank: torch.Tensor, chunk_rows: int = 16384) -> torch.Tensor:
    """Each row of ``z``'s distance to its nearest row of ``bank`` (the coreset's float32 formula)."""
    out = torch.full((len(z),), float("inf"), dtype=torch.float32)
    for start in range(0, len(bank), chunk_rows):
        part = _pairwise_distances(z, bank[start : start + chunk_rows]).amin(1)
        torch.minimum(out, part, out=out)
    return out


def continue_coreset(
    z: torch.Tensor, min_distances: torch.Tensor, radius: float | None, limit: int | None
) -> np.ndarray:
    """The greedy loop continued over new points ``z`` whose distances to the existing bank are
    ``min_distances`` (updated in place): pick the farthest, until every point lies within ``radius``
    (None: no radius) or ``limit`` points are picked (None: no limit); a point at distance 0 is never
    picked. Returns the picks in order."""
    z = z.contiguous()
    squared_norms = (z * z).sum(1)
    distances = torch.empty(len(z), dtype=torch.float32)
    chosen: list[int] = []
    most = len(z) if limit is None else min(int(limit), len(z))
    while len(chosen) < most:
        index = int(torch.argmax(min_distances))
        farthest = float(min_distances[index])
        if farthest <= 0.0 or (radius is not None and farthest <= radius):
            break
        chosen.append(index)
        torch.addmv(squared_norms, z, z[index], beta=1.0, alpha=-2.0, out=distances)
        distances.add_(squared_norms[index]).clamp_(min=0).sqrt_()
        torch.minimum(min_distances, distances, out=min_distances)
        min_distances[index] = 0.0  # the pick itself is now a bank row
    return np.asarray(chosen, dtype=np.int64)


class Sampler:
    """Selects memory-bank rows from (N, D) features. ``select`` returns indices into the rows."""

    name = "sampler"

    def select(
        self, features, rng: np.random.Generator, progress: ProgressCallback | None = None
    ) -> np.ndarray:
        raise NotImplementedError

    def select_with_space(
        self, features, rng: np.random.Generator, progress: ProgressCallback | None = None
    ) -> tuple[np.ndarray, CoresetSpace | None]:
        """``select``, and where it measured distances with the covering radius it reached there (what a
        continuation of the coreset needs; None: this sampler measures none)."""
        return self.select(features, rng, progress), None


@dataclass
class IdentitySampler(Sampler):
    """Keeps every patch (no subsampling)."""

    name = "identity"

    def select(self, features, rng, progress=None) -> np.ndarray:
        return np.arange(len(features), dtype=np.int64)

    def select_with_space(self, features, rng, progress=None) -> tuple[np.ndarray, CoresetSpace | None]:
        # Every patch is kept: each lies at distance 0 from the bank.
        return self.select(features, rng, progress), CoresetSpace(None, 0.0)


@dataclass
class RandomSampler(Sampler):
    """A uniformly random subset of ``int(N * percentage)`` rows, in increasing index order."""

    percentage: float = 0.1
    name = "random"

    def select(self, features, rng, progress=None) -> np.ndarray:
        size = coreset_size(len(features), self.percentage)
        return np.sort(rng.choice(len(features), size, replace=False)).astype(np.int64)


@dataclass
class ApproximateGreedyCoreset(Sampler):
    """The reference default: greedy k-center on a 128-d random projection, seeded by the mean distance
    to ``num_starting_points`` random start points (which are not themselves added)."""

    percentage: float = 0.1
    projection_dim: int | None = 128
    num_starting_points: int = 10
    method: str = "auto"  # greedy loop: auto | pruned | fused (same picks, see greedy_select)
    name = "approx_greedy_coreset"

    def projection(self, in_dim: int, rng: np.random.Generator) -> np.ndarray | None:
        # The reference projects only when the dimension differs from the target.
        if self.projection_dim is None or self.projection_dim == in_dim:
            return None
        return random_projection(in_dim, self.projection_dim, rng)

    def select(self, features, rng, progress=None) -> np.ndarray:
        return self.select_with_space(features, rng, progress)[0]

    def select_with_space(self, features, rng, progress=None) -> tuple[np.ndarray, CoresetSpace | None]:
        n = len(features)
        weight = self.projection(features.shape[1], rng)
        z = project(features, weight)
        min_distances = start_distances(z, self.start_points(n, rng))
        chosen = greedy_select(z, coreset_size(n, self.percentage), min_distances, progress, self.method)
        return chosen, CoresetSpace(weight, _radius(min_distances))

    def start_points(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Distinct random start points (at most n)."""
        return rng.choice(n, min(self.num_starting_points, n), replace=False)

    def select_projected(
        self, z: torch.Tensor, start_points: np.ndarray, progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """The greedy loop on already projected features from given start points (golden tests use this)."""
        size = coreset_size(len(z), self.percentage)
        return greedy_select(z, size, start_distances(z, start_points), progress, self.method)


@dataclass
class GreedyCoreset(Sampler):
    """Exact greedy k-center from one random start point (which is the first selected), on the features
    themselves (``projection_dim=None``) or on a random projection. Streams: no N x N matrix."""

    percentage: float = 0.1
    projection_dim: int | None = None
    method: str = "auto"
    name = "greedy_coreset"

    def select(self, features, rng, progress=None) -> np.ndarray:
        return self.select_with_space(features, rng, progress)[0]

    def select_with_space(self, features, rng, progress=None) -> tuple[np.ndarray, CoresetSpace | None]:
        n = len(features)
        weight = None
        if self.projection_dim is not None and self.projection_dim != features.shape[1]:
            weight = random_projection(features.shape[1], self.projection_dim, rng)
        z = project(features, weight)
        size = coreset_size(n, self.percentage)
        first = int(rng.integers(n))
        min_distances = _pairwise_distances(z, z[first : first + 1]).reshape(-1)
        rest = greedy_select(z, size - 1, min_distances, progress, self.method)
        chosen = np.concatenate([[first], rest]).astype(np.int64)
        return chosen, CoresetSpace(weight, _radius(min_distances))


SAMPLERS: dict[str, type[Sampler]] = {
    "approx_greedy_coreset": ApproximateGreedyCoreset,
    "greedy_coreset": GreedyCoreset,
    "random": RandomSampler,
    "identity": IdentitySampler,
}


def make_sampler(
    name: str,
    percentage: float = 0.1,
    projection_dim: int | None = 128,
    num_starting_points: int = 10,
    method: str = "auto",
) -> Sampler:
    """A sampler by name: approx_greedy_coreset (default), greedy_coreset, random, identity.

    ``method`` picks the greedy loop's implementation (auto | pruned | fused); the selection is the same.
    """
    if method not in GREEDY_METHODS:
        raise ValueError(f"unknown greedy method {method!r}; known: {', '.join(GREEDY_METHODS)}")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    if name != "identity" and not 0.0 < percentage <= 1.0:
        raise ValueError(f"sampler percentage must be in (0, 1], got {percentage}")
    if name == "approx_greedy_coreset":
        return ApproximateGreedyCoreset(percentage, projection_dim, num_starting_points, method)
    if name == "greedy_coreset":
        return GreedyCoreset(percentage, projection_dim, method)
    if name == "random":
        return RandomSampler(percentage)
    return IdentitySampler()

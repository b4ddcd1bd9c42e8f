"""Sharded fit of one object: local coresets where the images are, one greedy pass over their union.

Each shard task extracts the patch features of its images into a file on its own machine and reduces them
to a local coreset of ``percentage x oversampling`` of its patches (the estimator's own sampler); only
those vectors come back. The driver then runs the greedy selection once over the union, down to the size a
single-machine fit would have (``percentage`` of all patches). Greedy k-center is a 2-approximation, and
so is this composition: a point's distance to the final bank is at most its distance to its local
coreset plus the union's covering radius, which is what ``benchmarks/bench_distributed.py`` measures
against the single-machine coreset.

Federated clients (``federated.py``) are the same computation on data that never leaves its site.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.coreset import (
    coreset_size,
    greedy_select,
    make_sampler,
    project,
    random_projection,
    start_distances,
)
from ..engine.model import PatchCore
from ..engine.records import FitStats
from ..engine.store import FeatureStore
from .ray_runner import Outcome

__all__ = [
    "LocalCoreset",
    "ShardError",
    "ShardTask",
    "install_bank",
    "merge_coresets",
    "reduce_shard",
    "sharded_fit",
    "weighted_greedy_select",
]

# Runs ``function`` over ``items`` somewhere (in this process, as Ray tasks): what the caller chose.
Runner = Callable[[Callable[[Any], Any], Sequence[Any]], list[Outcome]]


class ShardError(RuntimeError):
    """A shard (or a federated client) failed on every try: its message names the shard and the error."""


@dataclass
class ShardTask:
    """What one shard task needs: the (unfitted) estimator, its images and the local coreset fraction."""

    model: PatchCore
    images: Any  # anything PatchCore.extract_features accepts (picklable: paths, or a batch iterable)
    fraction: float  # local coreset size as a fraction of the shard's patches
    index: int = 0
    name: str = ""


@dataclass
class LocalCoreset:
    """A shard's (or client's) local bank and the counts that go with it."""

    vectors: np.ndarray  # (m, D) float32
    n_images: int
    n_patches: int
    meta: dict[str, Any]  # patch_grid, input_size
    weights_id: str | None = None
    layers: list[str] = field(default_factory=list)
    extract_seconds: float = 0.0
    coreset_seconds: float = 0.0
    name: str = ""


def reduce_shard(task: ShardTask) -> LocalCoreset:
    """Extract the shard's patch features to a local temporary file and return its local coreset only."""
    model = task.model
    work_dir = Path(tempfile.mkdtemp(prefix="patchcore-shard-", dir=model.work_dir))
    try:
        t0 = time.perf_counter()
        store = FeatureStore(work_dir / "features.f32", durable=False)  # scratch: removed after the shard
        meta = model.extract_features(task.images, store)
        features = store.array()
        t1 = time.perf_counter()
        sampler = make_sampler(
            model.sampler, min(1.0, task.fraction), model.projection_dim, model.num_starting_points
        )
        # Each shard its own stream of randomness, fixed by the seed and the shard's index.
        rng = np.random.default_rng([model.seed, task.index])
        indices = np.sort(sampler.select(features, rng))
        vectors = np.ascontiguousarray(features[indices], dtype=np.float32)
        return LocalCoreset(
            vectors=vectors,
            n_images=int(meta["n_images"]),
            n_patches=len(features),
            meta={"patch_grid": list(meta["patch_grid"]), "input_size": list(meta["input_size"])},
            weights_id=model.weights_id_,
            layers=list(model.layers_),
            extract_seconds=t1 - t0,
            coreset_seconds=time.perf_counter() - t1,
            name=task.name,
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def weighted_greedy_select(
    z: torch.Tensor, n_select: int, min_distances: torch.Tensor, weights: np.ndarray
) -> np.ndarray:
    """Weighted greedy k-center: pick argmax(w_i * d_i), then d = min(d, ||z - z_i||).

    With all weights equal it picks what the unweighted loop picks. Used by the federated merge when each
    vector is weighted by its client's share of the training patches. Streams z once per pick.
    """
    z = z.contiguous()
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
    squared_norms = (z * z).sum(1)
    distances = torch.empty(len(z), dtype=torch.float32)
    chosen = np.empty(int(n_select), dtype=np.int64)
    for step in range(int(n_select)):
        index = int(torch.argmax(min_distances * w))
        chosen[step] = index
        torch.addmv(squared_norms, z, z[index], beta=1.0, alpha=-2.0, out=distances)
        distances.add_(squared_norms[index]).clamp_(min=0).sqrt_()
        torch.minimum(min_distances, distances, out=min_distances)
    return chosen


def merge_coresets(
    union: np.ndarray,
    n_select: int,
    model: PatchCore,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of ``n_select`` rows of ``union`` chosen by one greedy pass with the estimator's sampler
    settings (projection, start points), optionally weighted (``weights`` per row)."""
    n = len(union)
    n_select = min(int(n_select), n)
    if model.sampler == "identity" or n_select >= n:
        return np.arange(n, dtype=np.int64)
    if model.sampler == "random":
        return np.sort(rng.choice(n, n_select, replace=False)).astype(np.int64)
    dim = union.shape[1]
    weight = None
    if model.projection_dim is not None and model.projection_dim != dim:
        weight = random_projection(dim, model.projection_dim, rng)
    z = project(union, weight)
    if model.sampler == "approx_greedy_coreset":
        starts = rng.choice(n, min(model.num_starting_points, n), replace=False)
        min_distances, first = start_distances(z, starts), []
    else:  # greedy_coreset: the first point is random and selected
        first = [int(rng.integers(n))]
        min_distances = start_distances(z, np.asarray(first))
    count = n_select - len(first)
    if weights is None:
        rest = greedy_select(z, count, min_distances)
    else:
        rest = weighted_greedy_select(z, count, min_distances, weights)
    return np.concatenate([np.asarray(first, dtype=np.int64), rest]).astype(np.int64)


def install_bank(
    model: PatchCore, bank: np.ndarray, meta: dict[str, Any], stats: dict[str, Any]
) -> PatchCore:
    """Make ``model`` a fitted estimator whose memory bank is exactly ``bank`` (``fit_features`` with every
    row kept, so index, grid and statistics are set as by any fit); ``stats`` are added."""
    full_meta = {**meta, "n_images": stats["n_train_images"], "n_rows": len(bank)}
    model.fit_features(
        bank,
        full_meta,
        extract_seconds=float(stats.get("extract_seconds", 0.0)),
        indices=np.arange(len(bank), dtype=np.int64),
    )
    model.stats_ = merged_stats(model.stats_, stats)
    return model


def merged_stats(fitted: FitStats, stats: dict[str, Any]) -> FitStats:
    """The fit's statistics with those of a sharded / federated merge (each a field of :class:`FitStats`)."""
    known = {f.name for f in fields(FitStats)}
    unknown = sorted(set(stats) - known)
    if unknown:  # pragma: no cover - the merges here only set declared fields
        raise ValueError(f"not fit statistics: {', '.join(unknown)}")
    lists = {k: tuple(v) for k, v in stats.items() if isinstance(v, list)}
    return replace(fitted, **{**stats, **lists})


def sharded_fit(
    model: PatchCore,
    shards: Sequence[Any],
    runner: Runner,
    oversampling: float = 2.0,
) -> PatchCore:
    """Fit ``model`` on the images of all ``shards`` (one item per shard, anything ``extract_features``
    takes), each reduced where it runs to a local coreset of ``percentage x oversampling``; the final bank
    is one greedy pass over their union down to ``percentage`` of all patches. Returns the fitted model.

    ``runner(function, items)`` runs the shard tasks (in this process, or as Ray tasks: the caller's
    choice); a shard that fails on every try raises :class:`ShardError`.
    """
    if oversampling < 1.0:
        raise ValueError(f"shard oversampling must be >= 1, got {oversampling}")
    if not shards:
        raise ValueError("sharded fit needs at least one shard")
    fraction = 1.0 if model.sampler == "identity" else model.percentage * oversampling
    tasks = [ShardTask(model, images, fraction, i, f"shard {i}") for i, images in enumerate(shards)]
    t0 = time.perf_counter()
    outcomes = runner(reduce_shard, tasks)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        first = failed[0]
        raise ShardError(f"shard {first.item} failed after {first.attempts} attempt(s): {first.error}")
    locals_: list[LocalCoreset] = [o.value for o in outcomes]
    t1 = time.perf_counter()
    total = sum(c.n_patches for c in locals_)
    target = None if model.sampler == "identity" else coreset_size(total, model.percentage)
    bank, stats = merge_local_coresets(model, locals_, target)
    stats.update(
        shards=len(shards),
        shard_oversampling=oversampling,
        shard_seconds=round(t1 - t0, 4),
        shard_extract_seconds=[round(c.extract_seconds, 4) for c in locals_],
        shard_coreset_seconds=[round(c.coreset_seconds, 4) for c in locals_],
        extract_seconds=round(t1 - t0, 4),
        coreset_seconds=stats["merge_seconds"],
    )
    install_bank(model, bank, locals_[0].meta, stats)
    return model


def merge_local_coresets(
    model: PatchCore,
    locals_: Sequence[LocalCoreset],
    n_select: int | None,
    weights: np.ndarray | None = None,
    seed_offset: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The union of local coresets reduced to ``n_select`` vectors (None: all), and the statistics of the
    merge. Checks that every part was built with the same features (grid, weights, width)."""
    first = locals_[0]
    for part in locals_[1:]:
        same = part.meta == first.meta and part.weights_id == first.weights_id
        if not same or part.vectors.shape[1] != first.vectors.shape[1]:
            raise ShardError(
                f"{part.name or 'a shard'} has other features ({part.meta}, weights {part.weights_id}) than "
                f"{first.name or 'the first'} ({first.meta}, weights {first.weights_id})"
            )
    union = np.concatenate([c.vectors for c in locals_])
    t0 = time.perf_counter()
    rng = np.random.default_rng([model.seed, 1_000_003 + seed_offset])
    indices = merge_coresets(union, len(union) if n_select is None else n_select, model, rng, weights)
    stats = {
        "n_train_images": sum(c.n_images for c in locals_),
        "n_patches": sum(c.n_patches for c in locals_),
        "union_size": len(union),
        "merge_seconds": round(time.perf_counter() - t0, 4),
    }
    return np.ascontiguousarray(union[np.sort(indices)]), stats

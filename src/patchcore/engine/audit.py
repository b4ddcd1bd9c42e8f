"""Training-set audit and robust fit: which "good" training images look defective (issue 21).

PatchCore trusts its training folder: a defective part in ``train/good`` enters the coreset's candidates, and
the greedy coreset prefers exactly the unusual patches. The audit gives every training image a
**leave-one-image-out score**: for each of its patches, the distance to the nearest patch of the *other*
training images, aggregated like an image score (the maximum over the image's patches). That is the score
the image would get from a model trained on all the other images with the whole patch set as memory bank.

What is computed (and what is approximated)
-------------------------------------------
Distances are measured in a seeded random projection of the patch features to ``projection_dim`` (128)
dimensions, the space the approximate greedy coreset itself works in (``projection_dim=None``: the features
themselves). In that space the image scores are **exact** (up to float32 rounding), against *all* patches of
the other images, not a sample, yet no N x N matrix is built and most patches are never searched:

1. Upper bounds. Every patch is searched against a random sample of the other images' patches
   (``reference_fraction`` of all rows, at least ``min_reference`` rows); the distance to the nearest sampled
   patch can only be larger than the distance to the nearest of all patches.
2. Exact maxima. An image's score is the maximum of its patches' exact distances. Its patches are searched
   exactly (against all other images' patches, streamed in chunks) in decreasing order of their upper bound,
   and the search stops as soon as the largest exact distance found is at least the next upper bound: no
   patch left can exceed it. On ELPV mono (307k patches) a few patches per image are searched exactly.

The projection is the one approximation: a 128-d random projection preserves distances to within a few per
cent (Johnson-Lindenstrauss), and the ranking of images it gives agrees with the full-dimensional one (measured
in ``benchmarks/bench_noisy.py --check-full``; NOTES.md, issue 21).

Warning rule
------------
An image stands out when its score is a robust outlier among the training images' scores:
``score > median + k * 1.4826 * MAD`` with k = 3.5 (the modified z-score rule of Iglewicz and Hoaglin; 1.4826
makes the MAD a consistent estimate of a normal standard deviation). It needs no labelled defects and no
calibration, and a few defective images cannot move the median and the MAD.

Robust fit (``denoise``)
------------------------
A patch is an outlier when its leave-one-image-out distance is above the **median of the images' scores**:
it is farther from every other image than the most unusual patch of the median training image (a
SoftPatch-style outlier score, NeurIPS 2022, with the nearest other image as the neighbourhood). Outlier
patches are left out of the coreset's candidates; an image with more than ``drop_share`` (half) of its
patches outliers is left out whole (the caller warns, naming the file). The cut is deliberately lower than
the warning rule's: the warning must not cry wolf on a clean set, while a defect's milder patches must not
reach the memory bank (on ELPV mono at 112 px, 10 % contamination, cutting at the warning threshold kept the
AUROC at the contaminated level, 73.0; cutting at the median brought it to 81.8 against 80.2 clean). On a clean
set it drops the few most unusual patches of about half the images. Deciding every patch against the
threshold uses the same bounds: a patch whose upper bound is below it is an inlier without an exact search.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .coreset import project, random_projection

__all__ = [
    "AUDIT_K",
    "AUDIT_METHODS",
    "CoresetBounds",
    "DROP_SHARE",
    "DenoisePlan",
    "LeaveOneImageOut",
    "RowSubset",
    "TrainingAudit",
    "audit_features",
    "audit_training_set",
    "coreset_audit",
    "coreset_bounds",
    "coreset_denoise",
    "denoise_rows",
    "image_ids_for",
    "outlier_threshold",
]

AUDIT_K = 3.5  # modified z-score cut-off (Iglewicz and Hoaglin)
MAD_SCALE = 1.4826  # MAD -> standard deviation of a normal distribution
DROP_SHARE = 0.5  # an image with more than this share of outlier patches is dropped whole
_CHUNK_ROWS = 16384  # rows of the searched set per distance block
_QUERY_ROWS = 2048  # query rows per exact search call (block: 2048 x 16384 float32 = 128 MiB)
_SEED_SALT = 21  # the audit's random stream is its own: the coreset's random choices are untouched
AUDIT_METHODS = ("coreset", "exact")  # the estimator's ``audit_method`` (see coreset_audit)


def outlier_threshold(scores: np.ndarray, k: float = AUDIT_K) -> float:
    """``median + k * 1.4826 * MAD`` of the finite scores (the robust outlier rule)."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.inf
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return median + k * MAD_SCALE * mad


def image_ids_for(n_images: int, n_rows: int) -> np.ndarray:
    """Row -> image for features stored image after image, ``n_rows / n_images`` rows each."""
    if n_images < 1 or n_rows % n_images:
        raise ValueError(f"{n_rows} feature rows cannot be split evenly over {n_images} images")
    return np.repeat(np.arange(n_images, dtype=np.int64), n_rows // n_images)


class RowSubset:
    """Rows ``rows`` (increasing) of (N, D) features, with the slicing the samplers use; reads go to the
    underlying array or feature file, so nothing is copied whole."""

    def __init__(self, features, rows: np.ndarray):
        self.features = features
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), int(features.shape[1]))
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.asarray(self.features[self.rows[key]], dtype=np.float32)
        if isinstance(key, (int, np.integer)):
            return np.asarray(self.features[int(self.rows[int(key)])], dtype=np.float32)
        return np.asarray(self.features[self.rows[np.asarray(key, dtype=np.int64)]], dtype=np.float32)


class LeaveOneImageOut:
    """Nearest-neighbour distances of patches to the patches of the *other* images (see the module text).

    ``features``: (N, D) rows (array, tensor or feature file, read in chunks); ``image_ids``: (N,) the image
    of each row. Distances are Euclidean, in the seeded ``projection_dim`` random projection (None: the
    features themselves). Peak memory: the projected rows (N x projection_dim float32) and a few (N,) arrays.
    """

    def __init__(
        self,
        features,
        image_ids: np.ndarray,
        *,
        seed: int = 0,
        projection_dim: int | None = 128,
        reference_fraction: float = 0.02,
        min_reference: int = 2048,
        projected: torch.Tensor | None = None,
        upper: np.ndarray | None = None,
        bound_source: str = "",
    ):
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(features):
            raise ValueError(f"{len(ids)} image ids for {len(features)} feature rows")
        self.images, self.row_image = np.unique(ids, return_inverse=True)
        if len(self.images) < 2:
            raise ValueError("a leave-one-image-out search needs at least 2 images")
        rng = np.random.default_rng([int(seed), _SEED_SALT])
        if projected is not None:  # rows already in the audit's space (the coreset's: coreset_audit)
            self.z = projected
        else:
            dim = int(features.shape[1])
            weight = None
            if projection_dim is not None and projection_dim < dim:
                weight = random_projection(dim, projection_dim, rng)
            self.z = project(features, weight)
        self.squared = (self.z * self.z).sum(1)
        self.ids = torch.from_numpy(self.row_image.astype(np.int64))
        n = len(self.z)
        self.exact = np.full(n, np.nan, dtype=np.float32)  # exact squared distances found so far
        self._upper: np.ndarray | None = None
        if upper is not None:  # first-level upper bounds given (squared): no random sample needed
            self._upper = np.asarray(upper, dtype=np.float32)
            self.reference = np.empty(0, dtype=np.int64)
            self.bound_source = bound_source or "given upper bounds"
        else:
            size = min(n, max(int(min_reference), math.ceil(reference_fraction * n)))
            self.reference = np.sort(rng.choice(n, size, replace=False)).astype(np.int64)
            self.bound_source = f"a {size}-row sample"
        self.exact_searches = 0

    @property
    def n_rows(self) -> int:
        return len(self.z)

    def _nearest_other(self, queries: np.ndarray, candidates: torch.Tensor | None) -> np.ndarray:
        """Squared distance of each query row to its nearest row of another image, among ``candidates``
        (row numbers; None = all rows). inf where no candidate belongs to another image."""
        q = self.z[torch.from_numpy(queries)]
        q_sq = self.squared[torch.from_numpy(queries)].unsqueeze(1)
        q_id = self.ids[torch.from_numpy(queries)].unsqueeze(1)
        best = torch.full((len(queries),), math.inf, dtype=torch.float32)
        total = self.n_rows if candidates is None else len(candidates)
        for start in range(0, total, _CHUNK_ROWS):
            if candidates is None:
                block = slice(start, min(total, start + _CHUNK_ROWS))
                c, c_sq, c_id = self.z[block], self.squared[block], self.ids[block]
            else:
                take = candidates[start : start + _CHUNK_ROWS]
                c, c_sq, c_id = self.z[take], self.squared[take], self.ids[take]
            d = torch.addmm(q_sq + c_sq.unsqueeze(0), q, c.T, beta=1.0, alpha=-2.0)
            d.masked_fill_(q_id == c_id.unsqueeze(0), math.inf)
            torch.minimum(best, d.min(1).values, out=best)
        return best.clamp_(min=0).numpy()

    def upper_bounds(self) -> np.ndarray:
        """(N,) squared distance of every row to the nearest reference-sample row of another image: an
        upper bound of its exact leave-one-image-out distance (computed once)."""
        if self._upper is None:
            reference = torch.from_numpy(self.reference)
            upper = np.empty(self.n_rows, dtype=np.float32)
            for start in range(0, self.n_rows, _QUERY_ROWS):
                rows = np.arange(start, min(self.n_rows, start + _QUERY_ROWS))
                upper[rows] = self._nearest_other(rows, reference)
            self._upper = upper
        return self._upper

    def exact_squared(self, rows: np.ndarray) -> np.ndarray:
        """Exact squared leave-one-image-out distances of ``rows`` (searched once each, then remembered)."""
        rows = np.asarray(rows, dtype=np.int64)
        todo = np.unique(rows[np.isnan(self.exact[rows])])
        for start in range(0, len(todo), _QUERY_ROWS):
            part = todo[start : start + _QUERY_ROWS]
            self.exact[part] = self._nearest_other(part, None)
            self.exact_searches += len(part)
        # The exact search can round a hair above the bound from the sample (a different summation order).
        upper = self.upper_bounds()
        self.exact[rows] = np.minimum(self.exact[rows], upper[rows])
        return self.exact[rows]

    def image_maxima(self, step: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """(scores, top rows): per image, the maximum exact leave-one-image-out distance over its patches
        (Euclidean) and the row where it is reached; pruned by the upper bounds, exact all the same."""
        upper = self.upper_bounds()
        n_images = len(self.images)
        order = np.lexsort((-upper, self.row_image))  # by image, then decreasing upper bound
        starts = np.searchsorted(self.row_image[order], np.arange(n_images + 1))
        best = np.full(n_images, -1.0, dtype=np.float64)
        top = np.full(n_images, -1, dtype=np.int64)
        taken = np.zeros(n_images, dtype=np.int64)
        open_images = np.arange(n_images)
        while open_images.size:
            batch = [
                order[starts[i] + taken[i] : min(starts[i + 1], starts[i] + taken[i] + step)]
                for i in open_images
            ]
            values = self.exact_squared(np.concatenate(batch))
            offset = 0
            still = []
            for i, rows in zip(open_images, batch, strict=True):
                part = values[offset : offset + len(rows)]
                offset += len(rows)
                j = int(np.argmax(part))
                if part[j] > best[i]:
                    best[i], top[i] = float(part[j]), int(rows[j])
                taken[i] += len(rows)
                nxt = starts[i] + taken[i]
                if nxt < starts[i + 1] and upper[order[nxt]] > best[i]:
                    still.append(i)
            open_images = np.asarray(still, dtype=np.int64)
        return np.sqrt(np.maximum(best, 0.0)).astype(np.float32), top

    def outliers(self, threshold: float) -> np.ndarray:
        """(N,) bool: rows whose exact leave-one-image-out distance is above ``threshold`` (Euclidean).
        Rows whose upper bound is at most the threshold are inliers without an exact search."""
        squared = threshold * threshold
        upper = self.upper_bounds()
        candidates = np.flatnonzero(upper > squared)
        out = np.zeros(self.n_rows, dtype=bool)
        if candidates.size:
            out[candidates] = self.exact_squared(candidates) > squared
        return out

    def image_rows(self, image: int) -> np.ndarray:
        """The rows of image number ``image`` (0-based, in the order of the sorted image ids)."""
        return np.flatnonzero(self.row_image == image)


@dataclass(frozen=True)
class TrainingAudit:
    """The training-set audit of one fit: a leave-one-image-out score per training image.

    ``image_scores[i]``: image i's score (position in the fit's input), Euclidean, in the audit's space;
    ``threshold``: the warning rule's cut-off (``rule`` says which); ``suspects``: the images above it, most
    suspicious first; ``ranking``: all images, most suspicious first; ``maps``: exact per-patch scores
    (``patch_grid``) of the ``len(maps)`` most suspicious images.
    """

    image_scores: np.ndarray
    top_rows: np.ndarray
    threshold: float
    suspects: tuple[int, ...]
    ranking: np.ndarray
    maps: dict[int, np.ndarray] = field(default_factory=dict)
    patch_grid: tuple[int, int] | None = None
    rule: str = ""
    method: str = ""
    exact_searches: int = 0
    n_rows: int = 0
    seconds: float = 0.0
    # The coreset audit (``coreset_audit``, not exact): per image, how far above its exact score its score can
    # be (``0 <= image_scores[i] - exact[i] <= bounds[i]``); None when the scores are exact.
    bounds: np.ndarray | None = None
    kind: str = "exact"  # exact | coreset (AUDIT_METHODS)

    def summary(self) -> dict[str, object]:
        """Plain numbers for a model's stats / a run's summary (no arrays)."""
        out: dict[str, object] = {
            "audit_threshold": round(float(self.threshold), 6),
            "audit_suspects": len(self.suspects),
            "audit_seconds": round(self.seconds, 4),
            "audit_exact_fraction": round(self.exact_searches / max(1, self.n_rows), 6),
            "audit_method": self.kind,
        }
        if self.bounds is not None and len(self.bounds):
            out["audit_max_bound"] = round(float(np.max(self.bounds)), 6)
        return out


@dataclass(frozen=True)
class DenoisePlan:
    """What the robust fit keeps: ``keep`` (increasing rows), the number of outlier patches left out and
    the images left out whole (positions, because more than ``drop_share`` of their patches are outliers)."""

    keep: np.ndarray
    outlier_patches: int
    dropped_images: tuple[int, ...]
    threshold: float
    drop_share: float


def audit_training_set(
    search: LeaveOneImageOut,
    patch_grid: tuple[int, int] | None = None,
    *,
    k: float = AUDIT_K,
    n_maps: int = 6,
) -> TrainingAudit:
    """Score every image, apply the warning rule and compute the maps of the ``n_maps`` top images."""
    t0 = time.perf_counter()
    scores, top = search.image_maxima()
    threshold = outlier_threshold(scores, k)
    ranking = np.argsort(-scores, kind="stable")
    suspects = tuple(int(i) for i in ranking if scores[i] > threshold)
    maps: dict[int, np.ndarray] = {}
    for i in ranking[: max(0, n_maps)]:
        rows = search.image_rows(int(i))
        values = np.sqrt(np.maximum(search.exact_squared(rows), 0.0)).astype(np.float32)
        if patch_grid is not None and len(values) == patch_grid[0] * patch_grid[1]:
            values = values.reshape(patch_grid)
        maps[int(i)] = values
    method = (
        f"exact leave-one-image-out nearest-patch distance in a {search.z.shape[1]}-d space "
        f"(pruned by {search.bound_source})"
    )
    return TrainingAudit(
        image_scores=scores,
        top_rows=top,
        threshold=float(threshold),
        suspects=suspects,
        ranking=ranking,
        maps=maps,
        patch_grid=None if patch_grid is None else (int(patch_grid[0]), int(patch_grid[1])),
        rule=f"median + {k:g} x 1.4826 x MAD of the training images' scores",
        method=method,
        exact_searches=search.exact_searches,
        n_rows=search.n_rows,
        seconds=time.perf_counter() - t0,
    )


def denoise_rows(
    search: LeaveOneImageOut, audit: TrainingAudit, drop_share: float = DROP_SHARE
) -> DenoisePlan:
    """The rows the robust fit keeps: not outlier patches (leave-one-image-out distance above the median of
    the images' scores: farther from every other image than the most unusual patch of the median training
    image), and no row of an image whose patches are more than ``drop_share`` outliers."""
    threshold = float(np.median(audit.image_scores))
    outlier = search.outliers(threshold)
    return _plan(outlier, search.row_image, len(search.images), threshold, drop_share)


def audit_features(
    features,
    image_ids: np.ndarray,
    patch_grid: tuple[int, int] | None = None,
    *,
    seed: int = 0,
    projection_dim: int | None = 128,
    k: float = AUDIT_K,
    n_maps: int = 6,
) -> TrainingAudit:
    """The audit of (N, D) patch features whose rows belong to the images ``image_ids`` (N,): see the
    module text. Positions in the result follow the sorted unique image ids."""
    t0 = time.perf_counter()
    search = LeaveOneImageOut(features, image_ids, seed=seed, projection_dim=projection_dim)
    audit = audit_training_set(search, patch_grid, k=k, n_maps=n_maps)
    return _with_seconds(audit, time.perf_counter() - t0)


def _with_seconds(audit: TrainingAudit, seconds: float) -> TrainingAudit:
    return replace(audit, seconds=seconds)


def audit_fit(
    features, meta: dict, seed: int, denoise: bool
) -> tuple[TrainingAudit | None, DenoisePlan | None]:
    """What a fit runs before its coreset: the audit of its training features (stored image after image,
    ``meta["n_images"]`` of them) and, with ``denoise``, the rows the coreset may choose from. (None, None)
    with fewer than 2 images (no other image to compare with). Warns (``warnings``), naming the images by
    their position in the fit's input, when the robust fit leaves whole images out."""
    n_images, n_rows = int(meta["n_images"]), len(features)
    if n_images < 2 or n_rows % n_images:
        return None, None
    t0 = time.perf_counter()
    search = LeaveOneImageOut(features, image_ids_for(n_images, n_rows), seed=seed)
    audit = audit_training_set(search, tuple(meta.get("patch_grid") or ()) or None)
    plan = denoise_rows(search, audit) if denoise else None
    audit = _with_seconds(audit, time.perf_counter() - t0)
    _warn_dropped(plan)
    return audit, plan


def audit_stats(audit: TrainingAudit | None, plan: DenoisePlan | None) -> dict[str, Any]:
    """The audit's and the robust fit's plain numbers, as ``FitStats`` keywords."""
    out: dict[str, Any] = {} if audit is None else dict(audit.summary())
    if plan is not None:
        out.update(
            denoise_kept_patches=int(len(plan.keep)),
            denoise_outlier_patches=plan.outlier_patches,
            denoise_dropped_images=tuple(plan.dropped_images),
        )
    return out


# ----------------------------------------------------------------------------- the audit from the coreset


@dataclass(frozen=True)
class CoresetBounds:
    """Leave-one-image-out distances measured against the coreset's rows instead of all rows.

    ``nearest_other`` (N,): squared distance of every row to the nearest *coreset* row of another image, an
    upper bound of its exact leave-one-image-out distance; ``image_bound`` (n_images,): r_i, Euclidean, how
    far below ``sqrt(nearest_other)`` the exact distance of any row of image i can be; ``covering_radius``: the
    largest distance of a row to its nearest coreset row (any image), for the record.
    """

    nearest_other: np.ndarray
    image_bound: np.ndarray
    covering_radius: float


def _nearest_two_images(
    z: torch.Tensor, centres: np.ndarray, centre_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``z``: (d1, g1, d2): squared distance to the nearest centre row, that centre's image, and
    squared distance to the nearest centre row of any *other* image than g1. Streamed in blocks."""
    n = len(z)
    c_all = z[torch.from_numpy(centres)]
    c_sq_all = (c_all * c_all).sum(1)
    c_id_all = torch.from_numpy(np.asarray(centre_image, dtype=np.int64))
    d1 = torch.empty(n, dtype=torch.float32)
    g1 = torch.empty(n, dtype=torch.int64)
    d2 = torch.empty(n, dtype=torch.float32)
    q_sq_all = (z * z).sum(1)
    for start in range(0, n, _QUERY_ROWS):
        q = z[start : start + _QUERY_ROWS]
        q_sq = q_sq_all[start : start + _QUERY_ROWS].unsqueeze(1)
        best = torch.full((len(q),), math.inf)
        best_id = torch.full((len(q),), -1, dtype=torch.int64)
        second = torch.full((len(q),), math.inf)
        for c0 in range(0, len(c_all), _CHUNK_ROWS):
            c, c_sq, c_id = c_all[c0 : c0 + _CHUNK_ROWS], c_sq_all[c0 : c0 + _CHUNK_ROWS], c_id_all[c0 : c0 + _CHUNK_ROWS]
            d = torch.addmm(q_sq + c_sq.unsqueeze(0), q, c.T, beta=1.0, alpha=-2.0)
            m1, j = d.min(1)
            h1 = c_id[j]
            d.masked_fill_(c_id.unsqueeze(0) == h1.unsqueeze(1), math.inf)
            m2 = d.min(1).values  # nearest centre of this chunk outside the image h1
            # Merge (best, best_id, second) with (m1, h1, m2): the nearest centre, and the nearest outside
            # the winner's image.
            win = m1 < best
            same = best_id == h1
            chunk_wins = torch.minimum(m2, torch.where(same, second, best))
            old_wins = torch.minimum(second, torch.where(same, m2, m1))
            second = torch.where(win, chunk_wins, old_wins)
            best = torch.where(win, m1, best)
            best_id = torch.where(win, h1, best_id)
        d1[start : start + len(q)] = best.clamp_(min=0)
        g1[start : start + len(q)] = best_id
        d2[start : start + len(q)] = second.clamp_(min=0)
    return d1.numpy(), g1.numpy(), d2.numpy()


def coreset_bounds(z: torch.Tensor, row_image: np.ndarray, centres: np.ndarray) -> CoresetBounds:
    """The leave-one-image-out distances of every row against the coreset ``centres`` (rows of ``z``), and
    the per-image bound r_i that makes them a two-sided estimate of the exact ones.

    Row x of image i: a(x) = distance to the nearest centre of another image; e(x) = exact
    leave-one-image-out distance (nearest row of another image). The centres are rows, so a(x) >= e(x).
    Let y be x's nearest row of another image (e(x) = ||x - y||) and c the nearest centre to y outside image
    i: a(x) <= ||x - c|| <= e(x) + ||y - c|| <= e(x) + r_i, with r_i = the largest distance of a row outside
    image i to its nearest centre outside image i. Per row, two numbers give every r_i: d1 (nearest centre,
    of image g1) and d2 (nearest centre outside g1): a row's distance to its nearest centre outside image i
    is d1 if g1 != i, else d2. So 0 <= a(x) - e(x) <= r_i, and for the image scores (maxima over the
    image's rows) 0 <= A_i - S_i <= r_i. r_i is measured, not assumed from the greedy loop.
    """
    row_image = np.asarray(row_image, dtype=np.int64)
    centres = np.unique(np.asarray(centres, dtype=np.int64))
    n_images = int(row_image.max()) + 1
    d1, g1, d2 = _nearest_two_images(z, centres, row_image[centres])
    own = g1 == row_image
    nearest_other = np.where(own, d2, d1)
    # r_i^2 = max over rows y outside image i of (d1(y) if g1(y) != i else d2(y)).
    # (1) rows with g1 == i (outside image i): their d2.
    outside = ~own
    term2 = np.zeros(n_images, dtype=np.float64)
    valid = outside & (g1 >= 0)
    np.maximum.at(term2, g1[valid], d2[valid].astype(np.float64))
    # (2) rows with img != i and g1 != i: their d1. Group by the pair (img, g1); a pair involves at most two
    # images, so among the 2 * n_images largest pair maxima each image finds one that does not involve it.
    pair = row_image * n_images + np.where(g1 >= 0, g1, row_image)
    keys, inverse = np.unique(pair, return_inverse=True)
    pair_max = np.zeros(len(keys), dtype=np.float64)
    np.maximum.at(pair_max, inverse, d1.astype(np.float64))
    order = np.argsort(-pair_max, kind="stable")[: 2 * n_images + 1]
    a_img, b_img, values = keys[order] // n_images, keys[order] % n_images, pair_max[order]
    images = np.arange(n_images)[:, None]
    allowed = (a_img[None, :] != images) & (b_img[None, :] != images)
    first = np.where(allowed.any(1), allowed.argmax(1), -1)
    term1 = np.where(first >= 0, values[np.maximum(first, 0)], 0.0)
    image_bound = np.sqrt(np.maximum(term1, term2)).astype(np.float32)
    return CoresetBounds(
        nearest_other=nearest_other.astype(np.float32),
        image_bound=image_bound,
        covering_radius=float(np.sqrt(d1.max())) if len(d1) else 0.0,
    )


def coreset_audit(
    features,
    meta: dict,
    indices: np.ndarray,
    projection: np.ndarray | None | str,
    *,
    seed: int = 0,
    method: str = "coreset",
    k: float = AUDIT_K,
    n_maps: int = 6,
) -> TrainingAudit | None:
    """The audit a fit runs after its coreset (``denoise`` off), from the rows the coreset chose.

    ``projection``: the coreset's random projection (None: the features themselves; see ``CoresetSpace``;
    "own": the audit's own seeded 128-d projection, for a sampler that measured no distances).
    ``method="coreset"``: each image's score is the maximum over its patches of the distance to the nearest
    coreset row of another image, A_i, within ``bounds[i]`` = r_i above the exact score (``coreset_bounds``);
    no exact search. ``method="exact"``: the exact leave-one-image-out scores in the same space, the coreset
    distances serving as the first-level upper bounds of the pruned exact search (``LeaveOneImageOut``).
    None with fewer than 2 images. Reads only: the bank is whatever the coreset chose.
    """
    result = _coreset_audit(features, meta, indices, projection, seed=seed, method=method, k=k, n_maps=n_maps)
    return None if result is None else result[0]


def _coreset_audit(
    features,
    meta: dict,
    indices: np.ndarray,
    projection: np.ndarray | None | str,
    *,
    seed: int,
    method: str,
    k: float,
    n_maps: int,
) -> tuple[TrainingAudit, CoresetBounds] | None:
    if method not in AUDIT_METHODS:
        raise ValueError(f"unknown audit method {method!r}; known: {', '.join(AUDIT_METHODS)}")
    n_images, n_rows = int(meta["n_images"]), len(features)
    if n_images < 2 or n_rows % n_images:
        return None
    t0 = time.perf_counter()
    ids = image_ids_for(n_images, n_rows)
    if isinstance(projection, str):  # "own": no coreset space given (a random sampler): the audit's own
        dim = int(features.shape[1])
        rng = np.random.default_rng([int(seed), _SEED_SALT])
        projection = random_projection(dim, 128, rng) if dim > 128 else None
    z = project(features, projection)
    bounds = coreset_bounds(z, ids, indices)
    grid = tuple(meta.get("patch_grid") or ()) or None
    space = f"{z.shape[1]}-d coreset space"
    if method == "exact" or not np.isfinite(bounds.nearest_other).all():
        # (A coreset with rows of one image only leaves some rows without a centre of another image: their
        # exact search decides.)
        search = LeaveOneImageOut(
            features, ids, seed=seed, projected=z, upper=bounds.nearest_other,
            bound_source=f"the distances to the {len(np.unique(indices))} coreset rows",
        )  # fmt: skip
        audit = audit_training_set(search, grid, k=k, n_maps=n_maps)
        return replace(audit, seconds=time.perf_counter() - t0), bounds
    nearest = np.sqrt(np.maximum(bounds.nearest_other, 0.0)).reshape(n_images, -1)
    top_local = nearest.argmax(1)
    scores = nearest[np.arange(n_images), top_local].astype(np.float32)
    threshold = outlier_threshold(scores, k)
    ranking = np.argsort(-scores, kind="stable")
    per_image = n_rows // n_images
    maps: dict[int, np.ndarray] = {}
    for i in ranking[: max(0, n_maps)]:
        values = nearest[int(i)].astype(np.float32)
        if grid is not None and len(values) == grid[0] * grid[1]:
            values = values.reshape(grid)
        maps[int(i)] = values
    audit = TrainingAudit(
        image_scores=scores,
        top_rows=np.arange(n_images, dtype=np.int64) * per_image + top_local,
        threshold=float(threshold),
        suspects=tuple(int(i) for i in ranking if scores[i] > threshold),
        ranking=ranking,
        maps=maps,
        patch_grid=None if grid is None else (int(grid[0]), int(grid[1])),
        rule=f"median + {k:g} x 1.4826 x MAD of the training images' scores",
        method=(
            f"leave-one-image-out nearest-patch distance to the {len(np.unique(indices))} coreset rows of the "
            f"other images in the {space}; above the exact score by at most r_i per image (largest "
            f"{float(bounds.image_bound.max()):.4g}; covering radius {bounds.covering_radius:.4g})"
        ),
        exact_searches=0,
        n_rows=n_rows,
        seconds=time.perf_counter() - t0,
        bounds=bounds.image_bound,
        kind="coreset",
    )
    return audit, bounds


def coreset_denoise(
    features,
    meta: dict,
    indices: np.ndarray,
    projection: np.ndarray | None | str,
    *,
    seed: int = 0,
    drop_share: float = DROP_SHARE,
) -> tuple[TrainingAudit | None, DenoisePlan | None]:
    """The robust fit's selection from a first coreset (``audit_method="coreset"``): the coreset audit of all
    images, then the rule of ``denoise_rows`` applied to the coreset distances: a patch is an outlier when
    its distance to the nearest coreset row of another image is above the median image score; an image
    with more than ``drop_share`` outlier patches is left out whole. (None, None) with fewer than 2 images.
    Warns, naming positions, when whole images are left out."""
    result = _coreset_audit(features, meta, indices, projection, seed=seed, method="coreset", k=AUDIT_K, n_maps=6)
    if result is None:
        return None, None
    t0 = time.perf_counter()
    audit, bounds = result
    n_images = int(meta["n_images"])
    row_image = image_ids_for(n_images, len(features))
    threshold = float(np.median(audit.image_scores))
    outlier = np.sqrt(np.maximum(bounds.nearest_other, 0.0)) > threshold
    plan = _plan(outlier, row_image, n_images, threshold, drop_share)
    _warn_dropped(plan)
    return replace(audit, seconds=audit.seconds + time.perf_counter() - t0), plan


def _plan(
    outlier: np.ndarray, row_image: np.ndarray, n_images: int, threshold: float, drop_share: float
) -> DenoisePlan:
    share = np.bincount(row_image, weights=outlier, minlength=n_images) / np.bincount(
        row_image, minlength=n_images
    )
    dropped = tuple(int(i) for i in np.flatnonzero(share > drop_share))
    keep_mask = ~outlier
    if dropped:
        keep_mask &= ~np.isin(row_image, np.asarray(dropped))
    if not keep_mask.any():  # every patch judged an outlier cannot happen with a median rule; be safe
        keep_mask[:] = True
        dropped = ()
    return DenoisePlan(
        keep=np.flatnonzero(keep_mask).astype(np.int64),
        outlier_patches=int(outlier.sum()),
        dropped_images=dropped,
        threshold=threshold,
        drop_share=drop_share,
    )


def _warn_dropped(plan: DenoisePlan | None) -> None:
    if plan is not None and plan.dropped_images:
        import warnings

        shown = ", ".join(str(i) for i in plan.dropped_images[:10])
        more = f" and {len(plan.dropped_images) - 10} more" if len(plan.dropped_images) > 10 else ""
        warnings.warn(
            f"denoise: {len(plan.dropped_images)} training image(s) left out of the memory bank, most of "
            f"their patches being outliers: position(s) {shown}{more} of the fit's input",
            stacklevel=4,
        )

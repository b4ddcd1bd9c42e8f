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
from dataclasses import dataclass, field

import numpy as np
import torch

from .coreset import project, random_projection

__all__ = [
    "AUDIT_K",
    "DROP_SHARE",
    "DenoisePlan",
    "LeaveOneImageOut",
    "RowSubset",
    "TrainingAudit",
    "audit_features",
    "audit_training_set",
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
    ):
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(features):
            raise ValueError(f"{len(ids)} image ids for {len(features)} feature rows")
        self.images, self.row_image = np.unique(ids, return_inverse=True)
        if len(self.images) < 2:
            raise ValueError("a leave-one-image-out search needs at least 2 images")
        rng = np.random.default_rng([int(seed), _SEED_SALT])
        dim = int(features.shape[1])
        weight = None
        if projection_dim is not None and projection_dim < dim:
            weight = random_projection(dim, projection_dim, rng)
        self.z = project(features, weight)
        self.squared = (self.z * self.z).sum(1)
        self.ids = torch.from_numpy(self.row_image.astype(np.int64))
        n = len(self.z)
        size = min(n, max(int(min_reference), math.ceil(reference_fraction * n)))
        self.reference = np.sort(rng.choice(n, size, replace=False)).astype(np.int64)
        self.exact = np.full(n, np.nan, dtype=np.float32)  # exact squared distances found so far
        self._upper: np.ndarray | None = None
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

    def summary(self) -> dict[str, object]:
        """Plain numbers for a model's stats / a run's summary (no arrays)."""
        return {
            "audit_threshold": round(float(self.threshold), 6),
            "audit_suspects": len(self.suspects),
            "audit_seconds": round(self.seconds, 4),
            "audit_exact_fraction": round(self.exact_searches / max(1, self.n_rows), 6),
        }


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
        f"(pruned by a {len(search.reference)}-row sample)"
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
    n_images = len(search.images)
    share = np.bincount(search.row_image, weights=outlier, minlength=n_images) / np.bincount(
        search.row_image, minlength=n_images
    )
    dropped = tuple(int(i) for i in np.flatnonzero(share > drop_share))
    keep_mask = ~outlier
    if dropped:
        keep_mask &= ~np.isin(search.row_image, np.asarray(dropped))
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
    from dataclasses import replace

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
    if plan is not None and plan.dropped_images:
        import warnings

        shown = ", ".join(str(i) for i in plan.dropped_images[:10])
        more = f" and {len(plan.dropped_images) - 10} more" if len(plan.dropped_images) > 10 else ""
        warnings.warn(
            f"denoise: {len(plan.dropped_images)} training image(s) left out of the memory bank, most of "
            f"their patches being outliers: position(s) {shown}{more} of the fit's input",
            stacklevel=3,
        )
    return audit, plan


def audit_stats(audit: TrainingAudit | None, plan: DenoisePlan | None) -> dict[str, object]:
    """The audit's and the robust fit's plain numbers, for a model's ``stats_``."""
    out: dict[str, object] = {} if audit is None else audit.summary()
    if plan is not None:
        out.update(
            denoise_kept_patches=int(len(plan.keep)),
            denoise_outlier_patches=plan.outlier_patches,
            denoise_dropped_images=tuple(plan.dropped_images),
        )
    return out

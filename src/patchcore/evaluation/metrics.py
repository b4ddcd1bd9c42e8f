"""Evaluation metrics: image/pixel AUROC, F1-max, PRO / AU-PRO (MVTec AD) and sPRO / AUC-sPRO (AutoVI).

All functions are pure numpy/scipy/scikit-learn. Metrics whose ground truth is absent (a single image
class, no anomalous pixel, no good pixel) are reported as ``None``, never as 0.

Threshold sweeps (PRO and sPRO) are exact: one curve point per distinct anomaly score, where a pixel is
predicted anomalous when its score is >= the threshold, so all pixels sharing a score enter together (tied
scores collapse into one step). The curves start at (0, 0), the point of a threshold above every score, and
consecutive identical points are merged.

Masks are binary arrays (bool or 0/1) of the same shape as their anomaly map. Wherever a list of masks is
accepted, ``None`` stands for an all-zero mask (a good image without a mask file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "DEFAULT_SPRO_FPR_LIMITS",
    "SaturationSpec",
    "au_pro",
    "au_spro",
    "compute_metrics",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "spro_curve",
    "trapezoid_area_to_limit",
]

DEFAULT_SPRO_FPR_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)

MapsInput = np.ndarray | Sequence[np.ndarray]
MasksInput = np.ndarray | Sequence[np.ndarray | None]

_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=int)


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------


def _labels_and_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"got {y.shape[0]} labels but {s.shape[0]} scores")
    if y.dtype != bool:
        if y.size and np.any((y != 0) & (y != 1)):
            raise ValueError("labels must be 0 (good) or 1 (defect)")
        y = y != 0
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN at index {int(np.flatnonzero(np.isnan(s))[0])}")
    return y, s


def _as_list(arrays: MapsInput | MasksInput, name: str) -> list:
    if isinstance(arrays, np.ndarray):
        if arrays.ndim != 3:
            raise ValueError(
                f"{name} must be an (N, H, W) array or a sequence of (H, W) arrays, got shape {arrays.shape}"
            )
        return list(arrays)
    return list(arrays)


def _checked_maps(maps: MapsInput) -> list[np.ndarray]:
    """Maps as a list of 2-D floating arrays with a common dtype; raises on NaN or bad dimensions."""
    out = []
    for i, m in enumerate(_as_list(maps, "maps")):
        m = np.asarray(m)
        if m.ndim != 2:
            raise ValueError(f"maps[{i}] must be 2-D (H, W), got shape {m.shape}")
        if not np.issubdtype(m.dtype, np.floating):
            m = m.astype(np.float64)
        if np.isnan(m).any():
            raise ValueError(f"maps[{i}] contains NaN scores")
        out.append(m)
    if out:
        dtype = np.result_type(*out)
        out = [m.astype(dtype, copy=False) for m in out]
    return out


def _bool_mask(mask: ArrayLike | None, shape: tuple[int, ...], where: str, map_name: str) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, dtype=bool)
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"{where} has shape {m.shape} but {map_name} has shape {shape}")
    if m.dtype == bool:
        return m
    if np.any((m != 0) & (m != 1)):
        raise ValueError(f"{where} is not binary (expected bool or 0/1 values)")
    return m != 0


def _checked_masks_and_maps(masks: MasksInput, maps: MapsInput) -> tuple[list[np.ndarray], list[np.ndarray]]:
    maps_l = _checked_maps(maps)
    masks_in = _as_list(masks, "masks")
    if len(masks_in) != len(maps_l):
        raise ValueError(f"got {len(masks_in)} masks but {len(maps_l)} maps")
    masks_l = [
        _bool_mask(m, a.shape, f"masks[{i}]", f"maps[{i}]")
        for i, (m, a) in enumerate(zip(masks_in, maps_l, strict=True))
    ]
    return masks_l, maps_l


def _check_limit(limit: float) -> float:
    limit = float(limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"FPR limit must be in (0, 1], got {limit}")
    return limit


def _concat(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Image-level metrics
# ----------------------------------------------------------------------------------------------------------


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Image-level ROC AUC (good=0, defect=1); ``None`` unless both classes are present."""
    y, s = _labels_and_scores(labels, scores)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Maximum F1 over all thresholds of the image scores; ``None`` when there is no defective image."""
    y, s = _labels_and_scores(labels, scores)
    if not y.any():
        return None
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


# ----------------------------------------------------------------------------------------------------------
# Pixel AUROC
# ----------------------------------------------------------------------------------------------------------


def pixel_auroc(
    masks: MasksInput,
    maps: MapsInput,
    labels: ArrayLike | None = None,
    anomalous_only: bool = False,
) -> float | None:
    """Pixel-level ROC AUC over all test pixels, or over the pixels of defective images only.

    With ``anomalous_only`` the images used are those with ``labels == 1`` (or, when ``labels`` is None,
    those whose mask has a positive pixel). Returns ``None`` unless both pixel classes are present.
    """
    masks_l, maps_l = _checked_masks_and_maps(masks, maps)
    keep = list(range(len(maps_l)))
    if anomalous_only:
        if labels is None:
            keep = [i for i in keep if masks_l[i].any()]
        else:
            y = np.asarray(labels).ravel()
            if y.shape[0] != len(maps_l):
                raise ValueError(f"got {y.shape[0]} labels but {len(maps_l)} maps")
            keep = [i for i in keep if y[i] == 1]
    if not keep:
        return None
    y_true = np.concatenate([masks_l[i].ravel() for i in keep])
    if y_true.all() or not y_true.any():
        return None
    y_score = np.concatenate([maps_l[i].ravel() for i in keep])
    return float(roc_auc_score(y_true, y_score))


# ----------------------------------------------------------------------------------------------------------
# Threshold sweeps
# ----------------------------------------------------------------------------------------------------------


def _sweep(
    neg_scores: np.ndarray, pos_scores: np.ndarray, pos_weights: np.ndarray, normaliser: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, overlap) curve over every distinct score, thresholds from high to low.

    At threshold t (pixels with score >= t are positive), FPR = #negatives >= t / #negatives and
    overlap = sum of the weights of the weighted pixels >= t / normaliser.
    """
    thresholds = np.unique(np.concatenate([neg_scores, pos_scores]))[::-1]
    neg_sorted = np.sort(neg_scores)
    fp = neg_sorted.size - np.searchsorted(neg_sorted, thresholds, side="left")
    order = np.argsort(pos_scores, kind="stable")
    pos_sorted = pos_scores[order]
    suffix = np.zeros(pos_sorted.size + 1, dtype=np.float64)
    suffix[:-1] = np.cumsum(pos_weights[order][::-1])[::-1]
    covered = suffix[np.searchsorted(pos_sorted, thresholds, side="left")]
    fpr = np.concatenate(([0.0], fp / neg_sorted.size))
    overlap = np.concatenate(([0.0], np.clip(covered / normaliser, 0.0, 1.0)))
    keep = np.ones(fpr.size, dtype=bool)
    keep[1:] = (np.diff(fpr) != 0) | (np.diff(overlap) != 0)
    return fpr[keep], overlap[keep]


def trapezoid_area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) from the curve start (x=0 here) up to ``limit``, divided by ``limit``.

    ``x`` must be non-decreasing; y is linearly interpolated at ``limit`` when it falls between two points.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"x and y must be non-empty 1-D arrays of equal length, got {x.shape} and {y.shape}")
    if np.any(np.diff(x) < 0):
        raise ValueError("x must be non-decreasing")
    limit = float(limit)
    if limit <= 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    if x[0] > limit or x[-1] < limit:
        raise ValueError(f"limit {limit} lies outside the curve's x range [{x[0]}, {x[-1]}]")
    n = int(np.searchsorted(x, limit, side="right"))  # x[:n] <= limit < x[n:]
    xs, ys = x[:n], y[:n]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < limit:
        x0, y0, x1, y1 = x[n - 1], y[n - 1], x[n], y[n]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_lim) * (limit - x0)
    return float(area / limit)


# ----------------------------------------------------------------------------------------------------------
# PRO / AU-PRO (MVTec AD)
# ----------------------------------------------------------------------------------------------------------


def _pro_curve_or_none(masks: MasksInput, maps: MapsInput) -> tuple[np.ndarray, np.ndarray] | None:
    masks_l, maps_l = _checked_masks_and_maps(masks, maps)
    if not maps_l:
        return None
    dtype = maps_l[0].dtype
    neg_parts, pos_parts, weight_parts = [], [], []
    num_regions = 0
    for mask, amap in zip(masks_l, maps_l, strict=True):
        neg_parts.append(amap[~mask])
        if mask.any():
            regions, n = ndimage.label(mask, structure=_EIGHT_CONNECTIVITY)
            sizes = np.bincount(regions.ravel())
            pos_parts.append(amap[mask])
            weight_parts.append(1.0 / sizes[regions[mask]])
            num_regions += n
    neg = _concat(neg_parts, dtype)
    if num_regions == 0 or neg.size == 0:
        return None
    return _sweep(neg, _concat(pos_parts, dtype), np.concatenate(weight_parts), num_regions)


def pro_curve(masks: MasksInput, maps: MapsInput) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve (fpr, pro) over all distinct scores, fpr ascending from 0 (MVTec AD definition).

    Ground-truth regions are the 8-connected components of each mask; PRO is the mean over all regions of
    all images of the covered fraction of each region; FPR is over all good pixels of the test set.
    Raises ValueError when there is no region or no good pixel.
    """
    curve = _pro_curve_or_none(masks, maps)
    if curve is None:
        raise ValueError("PRO needs at least one ground-truth region and one good (mask == 0) pixel")
    return curve


def au_pro(masks: MasksInput, maps: MapsInput, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit``; ``None`` without regions or good pixels."""
    limit = _check_limit(fpr_limit)
    curve = _pro_curve_or_none(masks, maps)
    if curve is None:
        return None
    return trapezoid_area_to_limit(curve[0], curve[1], limit)


# ----------------------------------------------------------------------------------------------------------
# sPRO / AUC-sPRO (MVTec LOCO, AutoVI)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaturationSpec:
    """Saturation of a ground-truth channel: a fraction of its area (relative) or a pixel count."""

    threshold: float
    relative: bool

    def __post_init__(self) -> None:
        if not np.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"saturation threshold must be finite and >= 0, got {self.threshold}")

    def saturation_area(self, region_size: int) -> float:
        """s_c: ``int(threshold * size)`` if relative, else ``min(threshold, size)``."""
        if self.relative:
            return float(int(self.threshold * region_size))
        return float(min(self.threshold, region_size))


def _spro_curve_or_none(
    maps: MapsInput,
    channel_masks: Sequence[Sequence[ArrayLike] | None],
    saturations: Sequence[Sequence[SaturationSpec] | None],
) -> tuple[np.ndarray, np.ndarray] | None:
    maps_l = _checked_maps(maps)
    if len(channel_masks) != len(maps_l) or len(saturations) != len(maps_l):
        raise ValueError(
            f"got {len(maps_l)} maps, {len(channel_masks)} channel mask lists and "
            f"{len(saturations)} saturation lists"
        )
    if not maps_l:
        return None
    dtype = maps_l[0].dtype
    neg_parts, pos_parts, weight_parts = [], [], []
    num_channels = 0
    for i, (amap, chans, sats) in enumerate(zip(maps_l, channel_masks, saturations, strict=True)):
        chans = [] if chans is None else list(chans)
        sats = [] if sats is None else list(sats)
        if len(chans) != len(sats):
            raise ValueError(f"image {i}: {len(chans)} channel masks but {len(sats)} saturation specs")
        union = np.zeros(amap.shape, dtype=bool)
        for j, (g, spec) in enumerate(zip(chans, sats, strict=True)):
            g = _bool_mask(g, amap.shape, f"channel_masks[{i}][{j}]", f"maps[{i}]")
            union |= g
            size = int(g.sum())
            if size == 0:
                continue  # an empty channel has nothing to find: left out of the mean
            sat = spec.saturation_area(size)
            if sat <= 0:
                sat = 1.0  # fully saturated as soon as one of its pixels is detected
            # sPRO_c = min(count, s) / s = sum over the `count` highest-scoring pixels of their increments.
            scores = np.sort(amap[g])[::-1]
            ranks = np.arange(1, size + 1, dtype=np.float64)
            inc = (np.minimum(ranks, sat) - np.minimum(ranks - 1.0, sat)) / sat
            nonzero = inc > 0
            pos_parts.append(scores[nonzero])
            weight_parts.append(inc[nonzero])
            num_channels += 1
        neg_parts.append(amap[~union])
    neg = _concat(neg_parts, dtype)
    if num_channels == 0 or neg.size == 0:
        return None
    return _sweep(neg, _concat(pos_parts, dtype), np.concatenate(weight_parts), num_channels)


def spro_curve(
    maps: MapsInput,
    channel_masks: Sequence[Sequence[ArrayLike] | None],
    saturations: Sequence[Sequence[SaturationSpec] | None],
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (fpr, mean sPRO) curve over all distinct scores, fpr ascending from 0 (AutoVI / MVTec LOCO).

    ``channel_masks[i]`` holds image i's ground-truth channels (``[]`` for a good image) and
    ``saturations[i]`` their SaturationSpec. sPRO_c = min(|P & G_c| / s_c, 1), averaged without weights over
    the channels of all images; FPR counts pixels outside the union of an image's channels. A channel with
    s_c == 0 counts as saturated once any of its pixels is detected; an empty channel is left out.
    Raises ValueError when there is no non-empty channel or no negative pixel.
    """
    curve = _spro_curve_or_none(maps, channel_masks, saturations)
    if curve is None:
        raise ValueError("sPRO needs at least one non-empty ground-truth channel and one negative pixel")
    return curve


def au_spro(
    maps: MapsInput,
    channel_masks: Sequence[Sequence[ArrayLike] | None],
    saturations: Sequence[Sequence[SaturationSpec] | None],
    fpr_limits: Sequence[float] = DEFAULT_SPRO_FPR_LIMITS,
) -> dict[float, float] | None:
    """AUC-sPRO at each FPR limit, normalised by the limit; ``None`` without ground truth."""
    limits = [_check_limit(limit) for limit in fpr_limits]
    curve = _spro_curve_or_none(maps, channel_masks, saturations)
    if curve is None:
        return None
    return {limit: trapezoid_area_to_limit(curve[0], curve[1], limit) for limit in limits}


# ----------------------------------------------------------------------------------------------------------
# All metrics
# ----------------------------------------------------------------------------------------------------------


def compute_metrics(
    labels: ArrayLike,
    image_scores: ArrayLike,
    maps: MapsInput | None = None,
    masks: MasksInput | None = None,
    *,
    spro_channel_masks: Sequence[Sequence[ArrayLike] | None] | None = None,
    spro_saturations: Sequence[Sequence[SaturationSpec] | None] | None = None,
    pro_fpr_limit: float = 0.3,
    spro_fpr_limits: Sequence[float] = DEFAULT_SPRO_FPR_LIMITS,
) -> dict[str, float | None]:
    """All metrics of a test set; a metric whose ground truth (or anomaly maps) is absent is ``None``.

    Keys: image_auroc, image_f1_max, pixel_auroc, pixel_auroc_anomalous, au_pro, and ``au_spro@{limit:g}``
    for each limit when sPRO channel masks and saturations are given.
    """
    y, _ = _labels_and_scores(labels, image_scores)
    results: dict[str, float | None] = {
        "image_auroc": image_auroc(labels, image_scores),
        "image_f1_max": f1_max(labels, image_scores),
        "pixel_auroc": None,
        "pixel_auroc_anomalous": None,
        "au_pro": None,
    }
    if maps is not None and len(maps) != y.shape[0]:
        raise ValueError(f"got {len(maps)} maps but {y.shape[0]} labels")
    if maps is not None and masks is not None:
        masks_l, maps_l = _checked_masks_and_maps(masks, maps)
        results["pixel_auroc"] = pixel_auroc(masks_l, maps_l)
        results["pixel_auroc_anomalous"] = pixel_auroc(masks_l, maps_l, labels=y, anomalous_only=True)
        results["au_pro"] = au_pro(masks_l, maps_l, fpr_limit=pro_fpr_limit)
    if spro_channel_masks is not None and spro_saturations is not None:
        limits = [_check_limit(limit) for limit in spro_fpr_limits]
        spro = None
        if maps is not None:
            spro = au_spro(maps, spro_channel_masks, spro_saturations, fpr_limits=limits)
        for limit in limits:
            results[f"au_spro@{limit:g}"] = None if spro is None else spro[limit]
    return results

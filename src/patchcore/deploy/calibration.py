"""Decision thresholds from defect-free images only (no labelled defects, no test set).

Method (distribution-free, order statistics). Score n held-out good images, sort the image scores
s_(1) <= ... <= s_(n). For a target false-alarm rate a, the image threshold is the order statistic
s_(k) with k = ceil((n + 1)(1 - a)) (the split-conformal choice): for a new good image from the same
distribution, P(score > s_(k)) <= a, whatever the score distribution. The false-alarm rate actually
obtained at that threshold, 1 - F(s_(k)), is Beta(n + 1 - k, k) distributed (F(s_(k)) is the k-th
uniform order statistic); its central 95 % interval is reported (the Clopper-Pearson form), and so is a
95 % distribution-free interval for the true (1 - a)-quantile of good scores, between two order
statistics chosen from the Binomial(n, 1 - a) law (None where n is too small to bound it).

With fewer than 1/a - 1 good images no order statistic reaches the rate: the threshold is then the
largest good score and the report says the rate cannot be certified (its interval shows what is known).

The pixel threshold for masks applies the same rule to each good image's largest map value, so a good
image gets an empty mask with probability at least 1 - a.

After an update (``PatchCore.partial_fit``) the bank holds more rows than the calibration saw. A bank that
only grew can only lower every good image's score (each patch's nearest distances can only shrink; with the
paper's reweighting off), so the old threshold's false-alarm bound still holds for good images, while
defects may score lower too. :func:`refresh_calibration` re-scores the named good images when they are all
still there (same SHA-256) and recomputes the threshold and its interval; otherwise the record stays and
:func:`describe_calibration` says plainly that it predates the update. Rows taken out of the bank
(rollback, a removed update) that the calibration was computed with void the bound: the record says so. Scores are normalised so that the image
threshold maps to 0.5, the lowest good score to 0 (clipped to [0, 1]); maps likewise with the pixel
threshold at 0.5 of the colour scale.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from scipy import stats

from ..engine.records import Calibration, ImageRef, file_sha256

__all__ = [
    "CALIBRATION_METHOD",
    "CalibrationError",
    "calibrate",
    "calibration_from_scores",
    "describe_calibration",
    "image_refs",
    "refresh_calibration",
    "normalize_score",
    "outlier_fence",
    "outlier_report",
    "unit_map_range",
]

CALIBRATION_METHOD = (
    "split-conformal order statistic k=ceil((n+1)(1-a)) of good-image scores; false-alarm-rate interval "
    "Beta(n+1-k, k) (Clopper-Pearson form, 95%); threshold interval by binomial order statistics (95%)"
)
_CONFIDENCE = 0.95

log = logging.getLogger("patchcore")


class CalibrationError(ValueError):
    """Calibration cannot be computed from what was given (no images, a rate outside (0, 1))."""


def _order_index(n: int, rate: float) -> int:
    """1-based index of the conformal order statistic (clipped to n)."""
    return min(n, max(1, math.ceil((n + 1) * (1.0 - rate) - 1e-12)))


def _quantile_interval(sorted_values: np.ndarray, q: float) -> tuple[float, float] | None:
    """95 % distribution-free interval for the q-quantile: [x_(l), x_(u)] with
    P(l <= B < u) >= 0.95, B ~ Binomial(n, q). None when n is too small for such a pair."""
    n = len(sorted_values)
    alpha = 1.0 - _CONFIDENCE
    lower = int(stats.binom.ppf(alpha / 2, n, q))  # P(B < lower) <= alpha/2 -> x_(lower) below quantile
    upper = int(stats.binom.ppf(1 - alpha / 2, n, q)) + 1
    if lower < 1 or upper > n:
        return None
    return float(sorted_values[lower - 1]), float(sorted_values[upper - 1])


def calibration_from_scores(
    image_scores: Sequence[float] | np.ndarray,
    map_maxima: Sequence[float] | np.ndarray,
    map_minima: Sequence[float] | np.ndarray,
    false_alarm_rate: float = 0.01,
    source: str = "",
    images: Sequence[ImageRef] = (),
    model_version: int = 0,
) -> Calibration:
    """The calibration record stored with a model (``images``: the good images scored, in order;
    ``model_version``: the version of the model that scored them)."""
    if not 0.0 < false_alarm_rate < 1.0:
        raise CalibrationError(f"the false-alarm rate must be in (0, 1), got {false_alarm_rate}")
    scores = np.sort(np.asarray(image_scores, dtype=np.float64))
    maxima = np.sort(np.asarray(map_maxima, dtype=np.float64))
    n = len(scores)
    if n == 0 or len(maxima) != n or len(map_minima) != n:
        raise CalibrationError("calibration needs at least one good image (with its map)")
    if not (np.isfinite(scores).all() and np.isfinite(maxima).all()):
        raise CalibrationError("calibration scores are not finite")
    k = _order_index(n, false_alarm_rate)
    threshold = float(scores[k - 1])
    pixel_threshold = float(maxima[k - 1])
    # Achieved false-alarm rate at s_(k): Beta(n + 1 - k, k).
    alpha = 1.0 - _CONFIDENCE
    rate_ci = (
        float(stats.beta.ppf(alpha / 2, n + 1 - k, k)),
        float(stats.beta.ppf(1 - alpha / 2, n + 1 - k, k)),
    )
    certified = (n + 1) * (1.0 - false_alarm_rate) <= n
    score_low = float(scores[0])
    map_low = float(np.min(map_minima))
    if images and len(images) != n:
        raise CalibrationError(f"{len(images)} image references for {n} scores")
    return Calibration(
        method=CALIBRATION_METHOD,
        source=source,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        n_images=int(n),
        false_alarm_rate=float(false_alarm_rate),
        certified=bool(certified),  # False: too few images to reach the rate (threshold = max score)
        order_statistic=int(k),
        image_threshold=threshold,
        image_threshold_ci95=_quantile_interval(scores, 1.0 - false_alarm_rate),
        false_alarm_rate_expected=float((n + 1 - k) / (n + 1)),
        false_alarm_rate_ci95=rate_ci,
        pixel_threshold=pixel_threshold,
        score_low=score_low,
        map_low=map_low,
        good_score_max=float(scores[-1]),
        good_score_median=float(np.median(scores)),
        images=tuple(images),
        model_version=int(model_version),
    )


def image_refs(images: Sequence[Any]) -> list[ImageRef]:
    """(path, SHA-256) of each image: of the file for a path, of the decoded RGB pixels (and size) for an
    in-memory PIL image (its path then empty)."""
    refs = []
    for item in images:
        if isinstance(item, PIL.Image.Image):
            rgb = item.convert("RGB")
            digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
            refs.append(ImageRef("", digest))
        else:
            refs.append(ImageRef(str(item), file_sha256(os.fspath(item))))
    return refs


# Outliers among the "good" images (issue 24 row 4). The goods' location and spread come from the
# shortest interval holding half of the scores (the "shorth": its midpoint, and its width / 1.349, which is
# a normal law's standard deviation), an estimate that a minority of defects cannot move, and which still
# picks the goods when half the images are defects that score apart from them (defects spread out; goods
# cluster). A score above midpoint + (6 + sqrt(2 ln n)) spreads is an outlier: sqrt(2 ln n) is about where the
# largest of n normal goods falls, and 6 more spreads leave room for the long right tail of image scores
# (maxima over patches). Measured by simulation (n = 20-200): a clean Gumbel-distributed set is flagged in
# 0.3-5 % of draws, a set with 5-50 % defects shifted by 5-40 goods' spreads in 76-100 %. Below 8 images
# nothing is judged.
OUTLIER_SPREADS = 6.0
OUTLIER_MIN_IMAGES = 8


def outlier_fence(scores: Sequence[float] | np.ndarray) -> float | None:
    """The score above which a "good" image is an obvious outlier among ``scores`` (None: too few images)."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(values)
    if n < OUTLIER_MIN_IMAGES:
        return None
    half = math.ceil(n / 2)
    widths = values[half - 1 :] - values[: n - half + 1]
    start = int(np.argmin(widths))
    middle = 0.5 * (values[start] + values[start + half - 1])
    spread = float(widths[start]) / 1.349
    if spread <= 0:  # half the images score identically: judge by the scores' own resolution
        spread = float(np.finfo(np.float64).eps * max(abs(middle), 1.0))
    return float(middle + (OUTLIER_SPREADS + math.sqrt(2 * math.log(n))) * spread)


def outlier_report(scores: Sequence[float], names: Sequence[str], threshold: float) -> str | None:
    """One warning line naming the obvious outliers among the good images (None when there are none)."""
    fence = outlier_fence(scores)
    if fence is None:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64))
    outliers = [(names[i], float(scores[i])) for i in order if scores[i] > fence]
    if not outliers:
        return None
    shown = ", ".join(f"{name} ({score:.4g})" for name, score in outliers[:5])
    more = f" and {len(outliers) - 5} more" if len(outliers) > 5 else ""
    verdict = (
        f"the threshold {threshold:.4g} is among them, so defects scoring like them would pass as good"
        if threshold > fence
        else f"the threshold {threshold:.4g} stays below them"
    )
    return (
        f"{len(outliers)} of {len(scores)} 'good' images score as obvious outliers (above {fence:.4g}, from "
        f"the scores' densest half): {shown}{more}; {verdict}. Check them for defects and calibrate without them"
    )


def calibrate(
    predictor: Any,
    good_images: Sequence[Any],
    false_alarm_rate: float = 0.01,
    source: str = "",
    batch_size: int | None = None,
) -> Calibration:
    """Score good images with a :class:`~patchcore.deploy.inference.Predictor` (streamed: one number per
    image is kept, never the maps) and return the calibration record for its model (naming the images by
    path and SHA-256, and the model's version)."""
    if not 0.0 < false_alarm_rate < 1.0:
        raise CalibrationError(f"the false-alarm rate must be in (0, 1), got {false_alarm_rate}")
    if len(good_images) == 0:
        raise CalibrationError("calibration needs at least one good image")
    scores, maxima, minima = [], [], []
    for _, score, amap, size in predictor.score_batches(good_images, batch_size):
        # The pixel threshold is applied to maps at the image's native size: measure them there.
        native = predictor.transform.to_original(amap, size)
        scores.append(score)
        maxima.append(float(native.max()))
        minima.append(float(native.min()))
    version = int(getattr(predictor.model, "version_", 0) or 0)
    record = calibration_from_scores(
        scores, maxima, minima, false_alarm_rate, source, image_refs(good_images), version
    )
    names = [f"#{i}" if isinstance(item, PIL.Image.Image) else str(item) for i, item in enumerate(good_images)]
    warning = outlier_report(scores, names, record.image_threshold)
    if warning is not None:
        log.warning("%s", warning)
    return record


def refresh_calibration(predictor: Any, batch_size: int | None = None) -> tuple[Calibration | None, str]:
    """Bring the calibration of ``predictor.model`` up to the model's version: re-score its good images
    when every one is still reachable (same path, same SHA-256), and set ``model.calibration_`` to the new
    record; otherwise keep the old one. Returns (the calibration now, one line saying what was done)."""
    model = predictor.model
    calibration = None if model is None else model.calibration_
    if model is None or calibration is None:
        return calibration, "not calibrated: nothing to re-score"
    version = int(getattr(model, "version_", 0))
    if calibration.model_version == version and not calibration.invalidated:
        return calibration, f"calibration is current (model version {version})"
    refs = calibration.images
    missing = [ref for ref in refs if not ref.reachable()]
    if not refs or missing or len(refs) != calibration.n_images:
        why = (
            "its good images were not recorded (calibrated before images were named)" if not refs
            else f"{len(missing)} of its {len(refs)} good images are missing or changed (e.g. "
            f"{missing[0].path or 'an in-memory image'})" if missing
            else f"it names {len(refs)} of its {calibration.n_images} good images"
        )  # fmt: skip
        return calibration, f"threshold kept, not re-scored: {why}; {describe_calibration(calibration, model)}"
    fresh = calibrate(predictor, [ref.path for ref in refs], calibration.false_alarm_rate, calibration.source, batch_size)
    model.calibration_ = fresh
    return fresh, (
        f"re-scored {fresh.n_images} good images at model version {version}: threshold "
        f"{calibration.image_threshold:.6g} -> {fresh.image_threshold:.6g}"
    )


def normalize_score(score: float | np.ndarray, low: float, threshold: float) -> float | np.ndarray:
    """Linear normalisation: ``low`` -> 0, ``threshold`` -> 0.5, clipped to [0, 1]."""
    span = threshold - low
    if span <= 0:
        span = abs(threshold) or 1.0
    value = np.clip(0.5 * (np.asarray(score, dtype=np.float64) - low) / span, 0.0, 1.0)
    return float(value) if np.ndim(value) == 0 else value


def unit_map_range(calibration: Calibration) -> tuple[float, float]:
    """(low, high) for heatmap colours: the pixel threshold sits at the middle of the scale."""
    low = calibration.map_low
    threshold = calibration.pixel_threshold
    high = threshold + (threshold - low) if threshold > low else threshold + 1.0
    return low, high


def describe_calibration(calibration: Calibration | None, model: Any = None) -> str:
    """One line for logs, reports and the service's model list (``model``: the model it belongs to, so
    that a threshold older than the model's latest update says so)."""
    if calibration is None:
        return (
            "not calibrated: no decision threshold (run `patchcore calibrate --model M GOOD_DIR` "
            "or train with evaluation.calibration_fraction > 0)"
        )
    ci = calibration.false_alarm_rate_ci95
    note = "" if calibration.certified else " (too few images to certify this rate)"
    line = (
        f"threshold {calibration.image_threshold:.6g} at false-alarm rate {calibration.false_alarm_rate:g} "
        f"from {calibration.n_images} good images{note}; achieved rate 95% CI "
        f"[{ci[0]:.3g}, {ci[1]:.3g}]"
    )
    if calibration.invalidated:
        return f"{line}; NO LONGER HOLDS: {calibration.invalidated}"
    version = int(getattr(model, "version_", 0) or 0)
    if version > calibration.model_version:
        if getattr(model, "reweight", False):
            return (
                f"{line}; set at model version {calibration.model_version}, before the updates up to version "
                f"{version}, and with reweighting on a grown bank can raise scores: the bound is not known to "
                "hold; calibrate again"
            )
        return (
            f"{line}; set at model version {calibration.model_version}, before the updates up to version "
            f"{version}: the bank only grew since, so good images can only score lower and the false-alarm "
            "bound still holds for them (not re-scored; defects may score lower too)"
        )
    return line

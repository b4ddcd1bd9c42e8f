"""Drift figures of a served model: is the line still producing what the calibration promised?

Over the last ``window`` decisions of one model:

- the **anomalous rate**: images decided anomalous / images decided (calibrated decisions only);
- the **goods**: images decided good that the operator did not mark "confirmed defect", plus images
  decided anomalous that the operator marked "good part" (false alarms). Their score quantiles (50, 90,
  99 %) show the good-score distribution moving towards the threshold before alarms start;
- the **false-alarm rate of goods**: false alarms / goods, with its 95 % Clopper-Pearson interval;
- the **calibrated interval**: the calibration's 95 % interval for the false-alarm rate its threshold
  achieves (``false_alarm_rate_ci95``, from the held-out good images);
- the **drift alarm**: True while the goods' false-alarm rate lies above the calibrated interval with
  95 % confidence, i.e. the lower end of its own interval exceeds the upper end of the calibrated one (a
  single false alarm among a handful of goods does not raise it; a sustained excess does).

The figures use each decision as it was made (its score and the model version of that moment); rescoring
after feedback does not change them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from .audit import Decision

__all__ = ["DriftFigures", "DriftPoint", "clopper_pearson", "drift_figures"]

QUANTILES = (0.5, 0.9, 0.99)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval for a binomial rate, k successes in n trials."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


@dataclass(frozen=True)
class DriftPoint:
    time: float
    score: float
    anomalous: bool | None
    feedback: str | None
    model_version: int


@dataclass(frozen=True)
class DriftFigures:
    model: str
    window: int
    images: int  # decisions in the window
    anomalous: int
    anomalous_rate: float | None  # None: no calibrated decision in the window
    goods: int
    false_alarms: int  # decided anomalous, marked "good part"
    confirmed_defects: int
    false_alarm_rate: float | None  # false_alarms / goods
    false_alarm_rate_ci95: tuple[float, float] | None
    good_score_quantiles: dict[str, float]  # "p50", "p90", "p99" of the goods' scores
    threshold: float | None  # the current threshold
    calibrated_rate: float | None  # the calibration's target false-alarm rate
    calibrated_ci95: tuple[float, float] | None
    drift_alarm: bool
    points: tuple[DriftPoint, ...]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "points"}
        out["points"] = [p.__dict__ for p in self.points]
        return out


def drift_figures(model: str, decisions: Sequence[Decision], calibration: Any, window: int) -> DriftFigures:
    """The figures over the last ``window`` of ``decisions`` (oldest first) of ``model``; ``calibration``:
    the model's calibration record (its dict or a record with ``to_dict``; empty or None: uncalibrated)."""
    if hasattr(calibration, "to_dict"):
        calibration = calibration.to_dict()
    calibration = dict(calibration or {})
    if window < 1:
        raise ValueError(f"the drift window must be >= 1, got {window}")
    recent = [d for d in decisions if d.model == model][-window:]
    decided = [d for d in recent if d.anomalous is not None]
    anomalous = sum(1 for d in decided if d.anomalous)
    false_alarms = [d for d in decided if d.anomalous and d.feedback == "good"]
    passed = [d for d in decided if not d.anomalous and d.feedback != "defect"]
    goods = false_alarms + passed
    confirmed_defects = sum(1 for d in recent if d.feedback == "defect")
    rate = ci = None
    if goods:
        rate = len(false_alarms) / len(goods)
        ci = clopper_pearson(len(false_alarms), len(goods))
    calibrated_ci = calibration.get("false_alarm_rate_ci95")
    calibrated = tuple(float(v) for v in calibrated_ci) if calibrated_ci else None
    alarm = bool(ci is not None and calibrated is not None and ci[0] > calibrated[1])
    quantiles: dict[str, float] = {}
    if goods:
        scores = np.asarray([d.score for d in goods], dtype=np.float64)
        quantiles = {f"p{round(q * 100)}": float(np.quantile(scores, q)) for q in QUANTILES}
    threshold = calibration.get("image_threshold")
    target = calibration.get("false_alarm_rate")
    return DriftFigures(
        model=model,
        window=window,
        images=len(recent),
        anomalous=anomalous,
        anomalous_rate=anomalous / len(decided) if decided else None,
        goods=len(goods),
        false_alarms=len(false_alarms),
        confirmed_defects=confirmed_defects,
        false_alarm_rate=rate,
        false_alarm_rate_ci95=ci,
        good_score_quantiles=quantiles,
        threshold=None if threshold is None else float(threshold),
        calibrated_rate=None if target is None else float(target),
        calibrated_ci95=calibrated,  # type: ignore[arg-type]
        drift_alarm=alarm,
        points=tuple(DriftPoint(d.time, d.score, d.anomalous, d.feedback, d.model_version) for d in recent),
    )

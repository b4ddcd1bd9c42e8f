"""What an evaluated object gives the reports: its result record, the metric columns and their legend, and
the mean over objects. Shared by ``reports`` (CSV, Markdown, JSON) and ``html_report`` (the page): both
import it, neither imports the other's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "METRIC_LEGEND",
    "METRIC_ORDER",
    "ObjectResult",
    "legend_applies",
    "mean_metrics",
    "metric_columns",
]

# Preferred column order; any other metric keys follow in sorted order.
METRIC_ORDER = (
    "image_auroc",
    "image_auroc_class_mean",
    "image_f1_max",
    "pixel_auroc",
    "pixel_auroc_anomalous",
    "au_pro",
    "au_spro@0.01",
    "au_spro@0.05",
    "au_spro@0.1",
    "au_spro@0.3",
    "au_spro@1",
)
# What each metric is, in the summary: two image AUROCs exist and must not be confused.
METRIC_LEGEND = {
    "image_auroc": "pooled image AUROC of the model's image score, all defect types together (MVTec AD convention)",
    "image_auroc_class_mean": "AutoVI / MVTec LOCO official image AUROC: AUROC of the native map's maximum, "
    "each defect folder against the good images, averaged over the folders",
    "au_spro@L": "AUC-sPRO up to FPR L (0.01 ... 1), as the official AutoVI (all test images, one curve) or MVTec LOCO "
    "(mean of the per-type curves) script computes it from the saved native-size maps",
    "au_pro": "AU-PRO up to FPR 0.3 at model resolution (MVTec AD definition)",
    "au_pro@0.05": "MVTec AD 2: AU-PRO up to FPR 0.05 over all test_public images, from the float16 native-size maps",
    "image_auroc_map_max": "MVTec AD 2: image AUROC of the native map's maximum (the public evaluation script)",
    "seg_f1": "MVTec AD 2: pixel F1 over all test_public pixels, maps binarised above mean + 3 std of the "
    "validation goods' pixel scores",
    "sample_auroc": "Real-IAD: AUROC over samples (5 camera views; defective if any view is, score = highest view score)",
}


@dataclass
class ObjectResult:
    name: str
    metrics: dict[str, float | None]
    stats: dict[str, Any] = field(default_factory=dict)
    model_path: str | None = None


def legend_applies(metric_keys: list[str], legend_key: str) -> bool:
    """Whether a METRIC_LEGEND entry describes one of the columns (``au_spro@L`` stands for every limit)."""
    if legend_key.endswith("@L"):
        return any(k.startswith(legend_key[:-1]) for k in metric_keys)
    return legend_key in metric_keys


def metric_columns(results: list[ObjectResult]) -> list[str]:
    keys = {k for r in results for k in r.metrics}
    return [k for k in METRIC_ORDER if k in keys] + sorted(keys - set(METRIC_ORDER))


def mean_metrics(results: list[ObjectResult]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in metric_columns(results):
        values = [r.metrics.get(key) for r in results]
        values = [v for v in values if v is not None and not math.isnan(v)]
        out[key] = sum(values) / len(values) if values else None
    return out

"""Real-IAD's sample-level figures: a sample is its five camera views; it is defective if any view is, and
its score is the highest of its views' image scores (the data set's headline protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from ..data import Sample
from .metrics import f1_max, image_auroc

__all__ = ["sample_groups", "sample_level_metrics"]


def sample_groups(
    samples: Sequence[Sample], labels: np.ndarray, scores: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sample ids, sample labels = any view defective, sample scores = max over views), ids in first-seen
    order; a sample id is the folder of its views (``NG/AK/S0002``)."""
    order: dict[str, int] = {}
    group = np.empty(len(samples), dtype=np.int64)
    for i, sample in enumerate(samples):
        key = str(PurePosixPath(sample.name).parent)
        group[i] = order.setdefault(key, len(order))
    n = len(order)
    sample_labels = np.zeros(n, dtype=np.int64)
    np.maximum.at(sample_labels, group, np.asarray(labels, dtype=np.int64))
    sample_scores = np.full(n, -np.inf, dtype=np.float64)
    np.maximum.at(sample_scores, group, np.asarray(scores, dtype=np.float64))
    return list(order), sample_labels, sample_scores


def sample_level_metrics(
    samples: Sequence[Sample], labels: np.ndarray, scores: np.ndarray
) -> tuple[dict[str, float | None], dict[str, int]]:
    """``sample_auroc`` and ``sample_f1_max`` over samples; stats: how many samples and defective ones."""
    ids, sample_labels, sample_scores = sample_groups(samples, labels, scores)
    metrics = {
        "sample_auroc": image_auroc(sample_labels, sample_scores),
        "sample_f1_max": f1_max(sample_labels, sample_scores),
    }
    return metrics, {"n_samples": len(ids), "n_defective_samples": int(sample_labels.sum())}

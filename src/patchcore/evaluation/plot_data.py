"""What the HTML report draws for one object, written beside the run's other outputs as a small ``.npz``.

Kept apart from the report so that ``patchcore train`` and ``patchcore evaluate`` write it while the maps
are in memory, and the report can be rebuilt from the run folder alone. No pickles: arrays and strings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import ObjectData, load_image, load_mask
from ..data.base import check_mask_size
from ..engine.model import PatchCore
from ..fileio import atomic_write
from ..heatmaps import normalize_maps
from .spro import NativeSproAccumulator

__all__ = ["GALLERY_SIZE", "THUMBNAIL_SIDE", "read_plot_data", "write_plot_data"]

GALLERY_SIZE = 4  # most and least anomalous test images shown per object
THUMBNAIL_SIDE = 192  # longest side of a gallery picture, pixels
_CURVE_POINTS = 400


def _resampled(curve: tuple[np.ndarray, np.ndarray], limit: float) -> np.ndarray:
    """(2, n) points of a (FPR, y) curve from 0 to ``limit``: enough to draw, small to store."""
    fpr, y = (np.asarray(v, dtype=np.float64) for v in curve)
    grid = np.linspace(0.0, limit, _CURVE_POINTS)
    # The curves can hold several y at one FPR (a vertical step); interp takes the last, the step's top.
    return np.stack([grid, np.interp(grid, fpr, y)])


def _thumbnail_size(size_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = size_hw
    scale = min(1.0, THUMBNAIL_SIDE / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))  # PIL (width, height)


def write_plot_data(
    path: Path,
    *,
    obj: ObjectData,
    model: PatchCore,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float | None,
    maps: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    map_range: tuple[float, float],
    pro: tuple[np.ndarray, np.ndarray] | None,
    pro_limit: float,
    accumulator: NativeSproAccumulator | None,
    spro_limits: tuple[float, ...],
    per_class: dict[str, Any] | None = None,
) -> Path:
    """Scores, curves and the gallery (maps and ground truth as thumbnails) of one evaluated object."""
    arrays: dict[str, Any] = {
        "object": np.array(obj.name),
        "labels": np.asarray(labels, dtype=np.int64),
        "scores": np.asarray(scores, dtype=np.float64),
        "threshold": np.array(np.nan if threshold is None else threshold),
        # The decision threshold calibrated on good images (absent unless the run calibrated one).
        "decision_threshold": np.array(
            np.nan if model.calibration_ is None else model.calibration_.image_threshold
        ),
        "names": np.array([s.name for s in obj.test]),
        "per_class": np.array(json.dumps(per_class or {})),
    }
    curves: list[str] = []
    if pro is not None:
        arrays["curve_0"] = _resampled(pro, pro_limit)
        curves.append("PRO (all defect images)")
    if accumulator is not None:
        limit = max(spro_limits)
        if obj.protocol.spro_per_type:
            groups: list[tuple[str, list[str] | None]] = [(t, [t]) for t in accumulator.anomaly_labels]
        else:
            groups = [("all test images", None)]
        for title, group in groups:
            curve = accumulator.curve(group)
            if curve is not None:
                arrays[f"curve_{len(curves)}"] = _resampled(curve, limit)
                curves.append(f"sPRO ({title})")
    arrays["curve_titles"] = np.array(curves, dtype=str)
    arrays["fpr_limits"] = np.array(
        spro_limits if accumulator is not None else (pro_limit,), dtype=np.float64
    )

    order = np.argsort(-np.asarray(scores), kind="stable")
    picks = list(order[:GALLERY_SIZE]) + [
        i for i in order[::-1][:GALLERY_SIZE] if i not in order[:GALLERY_SIZE]
    ]
    gallery = []
    for rank, i in enumerate(picks):
        sample = obj.test[int(i)]
        size = _thumbnail_size(sizes[i])
        unit = normalize_maps(model.transform.to_original(maps[i], sizes[i]), *map_range)
        heat = np.asarray(Image.fromarray(unit).resize(size, Image.BILINEAR), dtype=np.float32)
        truth = np.zeros(sizes[i], dtype=bool)
        for mask_path in sample.mask_paths:
            values = load_mask(mask_path)
            check_mask_size(mask_path, values.shape, sample.image_path, truth.shape)
            truth |= values != 0
        truth_small = (
            np.asarray(Image.fromarray(truth.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        )
        picture = np.asarray(load_image(sample.image_path).resize(size, Image.BILINEAR), dtype=np.uint8)
        arrays[f"gallery_{rank}_image"] = picture
        arrays[f"gallery_{rank}_map"] = heat
        arrays[f"gallery_{rank}_truth"] = truth_small
        gallery.append(int(i))
    arrays["gallery"] = np.array(gallery, dtype=np.int64)
    arrays["gallery_has_truth"] = np.array([bool(obj.test[i].mask_paths) for i in gallery])

    def write(handle) -> None:
        np.savez_compressed(handle, **arrays)

    atomic_write(path, write)
    return path


def read_plot_data(path: Path) -> dict[str, Any]:
    """The arrays :func:`write_plot_data` wrote, as a plain dict (strings as str)."""
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    out["object"] = str(out["object"])
    out["threshold"] = float(out["threshold"])
    out["decision_threshold"] = float(out.get("decision_threshold", np.nan))
    out["per_class"] = json.loads(str(out.get("per_class", "{}")))
    return out

"""The official AutoVI and MVTec LOCO evaluation definitions, written again for the tests, from reading
phcarval/autovi_evaluation_code and MVTec's mvtec_loco_ad_evaluation (2.0). Independent of the project's
implementation on purpose: it reads the saved map files and the ground-truth PNGs from disk, samples 50
thresholds and refines them by bisection as the scripts do, thresholds with a strict ``map > t``, and
integrates the piecewise-linear curve. Used only to check the project's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)
# The AutoVI script resizes every map to its object's size (PIL's default filter); other names: no resize.
AUTOVI_SHAPES = {
    **dict.fromkeys(("engine_wiring", "pipe_clip", "pipe_staple"), (400, 400)),
    **dict.fromkeys(("tank_screw", "underbody_pipes", "underbody_screw"), (1000, 750)),
}


def defects_by_value(config_path: Path) -> dict[int, dict]:
    """pixel_value -> entry; as the scripts build a dict, a repeated value keeps its last entry."""
    table = {}
    for entry in json.loads(config_path.read_text()):
        value = entry["pixel_value"]
        assert 1 <= value <= 255
        if entry["relative_saturation"]:
            assert isinstance(entry["saturation_threshold"], float)
            assert 0.0 < entry["saturation_threshold"] <= 1.0
        else:
            assert isinstance(entry["saturation_threshold"], int)
        table[value] = entry
    return table


class Truth:
    """Channels of one defective image: (bool mask, saturation area)."""

    def __init__(self, png_dir: Path, table: dict[int, dict], rgb: bool):
        self.channels = []
        for png in sorted(png_dir.glob("*.png")):
            values = np.array(Image.open(png))
            if rgb:
                values = values[:, :, 0:3]  # AutoVI: RGB(A) masks; uniqueness checked over the 3 channels
            distinct = sorted(np.unique(values))
            assert distinct[0] == 0 and len(distinct) == 2, (png, distinct)
            entry = table[int(distinct[1])]
            mask = (values[:, :, 0] if rgb else values).astype(bool)
            area = int(mask.sum())
            if entry["relative_saturation"]:
                saturation = int(entry["saturation_threshold"] * area)
            else:
                saturation = min(entry["saturation_threshold"], area)
            self.channels.append((mask, saturation))
        assert self.channels
        self.union = np.any([m for m, _ in self.channels], axis=0)


class Image_:
    def __init__(self, kind: str, scores: np.ndarray, truth: Truth | None):
        self.kind, self.scores, self.truth = kind, scores.astype(np.float64), truth
        self.sorted_negative = np.sort(scores[~truth.union] if truth else scores.ravel())
        self.sorted_channels = [np.sort(scores[m]) for m, _ in truth.channels] if truth else []


def _above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many values are strictly greater than each threshold."""
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="right")


def point_values(images: list[Image_], thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean sPRO, FPR) at each threshold over ``images``."""
    fp = sum(_above(i.sorted_negative, thresholds) for i in images)
    negatives = sum(i.sorted_negative.size for i in images)
    spros = [
        np.minimum(_above(s, thresholds) / sat, 1.0)
        for i in images
        for s, (_, sat) in zip(i.sorted_channels, i.truth.channels if i.truth else [], strict=True)
    ]
    return np.mean(spros, axis=0), fp / negatives


def initial_thresholds(images: list[Image_], count: int = 50, eps: float = 1e-6) -> list[float]:
    """max + eps, scores at equidistant ranks of all scores, min - eps; descending, duplicates dropped."""
    every = np.sort(np.concatenate([i.scores.ravel() for i in images]))
    ranks = np.linspace(0, every.size - 1, num=count, dtype=int)[1:-1]
    chosen = [every[-1] + eps, *every[ranks][::-1].tolist(), every[0] - eps]
    return list(dict.fromkeys(chosen))


def refined_thresholds(images: list[Image_], max_distance: float = 0.001) -> np.ndarray:
    """The scripts' bisection: split the intervals whose curve points lie far apart (10 rounds at most,
    20 to 100 new thresholds a round, the far intervals getting more), until every step is short."""
    queries = initial_thresholds(images)
    spro, fpr = point_values(images, np.asarray(queries))
    values = [np.array(p) for p in zip(spro, fpr, strict=True)]
    for _ in range(10):
        candidates = []
        for k in range(len(queries) - 1):
            delta = values[k] - values[k + 1]
            distance = float(np.linalg.norm(delta))
            if distance <= max_distance or 0.5 * np.prod(delta) <= 0.25 * max_distance**2:
                continue
            candidates.append((distance, queries[k], queries[k + 1]))
        if not candidates:
            break
        candidates.sort(key=lambda c: c[0], reverse=True)
        candidates = candidates[:100]
        remaining = max(20 - len(candidates), 0)
        total = sum(c[0] for c in candidates)
        new = []
        for distance, left, right in candidates:
            extra = int(np.round(distance / total * remaining))
            new.extend(np.linspace(left, right, num=3 + extra)[1:-1].tolist())
            remaining -= extra
            total -= distance
        spro, fpr = point_values(images, np.asarray(new))
        pairs = sorted(
            zip(queries + new, values + [np.array(p) for p in zip(spro, fpr, strict=True)], strict=True),
            key=lambda p: p[0],
            reverse=True,
        )
        queries = [q for q, _ in pairs]
        values = [v for _, v in pairs]
    return np.asarray(queries)


def area_up_to(fpr: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of the piecewise-linear curve from FPR 0 to ``limit`` (interpolated there) / limit."""
    assert fpr[0] == 0 and fpr[-1] == 1
    inside = fpr <= limit
    area = float(np.sum(0.5 * (y[inside][1:] + y[inside][:-1]) * np.diff(fpr[inside])))
    if limit not in fpr:
        k = int(np.searchsorted(fpr, limit))  # fpr[k-1] < limit < fpr[k]
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        area += 0.5 * (y[k - 1] + y_at) * (limit - fpr[k - 1])
    return area / limit


def read_object(maps_dir: Path, object_dir: Path, loco: bool) -> list[Image_]:
    """Every saved map of ``maps_dir/<kind>/`` with the ground truth of ``object_dir`` (None for good)."""
    table = defects_by_value(object_dir / "defects_config.json")
    shape = None if loco else AUTOVI_SHAPES.get(object_dir.name)
    images = []
    for kind_dir in sorted(p for p in maps_dir.iterdir() if p.is_dir()):
        for path in sorted(kind_dir.glob("*.tiff" if loco else "*.png")):
            picture = Image.open(path)
            if shape is not None:
                picture = picture.resize(shape)
            scores = np.array(picture)
            truth_dir = object_dir / "ground_truth" / kind_dir.name / path.stem
            truth = Truth(truth_dir, table, rgb=not loco) if truth_dir.is_dir() else None
            assert truth is not None or kind_dir.name == "good"
            images.append(Image_(kind_dir.name, scores, truth))
    return images


def official_numbers(
    maps_dir: Path, object_dir: Path, loco: bool, limits: tuple[float, ...] = LIMITS
) -> dict:
    """{"au_spro": {limit: value}, "per_type": {...}, "image_auroc": {kind: value, "mean": value}}."""
    images = read_object(maps_dir, object_dir, loco)
    thresholds = refined_thresholds(images)  # refined on the curve over all images, as both scripts do

    def aucs(subset: list[Image_]) -> dict[float, float]:
        spro, fpr = point_values(subset, thresholds)
        return {limit: area_up_to(fpr, spro, limit) for limit in limits}

    kinds = sorted({i.kind for i in images} - {"good"})
    good = [i for i in images if i.kind == "good"]
    per_type = {k: aucs([i for i in images if i.kind == k] + good) for k in kinds}
    if loco:
        overall = {limit: float(np.mean([per_type[k][limit] for k in kinds])) for limit in limits}
    else:
        overall = aucs(images)
    image_auroc = {}
    for k in kinds:
        chosen = [i for i in images if i.kind in (k, "good")]
        image_auroc[k] = roc_auc_score([i.kind == k for i in chosen], [i.scores.max() for i in chosen])
    image_auroc["mean"] = float(np.mean([image_auroc[k] for k in kinds]))
    return {"au_spro": overall, "per_type": per_type, "image_auroc": image_auroc}

"""Evaluate a fitted model on an object's test split, in three steps that :func:`evaluate_object` runs in turn:

1. :func:`score_test_split`: the model's image scores and maps (and the masks at model resolution);
2. :func:`compute_object_metrics`: the metrics the object's evaluation protocol (declared by its loader,
   ``ObjectData.protocol``) asks for, and the test-set ranges;
3. :func:`write_evaluation_files`: the files a person reads (predictions CSV, heatmaps of the most anomalous
   images, maps at native size in the official layout, the report's plot data).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DataError, ObjectData, Sample, load_image, load_mask, saturation_for
from ..data.autovi import defect_name_for
from ..data.base import check_mask_size
from ..data.loading import iterate_batches, make_loader
from ..engine.model import NonFiniteError, PatchCore
from ..engine.records import TestRanges
from ..fileio import atomic_write_text, safe_name
from ..heatmaps import (
    MAP_LEVELS,
    normalize_maps,
    quantize_unit_map,
    save_heatmap,
    save_map_png,
    save_map_tiff,
)
from .metrics import SaturationSpec, compute_metrics, pro_curve
from .plot_data import write_plot_data
from .spro import Channel, NativeSproAccumulator

__all__ = [
    "EvaluationSettings",
    "ObjectMetrics",
    "ScoredSplit",
    "compute_object_metrics",
    "evaluate_object",
    "f1_threshold",
    "score_test_split",
    "write_evaluation_files",
]

log = logging.getLogger("patchcore")


@dataclass(frozen=True)
class EvaluationSettings:
    """How to evaluate: batching, metric limits and which image files to write."""

    batch_size: int = 32
    num_workers: int = 0
    pro_fpr_limit: float = 0.3
    spro_fpr_limits: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)
    heatmaps: int = 0  # heatmaps of the N most anomalous test images
    save_autovi_maps: bool = False


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The image-score threshold with the best F1 (an evaluation figure: it needs labelled defects)."""
    if len(set(labels.tolist())) < 2:
        return None
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def _native_channels(obj: ObjectData, sample: Sample, shape: tuple[int, int]) -> list[Channel]:
    """AutoVI / LOCO: the sample's ground-truth PNGs at native size, one channel each, with saturation."""
    channels = []
    for path in sample.mask_paths:
        values = load_mask(path)
        check_mask_size(path, values.shape, sample.image_path, shape)
        present = np.unique(values[values != 0])
        if present.size == 0:
            # The official scripts stop on such a file; here it is left out of sPRO, loudly.
            log.warning("%s: ground-truth file %s of %s is all zero: left out of sPRO", obj.name, path,
                        sample.image_path)  # fmt: skip
            continue
        if present.size > 1:
            raise DataError(f"ground-truth file {path} holds several defect values {present.tolist()}")
        value = int(present[0])
        threshold, relative = saturation_for(obj.defects_config or [], value)
        spec = SaturationSpec(threshold=threshold, relative=relative)
        channels.append(Channel(values != 0, spec, defect_name_for(obj.defects_config or [], value)))
    return channels


def _native_evaluation(
    model: PatchCore,
    obj: ObjectData,
    maps: list[np.ndarray],
    sizes: list[tuple[int, int]],
    map_range: tuple[float, float],
    limits: tuple[float, ...],
) -> tuple[dict[str, float | None], dict[str, Any], NativeSproAccumulator]:
    """The official AutoVI / LOCO numbers from the maps as saved (native size, 16-bit levels)."""
    accumulator = NativeSproAccumulator()
    with_gt = obj.has_masks and obj.protocol.mask_kind == "valued"
    for sample, amap, size in zip(obj.test, maps, sizes, strict=True):
        levels = quantize_unit_map(_native_unit_map(model, amap, size, map_range))
        channels = _native_channels(obj, sample, levels.shape) if with_gt and sample.is_anomalous else []
        usable = not (with_gt and sample.is_anomalous and not channels)
        if not usable:
            log.warning("%s: defect image %s has no non-empty ground truth: left out of sPRO", obj.name,
                        sample.image_path)  # fmt: skip
        accumulator.add(sample.label, levels, channels, pixels=usable)
    metrics: dict[str, float | None] = {}
    per_class: dict[str, Any] = {}
    image_aurocs = accumulator.image_aurocs()
    known = [v for v in image_aurocs.values() if v is not None]
    metrics["image_auroc_class_mean"] = float(np.mean(known)) if known else None
    if with_gt:
        per_type = accumulator.per_type_auc_spro(limits)
        if obj.protocol.spro_per_type:
            # LOCO: one curve per anomaly type, the object's value is their mean.
            for limit in limits:
                values = [v[limit] for v in per_type.values() if v[limit] is not None]
                metrics[f"au_spro@{limit:g}"] = float(np.mean(values)) if values else None
        else:
            pooled = accumulator.auc_spro(limits)  # AutoVI: one curve over every test image
            for limit in limits:
                metrics[f"au_spro@{limit:g}"] = pooled[limit]
        for label in sorted(set(image_aurocs) | set(per_type)):
            per_class[label] = {
                "image_auroc_map_max": image_aurocs.get(label),
                "au_spro": {f"{k:g}": v for k, v in per_type.get(label, {}).items()},
            }
    else:
        per_class = {label: {"image_auroc_map_max": v} for label, v in image_aurocs.items()}
    return metrics, per_class, accumulator


def _native_unit_map(
    model: PatchCore, amap: np.ndarray, size: tuple[int, int], map_range: tuple[float, float]
) -> np.ndarray:
    """A model-resolution map at its image's native size, scaled by the test set's one range to [0, 1]."""
    return normalize_maps(model.transform.to_original(amap, size), *map_range)


@dataclass(frozen=True)
class ScoredSplit:
    """What the model gives on an object's test split, per image in the split's order."""

    labels: np.ndarray  # (N,) int64: 1 = defect
    scores: np.ndarray  # (N,) float32 image scores
    maps: list[np.ndarray]  # model-resolution anomaly maps
    sizes: list[tuple[int, int]]  # each image's native (height, width)
    # With pixel ground truth: the masks at model resolution, and which images enter the pixel metrics
    # (good images, and defect images whose mask is non-empty there).
    masks: list[np.ndarray] | None
    pixel_usable: list[bool] | None
    seconds: float

    @property
    def map_range(self) -> tuple[float, float]:
        """One normalisation for the whole test set (never per map): the reference's min-max over all maps."""
        return float(min(m.min() for m in self.maps)), float(max(m.max() for m in self.maps))


@dataclass(frozen=True)
class ObjectMetrics:
    """The metrics of one object's test split, its statistics and ranges, and the curves its report draws."""

    metrics: dict[str, float | None]
    stats: dict[str, Any]
    ranges: TestRanges
    pro: tuple[np.ndarray, np.ndarray] | None = None  # the PRO curve (protocols that draw it)
    accumulator: NativeSproAccumulator | None = None  # the native sPRO sums (native protocols)


def score_test_split(
    model: PatchCore,
    obj: ObjectData,
    settings: EvaluationSettings,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> ScoredSplit:
    """Image scores and maps of every test image (masks too, when the data set has pixel ground truth)."""
    with_masks = obj.has_masks
    loader = make_loader(obj.test, model.transform, settings.batch_size, settings.num_workers, with_masks)
    labels, scores, maps, masks = [], [], [], []
    # Only good images and defect images with a usable mask enter the pixel metrics: a defect without
    # ground truth (folder data sets annotate some only) would otherwise count as all-good pixels.
    pixel_usable: list[bool] = []
    original_sizes: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    done = 0
    with iterate_batches(loader) as batches:
        for batch in batches:
            try:
                prediction = model.predict(batch["image"])
            except NonFiniteError as exc:  # name the files, not positions in this batch
                names = [str(obj.test[int(batch["index"][p])].image_path) for p in exc.positions]
                raise NonFiniteError(exc.what, exc.positions, names) from None
            scores.append(prediction.image_scores)
            labels.extend(int(v) for v in batch["label"])
            maps.extend(prediction.anomaly_maps)
            original_sizes.extend(tuple(int(v) for v in s) for s in batch["original_size"])
            if with_masks:
                for index, mask in zip(batch["index"], batch["mask"], strict=True):
                    sample = obj.test[int(index)]
                    mask = mask.numpy().astype(bool)
                    masks.append(mask)
                    usable = not sample.is_anomalous or bool(sample.mask_paths)
                    if usable and sample.is_anomalous and not mask.any():
                        log.warning(
                            "%s: the ground truth of defect image %s is empty at model resolution (an all-zero "
                            "mask, or a region lost in the resize/crop): left out of the pixel metrics",
                            obj.name, sample.image_path,
                        )  # fmt: skip
                        usable = False
                    pixel_usable.append(usable)
            done += len(batch["image"])
            if progress is not None:
                progress("predict", done, len(obj.test))
    return ScoredSplit(
        labels=np.asarray(labels, dtype=np.int64),
        scores=np.concatenate(scores).astype(np.float32),
        maps=maps,
        sizes=original_sizes,
        masks=masks if with_masks else None,
        pixel_usable=pixel_usable if with_masks else None,
        seconds=time.perf_counter() - t0,
    )


def compute_object_metrics(
    model: PatchCore, obj: ObjectData, scored: ScoredSplit, settings: EvaluationSettings
) -> ObjectMetrics:
    """The metrics the object's protocol asks for: image metrics always; pixel AUROC / AU-PRO over the usable
    images when there are masks; the official native-size sPRO and class-mean image AUROC for native
    protocols (sPRO replaces AU-PRO there)."""
    labels, scores, maps = scored.labels, scored.scores, scored.maps
    metrics = compute_metrics(labels, scores)
    stats: dict[str, Any] = {"n_test_images": len(obj.test), "predict_seconds": round(scored.seconds, 3)}
    pro = None
    if scored.masks is not None and scored.pixel_usable is not None:
        masks = scored.masks
        keep = np.flatnonzero(scored.pixel_usable)
        pixel_metrics = compute_metrics(
            labels[keep],
            scores[keep],
            maps=[maps[i] for i in keep],
            masks=[masks[i] for i in keep],
            pro_fpr_limit=settings.pro_fpr_limit,
        )
        for key in ("pixel_auroc", "pixel_auroc_anomalous", "au_pro"):
            metrics[key] = pixel_metrics[key]
        n_defect = int(labels.sum())
        n_annotated = int(labels[keep].sum())
        stats["pixel_metric_images"] = int(keep.size)
        stats["pixel_metric_defect_images"] = n_annotated
        stats["defect_images"] = n_defect
        if n_annotated < n_defect:
            log.warning("%s: pixel metrics over the %d of %d defect images that have a usable mask",
                        obj.name, n_annotated, n_defect)  # fmt: skip
        if obj.protocol.pro_curve and metrics["au_pro"] is not None:
            pro = pro_curve([masks[i] for i in keep], [maps[i] for i in keep])

    map_min, map_max = scored.map_range
    ranges = TestRanges(
        map_min=map_min,
        map_max=map_max,
        score_min=float(scores.min()),
        score_max=float(scores.max()),
        f1_threshold=f1_threshold(labels, scores),
    )
    accumulator = None
    if obj.protocol.native_spro:
        native, per_class, accumulator = _native_evaluation(
            model, obj, maps, scored.sizes, (map_min, map_max), tuple(settings.spro_fpr_limits)
        )
        metrics.update(native)
        metrics.pop("au_pro", None)  # sPRO replaces PRO here (its regions are logical, not connected)
        stats["per_class"] = per_class
        stats["evaluation_protocol"] = obj.protocol.name
    if obj.protocol.native_pro_limit is not None:  # MVTec AD 2's public definitions (evaluation/mvtec_ad2.py)
        from .mvtec_ad2 import mvtec_ad2_metrics

        native, ad2_stats = mvtec_ad2_metrics(
            model, obj, maps, scored.sizes, settings.batch_size, settings.num_workers, obj.protocol.native_pro_limit
        )
        metrics.update(native)
        metrics.pop("au_pro", None)  # the native AU-PRO at the protocol's limit replaces the model-resolution one
        stats.update(ad2_stats)
    if obj.protocol.sample_level:  # Real-IAD: a sample = its camera views; defective if any view is
        from .real_iad import sample_level_metrics

        sample_metrics, sample_stats = sample_level_metrics(obj.test, labels, scores)
        metrics.update(sample_metrics)
        stats.update(sample_stats)
    return ObjectMetrics(metrics, stats, ranges, pro, accumulator)


def write_evaluation_files(
    model: PatchCore,
    obj: ObjectData,
    scored: ScoredSplit,
    result: ObjectMetrics,
    out_dir: Path,
    settings: EvaluationSettings,
) -> None:
    """predictions_<object>.csv, the heatmaps asked for, the native-size maps (``save_autovi_maps``, in the
    protocol's map format) and the report's plot data, under ``out_dir``."""
    scores, map_range = scored.scores, (result.ranges.map_min, result.ranges.map_max)
    if settings.save_autovi_maps and obj.protocol.native_pro_limit is not None:
        # MVTec AD 2: float16 TIFFs of test_public (the evaluation script's layout) and the benchmark server's
        # submission of the private sets, binarised at the validation threshold.
        from .mvtec_ad2 import write_submission, write_test_public_maps

        write_test_public_maps(model, obj, scored.maps, scored.sizes, out_dir / "anomaly_maps" / obj.name / "test_public")
        if obj.unlabelled:
            write_submission(
                model, obj, out_dir / "mvtec_ad2_submission", result.stats["segmentation_threshold"],
                settings.batch_size, settings.num_workers,
            )  # fmt: skip
    elif settings.save_autovi_maps:
        maps_root = out_dir / "anomaly_maps" / obj.name / "test"
        for sample, amap, size in zip(obj.test, scored.maps, scored.sizes, strict=True):
            unit = _native_unit_map(model, amap, size, map_range)
            target = maps_root / sample.label / sample.image_path.stem
            if obj.protocol.map_format == "tiff":
                levels = quantize_unit_map(unit)
                save_map_tiff(target.with_suffix(".tiff"), levels.astype(np.float32) / (MAP_LEVELS - 1))
            else:
                save_map_png(target.with_suffix(".png"), unit, sixteen_bit=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    span = (scores.max() - scores.min()) or 1.0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # quoted: names may hold commas or quotes
    writer.writerow(["name", "label", "anomalous", "image_score", "normalized_score"])
    for sample, score in zip(obj.test, scores, strict=True):
        normalized = (score - scores.min()) / span
        writer.writerow(
            [sample.name, sample.label, int(sample.is_anomalous), f"{score:.6f}", f"{normalized:.6f}"]
        )
    atomic_write_text(out_dir / f"predictions_{safe_name(obj.name)}.csv", buffer.getvalue())

    if settings.heatmaps > 0:
        order = np.argsort(-scores, kind="stable")[: settings.heatmaps]
        heat_dir = out_dir / "heatmaps" / safe_name(obj.name)
        for rank, i in enumerate(order):
            sample = obj.test[int(i)]
            unit = _native_unit_map(model, scored.maps[i], scored.sizes[i], map_range)
            name = f"{rank:03d}_{safe_name(sample.name)}.png"
            save_heatmap(heat_dir / name, load_image(sample.image_path), unit)

    write_plot_data(
        out_dir / "report_data" / f"{safe_name(obj.name)}.npz",
        obj=obj,
        model=model,
        labels=scored.labels,
        scores=scores,
        threshold=result.ranges.f1_threshold,
        maps=scored.maps,
        sizes=scored.sizes,
        map_range=map_range,
        pro=result.pro,
        pro_limit=settings.pro_fpr_limit,
        accumulator=result.accumulator,
        spro_limits=tuple(settings.spro_fpr_limits),
        per_class=result.stats.get("per_class"),
    )


def evaluate_object(
    model: PatchCore,
    obj: ObjectData,
    out_dir: Path,
    settings: EvaluationSettings,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> tuple[dict[str, float | None], dict[str, Any], TestRanges | None]:
    """Score the object's test split, compute its metrics, write predictions / heatmaps / maps / plot data.

    Returns (metrics, statistics, test-set ranges). The ranges (map and score ranges, F1-optimal image
    threshold) are figures of this evaluation, never a decision threshold (that comes from good images:
    patchcore.deploy.calibration); the model is not changed: a caller that keeps them stores them as
    ``model.evaluation_``. None: no test images.
    """
    if not obj.test:
        log.warning("%s: no test images, nothing to evaluate", obj.name)
        return {}, {"n_test_images": 0}, None
    scored = score_test_split(model, obj, settings, progress)
    result = compute_object_metrics(model, obj, scored, settings)
    write_evaluation_files(model, obj, scored, result, out_dir, settings)
    return result.metrics, result.stats, result.ranges

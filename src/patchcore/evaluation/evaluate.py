"""Evaluate a fitted model on an object's test split: scores, maps, metrics, and the files a person reads
(predictions CSV, heatmaps of the most anomalous images, maps in the official AutoVI layout)."""

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
import torch

from ..data import DataError, ObjectData, load_image, saturation_for
from ..data.loading import iterate_batches, make_loader
from ..engine.model import NonFiniteError, PatchCore
from ..fileio import atomic_write_text, safe_name
from ..heatmaps import normalize_maps, save_heatmap, save_map_png
from .metrics import SaturationSpec, compute_metrics

__all__ = ["EvaluationSettings", "evaluate_object", "f1_threshold"]

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


def _channel_specs(obj: ObjectData, channels: torch.Tensor, sample_path: Path) -> tuple[list, list]:
    """AutoVI: binary mask and saturation spec of each ground-truth channel of one image."""
    masks, specs = [], []
    for channel in channels:
        values = torch.unique(channel[channel != 0])
        if len(values) == 0:
            # A channel that vanished in the resize (a tiny defect): still one ground-truth region.
            continue
        if len(values) > 1:
            raise DataError(
                f"a ground-truth PNG of {sample_path} holds several defect values {values.tolist()}"
            )
        threshold, relative = saturation_for(obj.defects_config or [], int(values[0]))
        masks.append((channel != 0).numpy())
        specs.append(SaturationSpec(threshold=threshold, relative=relative))
    return masks, specs


def evaluate_object(
    model: PatchCore,
    obj: ObjectData,
    out_dir: Path,
    settings: EvaluationSettings,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Score the object's test split, compute its metrics, write predictions / heatmaps / maps.

    Also sets ``model.calibration_`` (test-set map range and F1-optimal image threshold).
    """
    if not obj.test:
        log.warning("%s: no test images, nothing to evaluate", obj.name)
        return {}, {"n_test_images": 0}
    transform = model.transform
    with_masks = obj.has_masks
    loader = make_loader(obj.test, transform, settings.batch_size, settings.num_workers, with_masks)
    labels, scores, maps, masks = [], [], [], []
    # Folder data sets may mix defect images with and without masks: only those with ground truth (and
    # good images) enter the pixel metrics, else an unannotated defect would count as all-good pixels.
    pixel_usable: list[bool] = []
    spro_masks: list[list[np.ndarray]] = []
    spro_specs: list[list[SaturationSpec]] = []
    original_sizes = []
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
                masks.extend(m.numpy().astype(bool) for m in batch["mask"])
                for index in batch["index"]:
                    sample = obj.test[int(index)]
                    pixel_usable.append(not sample.is_anomalous or bool(sample.mask_paths))
                if obj.mask_format == "autovi":
                    for index, channels in zip(batch["index"], batch["mask_channels"], strict=True):
                        m, s = _channel_specs(obj, channels, obj.test[int(index)].image_path)
                        spro_masks.append(m)
                        spro_specs.append(s)
            done += len(batch["image"])
            if progress is not None:
                progress("predict", done, len(obj.test))
    predict_seconds = time.perf_counter() - t0
    image_scores = np.concatenate(scores).astype(np.float32)
    label_array = np.asarray(labels, dtype=np.int64)

    pixel_maps = [m for m, ok in zip(maps, pixel_usable, strict=True) if ok] if with_masks else None
    pixel_masks = [m for m, ok in zip(masks, pixel_usable, strict=True) if ok] if with_masks else None
    metrics = compute_metrics(
        label_array,
        image_scores,
        maps=pixel_maps,
        masks=pixel_masks,
        spro_channel_masks=spro_masks if obj.mask_format == "autovi" and with_masks else None,
        spro_saturations=spro_specs if obj.mask_format == "autovi" and with_masks else None,
        pro_fpr_limit=settings.pro_fpr_limit,
        spro_fpr_limits=tuple(settings.spro_fpr_limits),
    )
    if obj.mask_format == "autovi" and with_masks:
        # sPRO replaces PRO on AutoVI (its regions are logical, not connected components).
        metrics.pop("au_pro", None)

    # One normalisation for the whole test set (never per map): the reference's min-max over all maps.
    map_min = float(min(m.min() for m in maps))
    map_max = float(max(m.max() for m in maps))
    model.calibration_ = {
        "map_min": map_min,
        "map_max": map_max,
        "score_min": float(image_scores.min()),
        "score_max": float(image_scores.max()),
    }
    threshold = f1_threshold(label_array, image_scores)
    if threshold is not None:
        model.calibration_["image_threshold"] = threshold

    out_dir.mkdir(parents=True, exist_ok=True)
    span = (image_scores.max() - image_scores.min()) or 1.0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # quoted: names may hold commas or quotes
    writer.writerow(["name", "label", "anomalous", "image_score", "normalized_score"])
    for sample, score in zip(obj.test, image_scores, strict=True):
        normalized = (score - image_scores.min()) / span
        writer.writerow([sample.name, sample.label, int(sample.is_anomalous), f"{score:.6f}", f"{normalized:.6f}"])
    atomic_write_text(out_dir / f"predictions_{safe_name(obj.name)}.csv", buffer.getvalue())

    if settings.heatmaps > 0:
        order = np.argsort(-image_scores, kind="stable")[: settings.heatmaps]
        heat_dir = out_dir / "heatmaps" / safe_name(obj.name)
        for rank, i in enumerate(order):
            sample = obj.test[int(i)]
            unit = normalize_maps(transform.to_original(maps[i], original_sizes[i]), map_min, map_max)
            name = f"{rank:03d}_{safe_name(sample.name)}.png"
            save_heatmap(heat_dir / name, load_image(sample.image_path), unit)

    if settings.save_autovi_maps:
        # Official AutoVI evaluation layout: <maps>/<object>/test/<defect or good>/NNNN.png, native size.
        maps_root = out_dir / "anomaly_maps" / obj.name / "test"
        for sample, amap, size in zip(obj.test, maps, original_sizes, strict=True):
            unit = normalize_maps(transform.to_original(amap, size), map_min, map_max)
            save_map_png(maps_root / sample.label / f"{sample.image_path.stem}.png", unit, sixteen_bit=True)

    stats = {"n_test_images": len(obj.test), "predict_seconds": round(predict_seconds, 3)}
    return metrics, stats

"""``patchcore predict``: score image files with a saved model, write JSON lines and PNG heatmaps."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from ..data import load_image
from ..data.loading import expand_images
from ..deploy.inference import Predictor
from ..fileio import atomic_write_text, safe_name
from ..heatmaps import save_heatmap, save_map_png
from .runs import OutputError, prepare_output_dir

__all__ = ["predict_images"]

log = logging.getLogger("patchcore")


def predict_images(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    device: str = "auto",
    batch_size: int | None = None,
    heatmaps: bool = True,
    weights: str | os.PathLike | None = None,
    masks: bool = False,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Score images with a saved model: one JSON-able record per image, heatmap PNGs in ``out_dir``.

    Decisions, normalised scores and masks use the model's calibration from good images; a model without
    one gets ``anomalous: null`` and a ``calibration`` field saying so. Heatmaps of an uncalibrated model
    use the evaluation's map range, or one range over all maps of this call (never a per-image range).
    A non-empty ``out_dir`` is refused unless ``overwrite`` (earlier predictions would be replaced).
    """
    if batch_size is not None and batch_size < 1:
        raise OutputError(f"batch size must be >= 1, got {batch_size}")
    out_dir = prepare_output_dir(out_dir, overwrite, "--out folder")
    paths = expand_images(inputs)
    predictor = Predictor.load(model_path, device=device, weights=weights)
    predictions = predictor.predict(paths, batch_size=batch_size)
    if not predictor.calibrated:
        log.warning("model %s is %s", model_path, predictor.describe())
    records: list[dict[str, Any]] = []
    used_names: set[str] = set()
    for path, prediction in zip(paths, predictions, strict=True):
        record: dict[str, Any] = {"image": str(path), **predictor.result_fields(prediction)}
        stem = safe_name(path.stem)
        name, n = stem, 1
        while name in used_names:
            name, n = f"{stem}_{n}", n + 1
        used_names.add(name)
        if heatmaps:
            heat = save_heatmap(out_dir / f"{name}_heatmap.png", load_image(path), prediction.unit_map)
            record["heatmap"] = str(heat)
        if masks and prediction.mask is not None:
            record["mask"] = str(
                save_map_png(out_dir / f"{name}_mask.png", prediction.mask.astype("float32"))
            )
        records.append(record)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records

"""The one prediction path: a loaded model turns images into in-memory records (score, normalised score,
decision, anomaly map). ``patchcore predict`` writes them out; nothing here touches files but the model's.

A :class:`Predictor` is safe to share between threads: ``PatchCore.predict`` keeps no per-call state on
the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..data import load_image
from ..engine.model import NonFiniteError, PatchCore
from ..heatmaps import normalize_maps

__all__ = ["ImagePrediction", "Predictor"]

log = logging.getLogger("patchcore")


@dataclass
class ImagePrediction:
    """The prediction for one image."""

    image: str  # the path, or the name given with an in-memory image
    score: float
    normalized_score: float  # score scaled by the model's reference range (0 = lowest seen)
    anomalous: bool | None  # None: the model has no decision threshold
    anomaly_map: np.ndarray  # (H, W) at the model's input resolution
    unit_map: np.ndarray  # (h, w) at the image's native resolution, scaled to [0, 1] by one fixed range
    original_size: tuple[int, int]  # (height, width) of the image as read


class Predictor:
    """Scores images with a fitted :class:`PatchCore`.

    Normalisation and decisions use the model's stored calibration (the map and score ranges and the
    image threshold recorded by an evaluation). A model without one gets, per call, one range over the
    images of that call (never a per-image range, which would make every image look equally anomalous)
    and no decision.
    """

    def __init__(self, model: PatchCore):
        model._check_fitted()
        self.model = model
        self.transform = model.transform

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "auto", weights: str | os.PathLike | None = None
    ) -> Predictor:
        return cls(PatchCore.load(path, device=device, weights=weights))

    @property
    def calibration(self) -> dict[str, float]:
        return dict(getattr(self.model, "calibration_", {}))

    @property
    def calibrated(self) -> bool:
        return "map_min" in self.calibration

    def predict(
        self,
        images: Sequence[str | os.PathLike | PIL.Image.Image],
        names: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> list[ImagePrediction]:
        """One record per image (paths or PIL images), in order."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = batch_size or self.model.batch_size
        raw: list[tuple[str, float, np.ndarray, tuple[int, int]]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pil_images = [
                item if isinstance(item, PIL.Image.Image) else load_image(Path(item)) for item in chunk
            ]
            tensors = [self.transform(im.convert("RGB")) for im in pil_images]
            shapes = {tuple(t.shape) for t in tensors}
            # Images that transform to different sizes (imagesize None) are scored one by one.
            groups = [list(range(len(tensors)))] if len(shapes) == 1 else [[i] for i in range(len(tensors))]
            for group in groups:
                try:
                    prediction = self.model.predict(torch.stack([tensors[i] for i in group]))
                except NonFiniteError as exc:
                    bad = [start + group[p] for p in exc.positions]
                    shown = [names[i] if names is not None else str(images[i]) for i in bad]
                    raise NonFiniteError(exc.what, bad, shown) from None
                for j, i in enumerate(group):
                    index = start + i
                    name = names[index] if names is not None else str(images[index])
                    size = (pil_images[i].height, pil_images[i].width)
                    raw.append((name, float(prediction.image_scores[j]), prediction.anomaly_maps[j], size))
        if not raw:
            return []
        calibration = self.calibration
        if "map_min" in calibration:
            low, high = calibration["map_min"], calibration["map_max"]
            score_low, score_high = calibration["score_min"], calibration["score_max"]
        else:
            low = min(float(m.min()) for _, _, m, _ in raw)
            high = max(float(m.max()) for _, _, m, _ in raw)
            score_low, score_high = min(r[1] for r in raw), max(r[1] for r in raw)
        threshold = calibration.get("image_threshold")
        span = (score_high - score_low) or 1.0
        records = []
        for name, score, amap, size in raw:
            records.append(
                ImagePrediction(
                    image=name,
                    score=score,
                    normalized_score=float(np.clip((score - score_low) / span, 0.0, None)),
                    anomalous=None if threshold is None else bool(score >= threshold),
                    anomaly_map=amap,
                    unit_map=normalize_maps(self.transform.to_original(amap, size), low, high),
                    original_size=size,
                )
            )
        return records


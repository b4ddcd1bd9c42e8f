"""The one prediction path: a loaded model turns images into in-memory records (score, normalised score,
decision, anomaly map, mask). ``patchcore predict``, ``patchcore serve`` and ``patchcore calibrate`` use
it; nothing here touches files but the model's own.

The scoring itself is a *backend*: the PyTorch estimator (:class:`TorchBackend`) or an exported graph run
by ONNX Runtime / OpenVINO (``patchcore.deploy.runtimes``). Everything around it (transform, calibration,
normalisation, decisions, masks) is shared, so the runtimes give the same records.

A :class:`Predictor` is safe to share between threads: ``PatchCore.predict`` keeps no per-call state on
the model (the feature extractor's per-call state is thread-local), and the runtimes' sessions are
thread-safe for inference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image
import torch

from ..data import load_image
from ..data.transforms import ImageTransform, to_rgb
from ..engine.model import NonFiniteError, PatchCore
from ..engine.records import Calibration, TestRanges
from ..heatmaps import normalize_maps
from .artifacts import model_info
from .calibration import describe_calibration, normalize_score, unit_map_range

__all__ = ["Backend", "DisplayRanges", "ImagePrediction", "Predictor", "TorchBackend", "model_info"]

log = logging.getLogger("patchcore")


@dataclass
class ImagePrediction:
    """The prediction for one image."""

    image: str  # the path, or the name given with an in-memory image
    score: float
    # Calibrated: the image threshold maps to 0.5 (lowest good score 0, clipped to [0, 1]). Not calibrated:
    # min-max over a reference range (the evaluation's test scores, or the images of the call), or None.
    normalized_score: float | None
    anomalous: bool | None  # None: the model has no calibrated decision threshold
    threshold: float | None  # the image threshold decided with (None without calibration)
    anomaly_map: np.ndarray  # (H, W) at the model's input resolution
    unit_map: np.ndarray  # (h, w) at the image's native resolution, scaled to [0, 1] by one fixed range
    original_size: tuple[int, int]  # (height, width) of the image as read
    mask: np.ndarray | None = (
        None  # (h, w) bool at native resolution: map > pixel threshold; None uncalibrated
    )

    @property
    def calibrated(self) -> bool:
        return self.threshold is not None


@dataclass(frozen=True)
class DisplayRanges:
    """The fixed ranges that turn one call's anomaly maps and uncalibrated scores into [0, 1] values (one
    range for all images of the call, never one per image)."""

    map_range: tuple[float, float] | None  # (low, high) of the maps; None: each map by its own range
    score_range: tuple[float, float] | None  # uncalibrated scores' (low, high); None: no normalised score


class Backend(Protocol):
    """What the predictor needs from a model: its transform, stored calibration and a scoring call."""

    transform: ImageTransform

    @property
    def calibration(self) -> Calibration | None:
        """The decision threshold from good images (None: no decisions)."""
        ...

    @property
    def evaluation(self) -> TestRanges | None:
        """The test-set ranges of an evaluation (None: never evaluated)."""
        ...

    def score(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, H, W) normalised images -> image scores (N,) and anomaly maps (N, H, W)."""
        ...

    def info(self) -> dict[str, Any]:
        """Metadata (backbone, input size, training statistics, metrics) for people and the service."""
        ...


class TorchBackend:
    """The PyTorch estimator itself."""

    runtime = "torch"

    def __init__(self, model: PatchCore):
        model._check_fitted()
        self.model = model
        self.transform = model.transform

    # Read from the model on every use: an update (partial_fit, rollback) or a new calibration shows at once.
    @property
    def calibration(self) -> Calibration | None:
        return self.model.calibration_

    @property
    def evaluation(self) -> TestRanges | None:
        return self.model.evaluation_

    def prepare(self) -> None:
        """Load the backbone now: weights other than the fitted ones are refused before any image is read."""
        self.model._patch_features()

    def score(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        prediction = self.model.predict(batch)
        assert prediction.anomaly_maps is not None  # predict's default return_maps=True
        return prediction.image_scores, prediction.anomaly_maps

    def info(self) -> dict[str, Any]:
        return model_info(self.model)


class Predictor:
    """Scores images with a fitted model (a :class:`PatchCore` or an exported-graph backend).

    Decisions, masks and normalised scores use the calibration stored with the model (from good images:
    ``patchcore calibrate`` or training with ``evaluation.calibration_fraction``). A model without one gets
    no decision (``anomalous`` None) and says so; its heatmaps use the evaluation's map range if recorded,
    else, per call, one range over that call's images (never a per-image range, which would make every
    image look equally anomalous) when ``per_call_range``; the service turns that off (a request's numbers
    must not depend on which other requests share its batch).
    """

    def __init__(self, model: PatchCore | Backend, per_call_range: bool = True):
        self.backend: Backend = TorchBackend(model) if isinstance(model, PatchCore) else model
        self.transform = self.backend.transform
        self.per_call_range = per_call_range

    def prepare(self) -> None:
        """Everything scoring needs, loaded now (a backbone whose weights differ from the fitted ones is
        refused here, before any image is read); runtimes load their graph when built."""
        prepare = getattr(self.backend, "prepare", None)
        if prepare is not None:
            prepare()

    @property
    def model(self) -> PatchCore | None:
        return getattr(self.backend, "model", None)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        weights: str | os.PathLike | None = None,
        runtime: str = "torch",
        per_call_range: bool = True,
        threads: int | None = None,
    ) -> Predictor:
        """A model file (``.pt``, runtime torch) or an export folder (runtime onnx / openvino; ``threads``:
        the runtime's intra-op threads, None = its default)."""
        if runtime == "torch":
            return cls(PatchCore.load(path, device=device, weights=weights), per_call_range)
        from .runtimes import load_exported

        return cls(load_exported(path, runtime, threads), per_call_range)

    @property
    def calibration(self) -> Calibration | None:
        return self.backend.calibration

    @property
    def calibrated(self) -> bool:
        return self.backend.calibration is not None

    @property
    def threshold(self) -> float | None:
        calibration = self.backend.calibration
        return None if calibration is None else calibration.image_threshold

    def describe(self) -> str:
        """How decisions are made, in one line (every output carries it)."""
        return describe_calibration(self.backend.calibration, self.model)

    def result_fields(self, prediction: ImagePrediction) -> dict[str, Any]:
        """The JSON fields every output of one prediction carries (``patchcore predict`` and the service);
        an uncalibrated model says so instead of inventing a threshold."""
        fields: dict[str, Any] = {
            "score": prediction.score,
            "normalized_score": prediction.normalized_score,
            "anomalous": prediction.anomalous,
            "threshold": prediction.threshold,
        }
        if not self.calibrated:
            fields["calibration"] = self.describe()
        return fields

    def info(self) -> dict[str, Any]:
        return {
            **self.backend.info(),
            "runtime": getattr(self.backend, "runtime", "torch"),
            "calibrated": self.calibrated,
            "threshold": self.threshold,
            "threshold_set_by": self.describe(),
            "calibration": {} if self.calibration is None else self.calibration.to_dict(),
        }

    def to_tensors(self, images: Sequence[PIL.Image.Image]) -> list[torch.Tensor]:
        return [self.transform(to_rgb(im)) for im in images]

    def score_batches(
        self,
        images: Sequence[str | os.PathLike | PIL.Image.Image],
        batch_size: int | None = None,
    ):
        """Yield (index, score, map, original size) per image, scoring ``batch_size`` images at a time."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = batch_size or getattr(self.model, "batch_size", None) or 16
        for start, (sizes, tensors) in self._decoded(images, batch_size):
            shapes = {tuple(t.shape) for t in tensors}
            # Images that transform to different sizes (imagesize None) are scored one by one.
            groups = [list(range(len(tensors)))] if len(shapes) == 1 else [[i] for i in range(len(tensors))]
            for group in groups:
                try:
                    scores, maps = self.backend.score(torch.stack([tensors[i] for i in group]))
                except NonFiniteError as exc:  # name the images, not positions in this batch
                    bad = [start + group[p] for p in exc.positions]
                    shown = [str(images[i]) if not isinstance(images[i], PIL.Image.Image) else f"#{i}" for i in bad]
                    raise NonFiniteError(exc.what, bad, shown) from None
                for j, i in enumerate(group):
                    yield start + i, float(scores[j]), np.asarray(maps[j]), sizes[i]

    def _decoded(
        self, images: Sequence[str | os.PathLike | PIL.Image.Image], batch_size: int
    ) -> Iterator[tuple[int, tuple[list[tuple[int, int]], list[torch.Tensor]]]]:
        """(start, (original sizes (height, width), tensors)) per batch. A thread decodes and transforms the
        next batch (PIL's decoder and resize release the GIL) while the caller scores this one.

        Each decoded file is dropped as soon as it is transformed: only its tensor (at the model's input size)
        and its size wait for the batch. Keeping the decoded images of the batch being scored and of the one
        being prepared held up to 2 x batch_size full-resolution images (32 camera images of 1500 x 1500 are
        216 MB), so peak memory grew with the number of images up to that many (issue 24, rows 7c / 20)."""

        def load(start: int) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
            sizes: list[tuple[int, int]] = []
            tensors: list[torch.Tensor] = []
            for item in images[start : start + batch_size]:
                image = item if isinstance(item, PIL.Image.Image) else load_image(Path(item))
                sizes.append((image.height, image.width))
                tensors.append(self.transform(to_rgb(image)))
                del image  # a file's pixels go now, not with the batch
            return sizes, tensors

        starts = list(range(0, len(images), batch_size))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-decode") as decoder:
            upcoming = decoder.submit(load, starts[0]) if starts else None
            for number, start in enumerate(starts):
                assert upcoming is not None
                batch = upcoming.result()
                upcoming = decoder.submit(load, starts[number + 1]) if number + 1 < len(starts) else None
                yield start, batch

    def fixed_ranges(self) -> DisplayRanges | None:
        """The ranges known before any image is scored (calibration, evaluation, or none at all), or None
        when this call's own images decide them (an uncalibrated, never evaluated model, ``per_call_range``)."""
        calibration, evaluation = self.backend.calibration, self.backend.evaluation
        if calibration is not None:
            return DisplayRanges(unit_map_range(calibration), None)
        if evaluation is not None:
            return DisplayRanges(
                (evaluation.map_min, evaluation.map_max), (evaluation.score_min, evaluation.score_max)
            )
        if self.per_call_range:
            return None
        return DisplayRanges(None, None)

    def call_ranges(self, scores: tuple[float, float], maps: tuple[float, float]) -> DisplayRanges:
        """The ranges of one call whose images span ``scores`` (low, high) and whose maps (at the model's
        input resolution) span ``maps``; recorded ranges (calibration, evaluation) take precedence."""
        return self.fixed_ranges() or DisplayRanges(maps, scores)

    def record(
        self, name: str, score: float, amap: np.ndarray, size: tuple[int, int], ranges: DisplayRanges
    ) -> ImagePrediction:
        """The record of one scored image (``amap`` at the model's input resolution, ``size`` the image's)."""
        calibration = self.backend.calibration
        threshold = None if calibration is None else calibration.image_threshold
        native = self.transform.to_original(amap, size)
        if ranges.map_range is None:
            # No reference range at all: the map scaled by itself, for display only.
            unit = normalize_maps(native, float(native.min()), float(native.max()))
        else:
            unit = normalize_maps(native, *ranges.map_range)
        normalized: float | None
        if calibration is not None:
            normalized = float(normalize_score(score, calibration.score_low, calibration.image_threshold))
        elif ranges.score_range is not None:
            low, high = ranges.score_range
            normalized = float(np.clip((score - low) / ((high - low) or 1.0), 0.0, None))
        else:
            normalized = None
        return ImagePrediction(
            image=name,
            score=score,
            normalized_score=normalized,
            anomalous=None if threshold is None else bool(score > threshold),
            threshold=threshold,
            anomaly_map=amap,
            unit_map=unit,
            original_size=size,
            mask=None if calibration is None else native > calibration.pixel_threshold,
        )

    def stream(
        self,
        images: Sequence[str | os.PathLike | PIL.Image.Image],
        ranges: DisplayRanges,
        names: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> Iterator[ImagePrediction]:
        """One record per image, in order, as each batch is scored (memory: one batch), with ``ranges``
        fixed beforehand (:meth:`fixed_ranges`, or :meth:`call_ranges` from an earlier pass)."""
        for i, score, amap, size in self._named_batches(images, names, batch_size):
            yield self.record(names[i] if names is not None else str(images[i]), score, amap, size, ranges)

    def _named_batches(
        self,
        images: Sequence[str | os.PathLike | PIL.Image.Image],
        names: Sequence[str] | None,
        batch_size: int | None,
    ) -> Iterator[tuple[int, float, np.ndarray, tuple[int, int]]]:
        try:
            yield from self.score_batches(images, batch_size)
        except NonFiniteError as exc:
            if names is None:
                raise
            raise NonFiniteError(exc.what, exc.positions, [names[i] for i in exc.positions]) from None

    def predict(
        self,
        images: Sequence[str | os.PathLike | PIL.Image.Image],
        names: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> list[ImagePrediction]:
        """One record per image (paths or PIL images), in order."""
        raw = [
            (names[i] if names is not None else str(images[i]), score, amap, size)
            for i, score, amap, size in self._named_batches(images, names, batch_size)
        ]
        if not raw:
            return []
        ranges = self.fixed_ranges() or self.call_ranges(
            (min(r[1] for r in raw), max(r[1] for r in raw)),
            (min(float(r[2].min()) for r in raw), max(float(r[2].max()) for r in raw)),
        )
        return [self.record(name, score, amap, size, ranges) for name, score, amap, size in raw]

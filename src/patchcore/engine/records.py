"""The typed records a fitted model carries between the wings: what the fit measured (:class:`FitStats`),
the decision threshold from good images (:class:`Calibration`), and the test-set ranges of an evaluation
(:class:`TestRanges`). Each is a frozen dataclass defined here once; a model file stores each as the plain
dict of its ``to_dict`` (the keys files and JSON sidecars have always had) and ``from_dict`` reads that
dict back, old files' dicts included.

Who writes what: ``PatchCore.fit`` sets ``stats_``; ``patchcore.deploy.calibration`` computes a
``Calibration`` (the caller stores it as ``calibration_``); ``patchcore.evaluation.evaluate`` returns a
``TestRanges`` (the caller stores it as ``evaluation_``). Change one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Calibration",
    "CoresetSpace",
    "FitStats",
    "ImageRef",
    "RecordError",
    "TestRanges",
    "UpdateRecord",
    "file_sha256",
]


class RecordError(ValueError):
    """A stored record (a dict from a model file or an export) lacks a field or holds a malformed one."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _tuple(value: Any, cast: Any = float) -> tuple[Any, ...]:
    return tuple(cast(v) for v in value)


def _optional(value: Any, cast: Any) -> Any:
    return None if value is None else cast(value)


@dataclass(frozen=True)
class FitStats:
    """What a fit measured: the bank's size and shape, the patch grid, timings, where it ran.

    ``memory_size`` is the number of bank rows the fit kept (an update adds rows: see the model's history).
    The optional fields are set by a sharded or federated fit (``None``: not such a fit) and by the
    application (``object``).
    """

    n_train_images: int
    n_patches: int
    memory_size: int
    feature_dim: int
    patch_grid: tuple[int, ...]
    input_size: tuple[int, ...]
    extract_seconds: float = 0.0
    coreset_seconds: float = 0.0
    index_seconds: float = 0.0
    feature_cache: str = "off"  # off, hit, miss or unsupported input (the application's feature cache)
    device: str = "cpu"
    # A sharded / federated fit: the merge of the local coresets.
    union_size: int | None = None
    merge_seconds: float | None = None
    shards: int | None = None
    shard_oversampling: float | None = None
    shard_seconds: float | None = None
    shard_extract_seconds: tuple[float, ...] | None = None
    shard_coreset_seconds: tuple[float, ...] | None = None
    clients: int | None = None
    client_images: tuple[int, ...] | None = None
    client_bank_sizes: tuple[int, ...] | None = None
    object: str | None = None  # the data set's object this model was fitted for
    # The training-set audit (engine/audit.py; None: a merged fit, or fewer than 2 images) and the robust fit.
    audit_threshold: float | None = None
    audit_suspects: int | None = None
    audit_seconds: float | None = None
    audit_exact_fraction: float | None = None
    audit_method: str | None = None  # exact | coreset (engine/audit.py)
    audit_max_bound: float | None = None  # coreset audit: the largest per-image bound r_i
    denoise_kept_patches: int | None = None  # the coreset's candidates (denoise on)
    denoise_outlier_patches: int | None = None
    denoise_dropped_images: tuple[int, ...] | None = None  # positions in the fit's input

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, in the order files have always had them; unset optional fields left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FitStats:
        """A record from its ``to_dict`` (a model file's ``stats``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RecordError(f"unknown fit statistics: {', '.join(unknown)}")
        try:
            kwargs = dict(values)
            for name in ("n_train_images", "n_patches", "memory_size", "feature_dim"):
                kwargs[name] = int(values[name])
            kwargs["patch_grid"] = _tuple(values["patch_grid"], int)
            kwargs["input_size"] = _tuple(values["input_size"], int)
            for name in ("shard_extract_seconds", "shard_coreset_seconds"):
                kwargs[name] = _optional(values.get(name), lambda v: _tuple(v, float))
            for name in ("client_images", "client_bank_sizes", "denoise_dropped_images"):
                kwargs[name] = _optional(values.get(name), lambda v: _tuple(v, int))
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"malformed fit statistics: {exc!r}") from exc


@dataclass(frozen=True)
class ImageRef:
    """One image a record was computed from: its path as given (empty for an in-memory image) and the
    SHA-256 of its file's bytes (of its decoded RGB pixels for an in-memory image)."""

    path: str
    sha256: str

    def reachable(self) -> bool:
        """The file is still there with the same content (so it can be scored again)."""
        if not self.path:
            return False
        path = Path(self.path)
        try:
            return path.is_file() and file_sha256(path) == self.sha256
        except OSError:
            return False


@dataclass(frozen=True)
class Calibration:
    """A decision threshold from defect-free images (``patchcore.deploy.calibration`` says how).

    ``images``: the held-out good images it was computed from; ``model_version``: the version of the
    model (its ``version_``; 0 = as fitted) whose scores it used.
    """

    method: str
    source: str
    created: str  # UTC, ISO 8601
    n_images: int
    false_alarm_rate: float
    certified: bool  # False: too few images to reach the rate (threshold = the largest good score)
    order_statistic: int
    image_threshold: float
    image_threshold_ci95: tuple[float, float] | None
    false_alarm_rate_expected: float
    false_alarm_rate_ci95: tuple[float, float]
    pixel_threshold: float
    # Normalisation: score_low -> 0, threshold -> 0.5 (maps: map_low -> 0, pixel threshold -> 0.5).
    score_low: float
    map_low: float
    good_score_max: float
    good_score_median: float
    images: tuple[ImageRef, ...] = ()
    model_version: int = 0
    # Non-empty: why the threshold no longer carries its false-alarm bound (bank rows it was computed with
    # were removed since); calibrate again.
    invalidated: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "images":
                value = [{"path": ref.path, "sha256": ref.sha256} for ref in value]
            elif isinstance(value, tuple):
                value = list(value)
            if f.name == "invalidated" and not value:
                continue  # as files had it before
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Calibration:
        """A record from its ``to_dict`` (older files: without ``images`` and ``model_version``)."""
        try:
            ci = values["image_threshold_ci95"]
            return cls(
                method=str(values["method"]),
                source=str(values["source"]),
                created=str(values["created"]),
                n_images=int(values["n_images"]),
                false_alarm_rate=float(values["false_alarm_rate"]),
                certified=bool(values["certified"]),
                order_statistic=int(values["order_statistic"]),
                image_threshold=float(values["image_threshold"]),
                image_threshold_ci95=None if ci is None else _pair(ci),
                false_alarm_rate_expected=float(values["false_alarm_rate_expected"]),
                false_alarm_rate_ci95=_pair(values["false_alarm_rate_ci95"]),
                pixel_threshold=float(values["pixel_threshold"]),
                score_low=float(values["score_low"]),
                map_low=float(values["map_low"]),
                good_score_max=float(values["good_score_max"]),
                good_score_median=float(values["good_score_median"]),
                images=tuple(ImageRef(str(i["path"]), str(i["sha256"])) for i in values.get("images", ())),
                model_version=int(values.get("model_version", 0)),
                invalidated=str(values.get("invalidated", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"malformed calibration record: {exc!r}") from exc


def _pair(value: Any) -> tuple[float, float]:
    low, high = value
    return float(low), float(high)


@dataclass(frozen=True)
class TestRanges:
    """Figures of one evaluation on a test set (never a decision threshold): the range of its anomaly
    maps and image scores (heatmap colours of an uncalibrated model), and the F1-optimal image threshold
    (None when the test set has a single class)."""

    __test__ = False  # not a pytest test class

    map_min: float
    map_max: float
    score_min: float
    score_max: float
    f1_threshold: float | None = None

    def to_dict(self) -> dict[str, float]:
        out = {"map_min": self.map_min, "map_max": self.map_max, "score_min": self.score_min,
               "score_max": self.score_max}  # fmt: skip
        if self.f1_threshold is not None:
            out["f1_threshold"] = self.f1_threshold
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TestRanges:
        try:
            return cls(
                map_min=float(values["map_min"]),
                map_max=float(values["map_max"]),
                score_min=float(values["score_min"]),
                score_max=float(values["score_max"]),
                f1_threshold=_optional(values.get("f1_threshold"), float),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"malformed test-set ranges: {exc!r}") from exc


@dataclass(frozen=True)
class UpdateRecord:
    """One :meth:`~patchcore.engine.model.PatchCore.partial_fit`: which images it learned from, what it added
    to the memory bank and on what grounds. A model's ``history_`` is a tuple of these, oldest first.

    ``radius_before`` / ``radius_after``: the largest distance of the update's patches to the bank before
    and after it, measured where the fit's coreset measured (its projection); ``target_radius``: the bank's
    covering radius recorded at fit, which the ``radius`` rule brings every new patch within (None for a
    ``fraction`` or ``count`` rule). ``max_score``: the highest image score of the update's images before
    it; ``guard_limit``: the score above which an image is refused unless forced (None: no guard).
    ``removed``: empty, or the UTC time :meth:`~patchcore.engine.model.PatchCore.remove_update` took its
    rows out of the bank (the record stays, for the audit trail).
    """

    version: int
    time: str  # UTC, ISO 8601
    n_images: int
    images: tuple[ImageRef, ...]
    rows_added: int
    radius_before: float
    radius_after: float
    target_radius: float | None
    rule: str  # radius | fraction F | count N
    max_score: float
    guard_limit: float | None
    forced: bool
    note: str = ""
    seconds: float = 0.0
    removed: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "images":
                value = [{"path": ref.path, "sha256": ref.sha256} for ref in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> UpdateRecord:
        try:
            return cls(
                version=int(values["version"]),
                time=str(values["time"]),
                n_images=int(values["n_images"]),
                images=tuple(ImageRef(str(i["path"]), str(i["sha256"])) for i in values["images"]),
                rows_added=int(values["rows_added"]),
                radius_before=float(values["radius_before"]),
                radius_after=float(values["radius_after"]),
                target_radius=_optional(values["target_radius"], float),
                rule=str(values["rule"]),
                max_score=float(values["max_score"]),
                guard_limit=_optional(values["guard_limit"], float),
                forced=bool(values["forced"]),
                note=str(values.get("note", "")),
                seconds=float(values.get("seconds", 0.0)),
                removed=str(values.get("removed", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"malformed update record: {exc!r}") from exc


@dataclass(frozen=True, eq=False)
class CoresetSpace:
    """Where the fit's greedy coreset measured distances, and how far its bank reached there: what
    :meth:`~patchcore.engine.model.PatchCore.partial_fit` needs to continue it.

    ``projection``: the (p, D) float32 matrix W of the fit's random projection (z = x W^T), None when the
    coreset ran on the features themselves. ``radius``: the covering radius, the largest distance (in
    that space, by the coreset's float32 formula) of a training patch to its nearest bank row when the
    greedy loop stopped.
    """

    projection: np.ndarray | None
    radius: float

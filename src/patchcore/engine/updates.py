"""What :meth:`~patchcore.engine.model.PatchCore.partial_fit` needs around the bank itself: the rule that
says how many rows an update adds, the guard against teaching a defect, the images' digests for the
history, and the checks of a model's version bookkeeping (rows, history) when a file is loaded."""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .records import ImageRef, UpdateRecord, file_sha256

__all__ = [
    "DEFAULT_GUARD_FACTOR",
    "UpdateError",
    "UpdateRefused",
    "UpdateRule",
    "image_refs",
    "utc_now",
    "versions_problem",
]

# An update image scoring above this multiple of the highest calibration (good) score is refused unless
# forced: it looks far more like a defect than anything the threshold was set on.
DEFAULT_GUARD_FACTOR = 2.0


class UpdateError(ValueError):
    """An update, rollback or removal that cannot be done as asked (an unknown version, a model that
    recorded no covering radius for the radius rule); nothing was changed."""


class UpdateRefused(UpdateError):
    """An update was refused before anything changed: an image scores above the guard's limit (it may be a
    defect), or the model has no calibration to judge that by. ``force=True`` accepts it (recorded as forced).

    ``score``: the highest offending image score; ``limit``: the guard's limit (None: no calibration);
    ``positions``: the offending images' 0-based positions in the input; ``names``: their paths where known.
    """

    def __init__(
        self,
        message: str,
        score: float,
        limit: float | None,
        positions: Sequence[int] = (),
        names: Sequence[str] = (),
    ):
        super().__init__(message)
        self.score = float(score)
        self.limit = limit
        self.positions = list(positions)
        self.names = list(names)


@dataclass(frozen=True)
class UpdateRule:
    """How many of an update's patches join the bank: ``radius`` (farthest-first until every new patch lies
    within the covering radius recorded at fit), a ``fraction`` of the new patches, or a ``count``."""

    kind: str  # radius | fraction | count
    amount: float = 0.0

    @classmethod
    def parse(cls, until: Any) -> UpdateRule:
        """``"radius"``, a float in (0, 1] (a fraction of the new patches) or an int >= 1 (a row count)."""
        if isinstance(until, str):
            if until != "radius":
                raise ValueError(f"until must be 'radius', a fraction in (0, 1] or a count >= 1, got {until!r}")
            return cls("radius")
        if isinstance(until, bool) or not isinstance(until, (int, float, np.integer, np.floating)):
            raise ValueError(f"until must be 'radius', a fraction in (0, 1] or a count >= 1, got {until!r}")
        if isinstance(until, (int, np.integer)):
            if until < 1:
                raise ValueError(f"an update row count must be >= 1, got {until}")
            return cls("count", int(until))
        if not (math.isfinite(until) and 0.0 < until <= 1.0):
            raise ValueError(f"an update fraction must be in (0, 1], got {until}")
        return cls("fraction", float(until))

    def limit(self, n_patches: int) -> int | None:
        """The most rows the rule adds from ``n_patches`` new patches (None: as many as the radius needs)."""
        if self.kind == "count":
            return min(int(self.amount), n_patches)
        if self.kind == "fraction":
            return min(n_patches, max(1, int(n_patches * self.amount)))
        return None

    def __str__(self) -> str:
        if self.kind == "count":
            return f"count {int(self.amount)}"
        if self.kind == "fraction":
            return f"fraction {self.amount:g}"
        return "radius"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def image_refs(images: Any) -> list[ImageRef] | None:
    """(path, SHA-256) of each image of a list or tuple of paths / PIL images (a PIL image: empty path,
    the digest of its size and RGB pixels); None for other inputs (tensors, loaders), whose digests are
    taken from the image tensors as they are read."""
    if not isinstance(images, (list, tuple)):
        return None
    refs = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            refs.append(ImageRef(str(item), file_sha256(item)))
        elif hasattr(item, "convert") and hasattr(item, "tobytes"):  # a PIL image
            rgb = item.convert("RGB")
            refs.append(ImageRef("", hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()))
        else:
            return None
    return refs


def tensor_ref(image: np.ndarray) -> ImageRef:
    """An in-memory image tensor (C, H, W) named by the digest of its shape and float32 values."""
    values = np.ascontiguousarray(image, dtype=np.float32)
    return ImageRef("", hashlib.sha256(f"{values.shape}:".encode() + values.tobytes()).hexdigest())


def versions_problem(
    row_versions: np.ndarray, history: Sequence[UpdateRecord], version: int, fit_rows: int
) -> str | None:
    """What disagrees between the bank rows' versions, the history and the model's version (None: all
    agree): rows in version order, the fit's rows as the fit recorded them, each update's rows as its record
    says (none for a removed one)."""
    if row_versions.ndim != 1:
        return f"row versions have shape {row_versions.shape}"
    if len(row_versions) and np.any(np.diff(row_versions) < 0):
        return "the bank rows are not in version order"
    versions = [r.version for r in history]
    if versions != sorted(set(versions)) or any(v < 1 for v in versions):
        return f"the history's versions {versions} are not distinct, increasing and >= 1"
    if version != (versions[-1] if versions else 0):
        return f"the model version {version} is not the history's last ({versions[-1] if versions else 0})"
    counts = dict(zip(*np.unique(row_versions, return_counts=True), strict=True))
    if int(counts.pop(0, 0)) != fit_rows:
        return f"the fit kept {fit_rows} rows, the bank holds {int((row_versions == 0).sum())} of version 0"
    for record in history:
        expected = 0 if record.removed else record.rows_added
        if int(counts.pop(record.version, 0)) != expected:
            return f"update {record.version} added {expected} live rows, the bank holds another number"
    if counts:
        return f"bank rows of versions {sorted(int(v) for v in counts)} that no update recorded"
    return None

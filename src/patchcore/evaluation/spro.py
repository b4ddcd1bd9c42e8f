"""AutoVI and MVTec LOCO evaluated as their official scripts do, at each image's native resolution.

The official scripts read one map per test image at the image's native size (AutoVI: 16-bit PNG, LOCO:
float TIFF) and the ground-truth PNGs beside the images. Here the maps are the ones the project saves for
those scripts (the model's map brought back to native size by :meth:`ImageTransform.to_original`, one
min-max normalisation over the test set, 16-bit levels), so a reported number is what the script computes
from the saved maps, without its threshold sampling: one curve point per map level (65,536), i.e. the exact
curve of the saved maps.

Definitions (read from phcarval/autovi_evaluation_code and MVTec's mvtec_loco_ad_evaluation 2.0): at a
threshold, P = map above it; sPRO of a ground-truth channel c = min(|P & G_c| / s_c, 1) with s_c =
int(threshold * |G_c|) (relative) or min(threshold, |G_c|) (absolute); mean sPRO = plain mean over the
channels of the images considered; FPR = P outside the union of an image's channels over all such pixels;
AUC-sPRO@L = trapezoid area up to L (interpolated at L) / L. AutoVI: one curve over all test images. LOCO:
one curve per anomaly type (its images + all good images), reported value = mean over the types. Image
level: AUROC of the map maximum, each anomaly folder against the good folder, and their mean.

Memory is bounded: each image is added as histograms of its levels, never kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..heatmaps import MAP_LEVELS
from .metrics import SaturationSpec, image_auroc, trapezoid_area_to_limit

__all__ = ["Channel", "NativeSproAccumulator"]


@dataclass(frozen=True)
class Channel:
    """One annotated defect of a test image at native resolution."""

    mask: np.ndarray  # bool (H, W)
    saturation: SaturationSpec
    defect_name: str = ""


@dataclass
class _Group:
    negatives: np.ndarray = field(default_factory=lambda: np.zeros(MAP_LEVELS, dtype=np.int64))
    spro_sum: np.ndarray = field(default_factory=lambda: np.zeros(MAP_LEVELS, dtype=np.float64))
    n_channels: int = 0


def _at_or_above(counts: np.ndarray) -> np.ndarray:
    """n[L] = number of pixels with level >= L, from a histogram over levels."""
    return np.cumsum(counts[::-1])[::-1]


class NativeSproAccumulator:
    """Histograms of a test set's quantised native maps, per image label (``good`` or an anomaly folder)."""

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}
        self.image_labels: list[str] = []
        self.image_maxima: list[int] = []

    def add(
        self, label: str, levels: np.ndarray, channels: Sequence[Channel] = (), pixels: bool = True
    ) -> None:
        """Add one image: its map as uint16 levels (native size) and its non-empty ground-truth channels.

        ``pixels=False``: the image counts at image level only (a defect image without usable ground truth
        must not add its pixels to the negatives).
        """
        levels = np.asarray(levels)
        if levels.dtype != np.uint16 or levels.ndim != 2:
            raise ValueError(f"levels must be a 2-D uint16 array, got {levels.dtype} {levels.shape}")
        self.image_labels.append(label)
        self.image_maxima.append(int(levels.max()))
        if not pixels:
            return
        group = self._groups.setdefault(label, _Group())
        union = np.zeros(levels.shape, dtype=bool)
        for channel in channels:
            if channel.mask.shape != levels.shape:
                raise ValueError(
                    f"channel mask shape {channel.mask.shape} differs from map shape {levels.shape}"
                )
            size = int(channel.mask.sum())
            if size == 0:
                raise ValueError("an empty ground-truth channel has no sPRO: leave it out (with a warning)")
            union |= channel.mask
            saturation = channel.saturation.saturation_area(size)
            if saturation <= 0:
                saturation = 1.0  # s_c = 0 (a relative threshold of a tiny region): saturated by one pixel
            hits = _at_or_above(np.bincount(levels[channel.mask], minlength=MAP_LEVELS))
            group.spro_sum += np.minimum(hits / saturation, 1.0)
            group.n_channels += 1
        group.negatives += np.bincount(levels[~union], minlength=MAP_LEVELS)

    @property
    def anomaly_labels(self) -> list[str]:
        """Labels other than ``good`` that have at least one annotated channel, in name order."""
        return sorted(k for k, g in self._groups.items() if k != "good" and g.n_channels > 0)

    def curve(self, labels: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(FPR, mean sPRO) from (0, 0) to (1, 1) over the images of ``labels`` plus all good images
        (None: every image); None when there is no channel or no negative pixel."""
        chosen = list(self._groups) if labels is None else sorted(set(labels) | {"good"})
        negatives = np.zeros(MAP_LEVELS, dtype=np.int64)
        spro_sum = np.zeros(MAP_LEVELS, dtype=np.float64)
        n_channels = 0
        for key in chosen:
            group = self._groups.get(key)
            if group is not None:
                negatives += group.negatives
                spro_sum += group.spro_sum
                n_channels += group.n_channels
        total = int(negatives.sum())
        if n_channels == 0 or total == 0:
            return None
        # Threshold between levels L-1 and L: positive = level >= L, from the top level down to L = 0.
        fpr = np.concatenate(([0.0], (_at_or_above(negatives) / total)[::-1]))
        spro = np.concatenate(([0.0], (spro_sum / n_channels)[::-1]))
        keep = np.ones(fpr.size, dtype=bool)
        keep[1:] = (np.diff(fpr) != 0) | (np.diff(spro) != 0)
        return fpr[keep], spro[keep]

    def auc_spro(
        self, limits: Sequence[float], labels: Iterable[str] | None = None
    ) -> dict[float, float | None]:
        """AUC-sPRO at each FPR limit (normalised by the limit) of :meth:`curve`."""
        curve = self.curve(labels)
        return {
            float(limit): None if curve is None else trapezoid_area_to_limit(curve[0], curve[1], limit)
            for limit in limits
        }

    def per_type_auc_spro(self, limits: Sequence[float]) -> dict[str, dict[float, float | None]]:
        """AUC-sPRO of each anomaly label against all good images (LOCO's per-type curves)."""
        return {label: self.auc_spro(limits, [label]) for label in self.anomaly_labels}

    def image_aurocs(self) -> dict[str, float | None]:
        """AUROC of the map maximum, each label other than good against the good images."""
        labels = np.asarray(self.image_labels)
        maxima = np.asarray(self.image_maxima, dtype=np.float64)
        out: dict[str, float | None] = {}
        for label in sorted(set(self.image_labels) - {"good"}):
            keep = (labels == label) | (labels == "good")
            out[label] = image_auroc((labels[keep] == label).astype(int), maxima[keep])
        return out

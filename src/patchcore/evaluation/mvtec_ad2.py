"""MVTec AD 2's evaluation, as MVTec's public code defines it, and the files its benchmark server takes.

What the public code fixes (read from ``MVTecAD2_public_code_utils`` and MVTec's AU-PRO evaluation script):

- Anomaly maps are single-channel **float16 TIFFs at the image's native size**; the upload checker refuses
  any other type. Every figure here is computed from the maps as written (float16), so a local number is the
  one the same files give anywhere.
- **AU-PRO** (here up to FPR 0.05, the benchmark's limit): one PRO curve over all ``test_public`` images
  (good images count as all-normal ground truth), regions = 8-connected components of each mask, a
  threshold at every distinct map value, the curve from (0, 0) to (1, 1), trapezoids to the limit with the
  value at the limit interpolated, divided by the limit. With float16 maps there are at most 65,536 distinct
  values, so the curve is accumulated exactly in one histogram per image (memory does not grow with the
  number or size of the images).
- **Image AUROC** of the map's maximum (the script's ``scoring_function=np.max``; ties merged).
- **Segmentation F1** of the binarised maps: the threshold comes from good images only, the validation set,
  as the checker's suggestion computes it: mean + 3 standard deviations of the validation maps' pixel
  scores; a pixel is anomalous when its score is above it. F1 = 2 TP / (2 TP + FP + FN) over all pixels of
  all ``test_public`` images together.
- Submission: ``anomaly_images/<object>/<test_private | test_private_mixed>/<stem>.tiff`` (float16) and
  ``anomaly_images_thresholded/<object>/<set>/<stem>.png`` (8-bit, 0 / 255), nothing else in the folder.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data import ObjectData, Sample, load_mask
from ..data.base import check_mask_size
from ..data.loading import iterate_batches, make_loader
from ..engine.model import PatchCore
from ..fileio import atomic_write

__all__ = [
    "MVTEC_AD2_PRO_LIMIT",
    "NativeProAccumulator",
    "SegF1Counts",
    "ValidationStats",
    "float16_tiff_bytes",
    "mvtec_ad2_metrics",
    "native_maps",
    "save_float16_tiff",
    "write_submission",
    "write_test_public_maps",
]

MVTEC_AD2_PRO_LIMIT = 0.05
SUBMISSION_FOLDERS = ("anomaly_images", "anomaly_images_thresholded")


# ----------------------------------------------------------------------------------------------------------
# float16 TIFF (what the upload checker reads with tifffile: 2-D, dtype float16)
# ----------------------------------------------------------------------------------------------------------


def float16_tiff_bytes(values: np.ndarray) -> bytes:
    """A baseline little-endian TIFF of one float16 channel, uncompressed, one strip."""
    data = np.ascontiguousarray(values, dtype="<f2")
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"a map must be a non-empty (H, W) array, got shape {data.shape}")
    height, width = data.shape
    pixels = data.tobytes()
    entries = [  # (tag, type, count, value); type 3 = SHORT, 4 = LONG; tags ascending
        (256, 4, 1, width),  # ImageWidth
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 16),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (273, 4, 1, 0),  # StripOffsets (filled below)
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, len(pixels)),  # StripByteCounts
        (284, 3, 1, 1),  # PlanarConfiguration: contiguous
        (339, 3, 1, 3),  # SampleFormat: IEEE floating point
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = ifd_offset + ifd_size
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 273:
            value = data_offset
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    out += struct.pack("<I", 0)  # no next IFD
    return bytes(out) + pixels


def save_float16_tiff(path: str | Path, values: np.ndarray) -> Path:
    path = Path(path)
    payload = float16_tiff_bytes(values)
    atomic_write(path, lambda handle: handle.write(payload))
    return path


def _save_binary_png(path: Path, binary: np.ndarray) -> Path:
    image = Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), mode="L")
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))
    return path


# ----------------------------------------------------------------------------------------------------------
# Metrics from float16 maps
# ----------------------------------------------------------------------------------------------------------


def _order_key(values: np.ndarray) -> np.ndarray:
    """uint16 keys that sort like the float16 values (negative values included; -0 and +0 apart but adjacent)."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    negative = (bits & 0x8000) != 0
    return np.where(negative, ~bits, bits | 0x8000).astype(np.uint16)


_STRUCTURE = np.ones((3, 3), dtype=int)  # 8-connected regions, as the public script labels them


class NativeProAccumulator:
    """The PRO curve of MVTec's evaluation script over float16 maps, accumulated image by image."""

    def __init__(self) -> None:
        self.fp = np.zeros(1 << 16, dtype=np.int64)  # normal pixels per key
        self.overlap = np.zeros(1 << 16, dtype=np.float64)  # sum of 1/region size per key
        self.present = np.zeros(1 << 16, dtype=bool)  # keys that occur at all (thresholds)
        self.n_normal = 0
        self.n_regions = 0

    def add(self, amap: np.ndarray, mask: np.ndarray | None) -> None:
        keys = _order_key(amap).ravel()
        self.present[keys] = True
        if mask is None or not mask.any():
            self.fp += np.bincount(keys, minlength=1 << 16)
            self.n_normal += keys.size
            return
        labelled, n = ndimage.label(np.asarray(mask) != 0, _STRUCTURE)
        labelled = labelled.ravel()
        normal = labelled == 0
        self.fp += np.bincount(keys[normal], minlength=1 << 16)
        self.n_normal += int(normal.sum())
        sizes = np.bincount(labelled, minlength=n + 1).astype(np.float64)
        weights = np.zeros(n + 1, dtype=np.float64)
        weights[1:] = 1.0 / sizes[1:]
        self.overlap += np.bincount(keys[~normal], weights=weights[labelled[~normal]], minlength=1 << 16)
        self.n_regions += n

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) from (0, 0) to (1, 1), one point per distinct map value, thresholds high to low."""
        if self.n_regions == 0 or self.n_normal == 0:
            raise ValueError("the PRO curve needs at least one defect region and one normal pixel")
        order = np.flatnonzero(self.present)[::-1]
        fpr = np.minimum(np.cumsum(self.fp[order]) / self.n_normal, 1.0)
        pro = np.minimum(np.cumsum(self.overlap[order]) / self.n_regions, 1.0)
        return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))

    def au_pro(self, limit: float = MVTEC_AD2_PRO_LIMIT) -> float | None:
        if self.n_regions == 0 or self.n_normal == 0:
            return None
        from .metrics import trapezoid_area_to_limit

        fpr, pro = self.curve()
        return trapezoid_area_to_limit(fpr, pro, limit)


@dataclass
class ValidationStats:
    """Mean and standard deviation of the validation maps' pixel scores (float64 sums, streamed)."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, amap: np.ndarray) -> None:
        values = np.asarray(amap, dtype=np.float64)
        self.count += values.size
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())

    def threshold(self, k: float = 3.0) -> float | None:
        """mean + k * std (population std, numpy's default); None without validation pixels."""
        if self.count == 0:
            return None
        mean = self.total / self.count
        variance = max(self.total_sq / self.count - mean * mean, 0.0)
        return mean + k * variance**0.5


@dataclass
class SegF1Counts:
    """Pixel counts of the binarised maps against the masks, over all images together."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, binary: np.ndarray, mask: np.ndarray | None) -> None:
        truth = np.zeros(binary.shape, dtype=bool) if mask is None else np.asarray(mask) != 0
        self.tp += int(np.count_nonzero(binary & truth))
        self.fp += int(np.count_nonzero(binary & ~truth))
        self.fn += int(np.count_nonzero(~binary & truth))

    def f1(self) -> float | None:
        denominator = 2 * self.tp + self.fp + self.fn
        return None if denominator == 0 else 2 * self.tp / denominator


def _binarise(amap16: np.ndarray, threshold: float) -> np.ndarray:
    return amap16.astype(np.float32) > np.float32(threshold)


# ----------------------------------------------------------------------------------------------------------
# Maps at native size
# ----------------------------------------------------------------------------------------------------------


def native_maps(
    model: PatchCore, samples: Sequence[Sample], batch_size: int, num_workers: int = 0
) -> Iterator[tuple[Sample, np.ndarray]]:
    """(sample, float16 anomaly map at the image's native size) for each sample, in order."""
    if not samples:
        return
    loader = make_loader(list(samples), model.transform, batch_size, num_workers, False)
    with iterate_batches(loader) as batches:
        for batch in batches:
            prediction = model.predict(batch["image"])
            for index, amap, size in zip(
                batch["index"], prediction.anomaly_maps, batch["original_size"], strict=True
            ):
                native = model.transform.to_original(np.asarray(amap), tuple(int(v) for v in size))
                yield samples[int(index)], native.astype(np.float16)


def mvtec_ad2_metrics(
    model: PatchCore,
    obj: ObjectData,
    maps: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    batch_size: int,
    num_workers: int = 0,
    pro_limit: float = MVTEC_AD2_PRO_LIMIT,
) -> tuple[dict[str, float | None], dict[str, object]]:
    """The public-code figures of one object from its ``test_public`` maps (model resolution, in
    ``obj.test`` order) and its validation images (the segmentation threshold)."""
    validation = ValidationStats()
    for _, amap in native_maps(model, obj.validation, batch_size, num_workers):
        validation.add(amap)
    threshold = validation.threshold()
    pro = NativeProAccumulator()
    counts = SegF1Counts()
    labels, peaks = [], []
    for sample, native in _native_test_maps(model, obj, maps, sizes):
        mask = load_mask(sample.mask_paths[0]) != 0 if sample.mask_paths else None
        if mask is not None:
            check_mask_size(sample.mask_paths[0], mask.shape, sample.image_path, native.shape)
        pro.add(native, mask)
        if threshold is not None:
            counts.add(_binarise(native, threshold), mask)
        labels.append(int(sample.is_anomalous))
        peaks.append(float(native.max()))
    from .metrics import image_auroc

    metrics: dict[str, float | None] = {
        f"au_pro@{pro_limit:g}": pro.au_pro(pro_limit),
        "image_auroc_map_max": image_auroc(np.asarray(labels), np.asarray(peaks)) if labels else None,
        "seg_f1": counts.f1() if threshold is not None else None,
    }
    stats: dict[str, object] = {
        "evaluation_protocol": obj.protocol.name,
        "segmentation_threshold": threshold,
        "n_validation_images": len(obj.validation),
    }
    return metrics, stats


def _native_test_maps(
    model: PatchCore, obj: ObjectData, maps: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]
) -> Iterator[tuple[Sample, np.ndarray]]:
    for sample, amap, size in zip(obj.test, maps, sizes, strict=True):
        yield sample, model.transform.to_original(np.asarray(amap), size).astype(np.float16)


def write_test_public_maps(
    model: PatchCore,
    obj: ObjectData,
    maps: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    maps_root: Path,
) -> None:
    """The test_public maps as the evaluation script reads them: ``<maps_root>/<label>/<stem>.tiff``."""
    for sample, native in _native_test_maps(model, obj, maps, sizes):
        save_float16_tiff(maps_root / sample.label / f"{sample.image_path.stem}.tiff", native)


def write_submission(
    model: PatchCore,
    obj: ObjectData,
    submission_root: Path,
    threshold: float | None,
    batch_size: int,
    num_workers: int = 0,
) -> int:
    """The maps of ``obj``'s private test sets for the benchmark server: float16 TIFFs and, with a
    threshold, the binarised PNGs. Returns the number of images written."""
    written = 0
    for split, samples in obj.unlabelled.items():
        for sample, amap in native_maps(model, samples, batch_size, num_workers):
            stem = sample.image_path.stem
            save_float16_tiff(submission_root / "anomaly_images" / obj.name / split / f"{stem}.tiff", amap)
            if threshold is not None:
                target = submission_root / "anomaly_images_thresholded" / obj.name / split / f"{stem}.png"
                _save_binary_png(target, _binarise(amap, threshold))
            written += 1
    return written

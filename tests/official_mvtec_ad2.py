"""MVTec AD 2's public definitions, written again for the tests from reading MVTec's public code
(``MVTecAD2_public_code_utils``: the dataset class, ``check_and_prepare_data_for_upload.py`` and its
``utils.py``; the AU-PRO evaluation script ``evaluate_experiment.py`` / ``pro_curve_util.py`` /
``roc_curve_util.py`` / ``generic_util.trapezoid``). Independent of the project's implementation on
purpose: it reads the TIFF files with tifffile (as the scripts do), sorts every pixel score (no
histogram), and integrates the curve as the script does. Used only to check the project's numbers.
"""

from __future__ import annotations

from bisect import bisect
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

OBJECTS = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
PRIVATE_SETS = ("test_private", "test_private_mixed")


def pro_curve(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel sorted by score (high first); FPR counts normal pixels, PRO adds 1/|region| for each
    pixel of an 8-connected region; one point per distinct score (the last of a tie); (0,0) ... (1,1)."""
    scores, fp_step, pro_step = [], [], []
    n_normal, n_regions = 0, 0
    for amap, mask in zip(maps, masks, strict=True):
        labelled, n = ndimage.label(mask != 0, structure=np.ones((3, 3), dtype=int))
        normal = labelled == 0
        n_normal += int(normal.sum())
        n_regions += n
        step = np.zeros(amap.shape, dtype=np.float64)
        for k in range(1, n + 1):
            region = labelled == k
            step[region] = 1.0 / region.sum()
        scores.append(amap.ravel())
        fp_step.append(normal.ravel().astype(np.float64))
        pro_step.append(step.ravel())
    score = np.concatenate(scores).astype(np.float64)
    order = np.argsort(score, kind="stable")[::-1]
    score = score[order]
    fpr = np.cumsum(np.concatenate(fp_step)[order]).astype(np.float32) / np.float32(n_normal)
    pro = np.cumsum(np.concatenate(pro_step)[order]) / n_regions
    last_of_tie = np.append(np.diff(score) != 0, True)
    fpr = np.minimum(fpr[last_of_tie], 1.0)
    pro = np.minimum(pro[last_of_tie], 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoids up to x_max; between two points y is interpolated at x_max (as generic_util.trapezoid)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    extra = 0.0
    if x_max not in x:
        i = bisect(list(x), x_max)
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        extra = 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + extra)


def au_pro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.05) -> float:
    fpr, pro = pro_curve(maps, masks)
    return trapezoid(fpr, pro, limit) / limit


def classification_auroc(maps: list[np.ndarray], labels: list[int]) -> float:
    """ROC of the maps' maxima, walking the sorted scores (ties merged), integrated by trapezoids."""
    pairs = sorted(zip((float(m.max()) for m in maps), labels, strict=True), key=lambda p: p[0])
    n_bad = sum(1 for _, y in pairs if y)
    n_good = len(pairs) - n_bad
    fp, tp = n_good, n_bad
    fprs, tprs = [1.0], [1.0]
    for i, (score, label) in enumerate(pairs):
        if label:
            tp -= 1
        else:
            fp -= 1
        if i == len(pairs) - 1 or pairs[i + 1][0] != score:
            fprs.append(fp / n_good)
            tprs.append(tp / n_bad)
    x, y = np.array(fprs[::-1]), np.array(tprs[::-1])
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def segmentation_threshold(validation_maps: list[np.ndarray]) -> float:
    """The checker's baseline: np.mean + 3 * np.std of the validation anomaly scores."""
    scores = np.concatenate([m.astype(np.float64).ravel() for m in validation_maps])
    return float(np.mean(scores) + 3 * np.std(scores))


def seg_f1(thresholded: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Pixel F1 over all images together (binarised maps: 255 = anomalous)."""
    pred = np.concatenate([t.ravel() == 255 for t in thresholded])
    truth = np.concatenate([m.ravel() != 0 for m in masks])
    tp = np.sum(pred & truth)
    return float(2 * tp / (2 * tp + np.sum(pred & ~truth) + np.sum(~pred & truth)))


def read_map(path: Path) -> np.ndarray:
    return tifffile.imread(path)


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


class SubmissionError(Exception):
    pass


def _exactly(folder: Path, dirs: set[str], files: set[str]) -> None:
    found_dirs = {p.name for p in folder.iterdir() if p.is_dir()}
    found_files = {p.name for p in folder.iterdir() if p.is_file()}
    if found_dirs != dirs or found_files != files:
        raise SubmissionError(
            f"{folder}: dirs {sorted(found_dirs ^ dirs)} / files {sorted(found_files ^ files)} do not match"
        )


def check_submission(root: Path, counts: dict[str, int], objects: tuple[str, ...] = OBJECTS) -> None:
    """The upload checker's rules: anomaly_images/<object>/<private set>/NNN_<regular|mixed>.tiff, exactly
    ``counts[object]`` of them, 2-D float16; anomaly_images_thresholded (optional) the same names as .png,
    2-D, values in {0, 255}; nothing else anywhere. ``counts``: images per set (the real checker's table
    is the real data set's, 142 to 321; generated trees are smaller)."""
    if not (root / "anomaly_images").is_dir():
        raise SubmissionError("anomaly_images missing")
    tops = {"anomaly_images"} | (
        {"anomaly_images_thresholded"} if (root / "anomaly_images_thresholded").exists() else set()
    )
    _exactly(root, tops, set())
    for top in sorted(tops):
        suffix = ".tiff" if top == "anomaly_images" else ".png"
        _exactly(root / top, set(objects), set())
        for obj in objects:
            _exactly(root / top / obj, set(PRIVATE_SETS), set())
            for split in PRIVATE_SETS:
                kind = "regular" if split == "test_private" else "mixed"
                names = {f"{i:03d}_{kind}{suffix}" for i in range(counts[obj])}
                folder = root / top / obj / split
                _exactly(folder, set(), names)
                for name in sorted(names):
                    if top == "anomaly_images":
                        image = tifffile.imread(folder / name)
                        if image.ndim != 2 or image.dtype != np.float16:
                            raise SubmissionError(
                                f"{folder / name}: {image.ndim}-D {image.dtype}, not 2-D float16"
                            )
                    else:
                        image = np.asarray(Image.open(folder / name))
                        if image.ndim != 2 or not np.isin(np.unique(image), [0, 255]).all():
                            raise SubmissionError(f"{folder / name}: not a 2-D image of 0 and 255")

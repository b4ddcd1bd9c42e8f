"""``patchcore predict``: score image files with a saved model, write JSON lines and PNG heatmaps.

Bad input is found before any scoring: the ``--out`` folder (not inside the inputs, empty unless
``--overwrite``), then every image is decoded once as a check (a truncated file is named in the first seconds,
not after the others were scored); ``skip_bad`` skips such files instead, naming each. Results stream: each
image's JSON line (``predictions.jsonl`` and the ``emit`` callback) and heatmap are written as soon as its
batch is scored, and its maps are freed, so memory stays flat in the number of images. An uncalibrated,
never-evaluated model needs the call's own range first (one colour range for all images): its maps are then
spilled at the model's resolution to a temporary file in ``--out`` during scoring and read back to write the
outputs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..data import DataError, load_image
from ..data.decode import check_image
from ..data.loading import expand_images
from ..deploy.inference import DisplayRanges, ImagePrediction, Predictor
from ..fileio import safe_name
from ..heatmaps import save_heatmap, save_map_png
from .runs import OutputError, Progress, prepare_output_dir

__all__ = ["PREDICTIONS_FILE", "check_inputs", "check_out_outside_inputs", "predict_images"]

log = logging.getLogger("patchcore")

PREDICTIONS_FILE = "predictions.jsonl"
_SPILL = ".predict-maps.tmp"


def check_out_outside_inputs(out_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an output folder that is one of the input folders or lies inside one: its heatmaps would land
    among the images (and a later ``calibrate`` of that folder would take them for good parts)."""
    out = out_dir.resolve()
    for item in map(Path, inputs):
        if item.is_dir():
            folder = item.resolve()
            if out == folder or folder in out.parents:
                raise OutputError(
                    f"--out folder {out_dir} is inside the input folder {item}: its heatmaps would be mixed "
                    "with the images; choose a folder outside the inputs"
                )


def check_inputs(paths: Sequence[Path], skip_bad: bool, progress: Progress | None = None) -> list[Path]:
    """Decode every image once before any scoring. A bad one stops the command naming it, or with
    ``skip_bad`` is left out with a warning naming it. Returns the images to score, in order."""
    bad: dict[int, str] = {}

    def check(index: int) -> str | None:
        try:
            check_image(paths[index])
        except DataError as exc:
            return str(exc)
        return None

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="patchcore-check")
    try:
        futures = [pool.submit(check, i) for i in range(len(paths))]
        # In order, so that without skip_bad the first bad file (in the inputs' order) is the one named.
        for index, future in enumerate(futures):
            problem = future.result()
            if problem is not None:
                if not skip_bad:
                    raise DataError(f"{problem} (pass --skip-bad to skip unreadable images)")
                bad[index] = problem
            if progress is not None:
                progress("check", index + 1, len(paths))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if not bad:
        return list(paths)
    for index in sorted(bad):
        log.warning("skipped: %s", bad[index])
    kept = [p for i, p in enumerate(paths) if i not in bad]
    if not kept:
        raise DataError(f"all {len(paths)} images are unreadable; nothing to score")
    log.warning("skipped %d of %d images (unreadable); scoring the other %d", len(bad), len(paths), len(kept))
    return kept


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
    skip_bad: bool = False,
    progress: bool = False,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Score images with a saved model: one JSON line per image (in ``out_dir/predictions.jsonl`` and to
    ``emit`` as it is written), heatmap PNGs in ``out_dir``. Returns the number of images scored.

    Decisions, normalised scores and masks use the model's calibration from good images; a model without
    one gets ``anomalous: null`` and a ``calibration`` field saying so. Heatmaps of an uncalibrated model
    use the evaluation's map range, or one range over all maps of this call (never a per-image range).
    A non-empty ``out_dir`` is refused unless ``overwrite`` (earlier predictions would be replaced), and so
    is an ``out_dir`` inside an input folder.
    """
    if batch_size is not None and batch_size < 1:
        raise OutputError(f"batch size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    paths = expand_images(inputs)
    check_out_outside_inputs(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out folder {out} is an existing file, not a folder")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        prepare_output_dir(out, overwrite, "--out folder")  # raises, naming the entries
    predictor = Predictor.load(model_path, device=device, weights=weights)
    predictor.prepare()
    with Progress(progress) as bars:
        bars.start("predict", {"check": len(paths), "score": len(paths)})
        paths = check_inputs(paths, skip_bad, bars)
        out = prepare_output_dir(out, overwrite, "--out folder")
        if not predictor.calibrated:
            log.warning("model %s is %s", model_path, predictor.describe())
        names = _output_names(paths)
        ranges = predictor.fixed_ranges()
        with (out / PREDICTIONS_FILE).open("w", encoding="utf-8") as lines:
            if ranges is not None:
                records: Iterator[ImagePrediction] = predictor.stream(paths, ranges, batch_size=batch_size)
                _write(
                    predictor,
                    zip(paths, names, records, strict=True),
                    out,
                    lines,
                    heatmaps,
                    masks,
                    emit,
                    bars,
                )
            else:
                _predict_with_call_range(
                    predictor, paths, names, out, lines, heatmaps, masks, emit, batch_size, bars
                )
    return len(paths)


def _output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct, file-system-safe stem per image (``a``, ``a_1``... for images of the same name)."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = safe_name(path.stem)
        name, n = stem, 1
        while name in used:
            name, n = f"{stem}_{n}", n + 1
        used.add(name)
        names.append(name)
    return names


def _write(
    predictor: Predictor,
    items: Iterator[tuple[Path, str, ImagePrediction]],
    out: Path,
    lines: IO[str],
    heatmaps: bool,
    masks: bool,
    emit: Callable[[dict[str, Any]], None] | None,
    progress: Progress,
) -> None:
    """Each record's heatmap, mask and JSON line, written as the record arrives (then dropped)."""
    for done, (path, name, prediction) in enumerate(items, start=1):
        record: dict[str, Any] = {"image": str(path), **predictor.result_fields(prediction)}
        if heatmaps:
            record["heatmap"] = str(
                save_heatmap(out / f"{name}_heatmap.png", load_image(path), prediction.unit_map)
            )
        if masks and prediction.mask is not None:
            record["mask"] = str(save_map_png(out / f"{name}_mask.png", prediction.mask.astype("float32")))
        lines.write(json.dumps(record) + "\n")
        lines.flush()
        if emit is not None:
            emit(record)
        progress("score", done, None)


def _predict_with_call_range(
    predictor: Predictor,
    paths: Sequence[Path],
    names: Sequence[str],
    out: Path,
    lines: IO[str],
    heatmaps: bool,
    masks: bool,
    emit: Callable[[dict[str, Any]], None] | None,
    batch_size: int | None,
    progress: Progress,
) -> None:
    """Two passes for a model with no recorded range: score everything (maps spilled to disk at the model's
    resolution, one number per image kept), then write every output with the call's one range."""
    spill = out / _SPILL
    kept: list[tuple[float, tuple[int, int], int, tuple[int, ...]]] = []  # score, size, offset, map shape
    score_span = [np.inf, -np.inf]
    map_span = [np.inf, -np.inf]
    try:
        with spill.open("wb") as handle:
            for done, (_, score, amap, size) in enumerate(
                predictor.score_batches(paths, batch_size), start=1
            ):
                values = np.ascontiguousarray(amap, dtype=np.float32)
                kept.append((score, size, handle.tell(), values.shape))
                handle.write(values.tobytes())
                score_span = [min(score_span[0], score), max(score_span[1], score)]
                map_span = [min(map_span[0], float(values.min())), max(map_span[1], float(values.max()))]
                progress("score", done, None)
        ranges: DisplayRanges = predictor.call_ranges(
            (float(score_span[0]), float(score_span[1])), (float(map_span[0]), float(map_span[1]))
        )

        def records() -> Iterator[tuple[Path, str, ImagePrediction]]:
            with spill.open("rb") as handle:
                for path, name, (score, size, offset, shape) in zip(paths, names, kept, strict=True):
                    handle.seek(offset)
                    count = int(np.prod(shape))
                    amap = np.frombuffer(bytearray(handle.read(4 * count)), dtype=np.float32).reshape(shape)
                    yield path, name, predictor.record(str(path), score, amap, size, ranges)

        _write(predictor, records(), out, lines, heatmaps, masks, emit, Progress(False))
    finally:
        spill.unlink(missing_ok=True)

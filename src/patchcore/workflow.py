"""Train / evaluate / predict workflows: data set -> PatchCore per object -> metrics -> reports.

The CLI is a thin layer over these functions; they can also be called from Python.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__
from .config import Config, config_to_dict
from .data import (
    DataError,
    ImageDataset,
    ObjectData,
    collate_samples,
    load_dataset,
    load_image,
    saturation_for,
)
from .data.base import is_image_file
from .fileio import atomic_write_json, atomic_write_text
from .heatmaps import normalize_maps, save_heatmap, save_map_png
from .metrics import SaturationSpec, compute_metrics
from .model import PatchCore
from .reports import ObjectResult, mean_metrics, write_reports
from .tracking import check_tracker, make_tracker

__all__ = [
    "RunSummary",
    "evaluate_models",
    "evaluate_object",
    "make_run_dir",
    "predict_images",
    "train",
]

log = logging.getLogger("patchcore")


@dataclass
class RunSummary:
    run_dir: Path
    results: list[ObjectResult]
    mean: dict[str, float | None]
    reports: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------- run folder, logging, progress


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def make_run_dir(output_dir: str | os.PathLike, project: str, group: str) -> Path:
    """``<output_dir>/<project>/<group>/``, or ``<group>_1``, ``<group>_2``... if taken: never overwrites."""
    parent = Path(output_dir) / _safe_name(project)
    parent.mkdir(parents=True, exist_ok=True)
    base = _safe_name(group)
    for attempt in range(10000):
        candidate = parent / (base if attempt == 0 else f"{base}_{attempt}")
        try:
            candidate.mkdir()  # atomic: two runs started together cannot get the same folder
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder under {parent}")


_CONSOLE = None


def _console():
    """The rich console of logs and progress bars, shared so log lines print above live bars; on stderr,
    because stdout carries the results (the summary table, predict's JSON lines)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def setup_logging(run_dir: Path | None, level: str = "INFO") -> None:
    """Console logging through rich (on stderr: stdout carries results), plus ``run.log`` in the run folder."""
    from rich.logging import RichHandler

    log.setLevel(level.upper())
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = RichHandler(console=_console(), show_path=False, rich_tracebacks=False, markup=False)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)
    log.propagate = False


class Progress:
    """Rich progress bars per phase (extract, coreset, predict); a no-op when disabled."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None
        self._tasks: dict[str, Any] = {}
        self._totals: dict[str, int | None] = {}
        self._prefix = ""

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=_console(),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start(self, prefix: str, totals: dict[str, int | None]) -> None:
        self._prefix = prefix
        self._tasks = {}
        self._totals = dict(totals)

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if self._progress is None:
            return
        total = total if total is not None else self._totals.get(phase)
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(f"{self._prefix} {phase}", total=total)
        self._progress.update(self._tasks[phase], completed=done, total=total)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------- building blocks


def build_model(config: Config) -> PatchCore:
    params = dict(config_to_dict(config)["model"])
    return PatchCore(**params, seed=config.seed)


def _loader(samples, transform, batch_size: int, num_workers: int, with_masks: bool) -> DataLoader:
    return DataLoader(
        ImageDataset(samples, transform, with_masks=with_masks),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_samples,
        persistent_workers=False,
    )


class _LoaderBatches:
    """The loader's batches, iterated once, with ``dataset`` still visible (the feature cache fingerprints
    its files). The worker processes start only when iteration does: not at all on a cache hit."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.dataset = loader.dataset
        self._iterator = None

    def __iter__(self):
        self._iterator = iter(self.loader)
        return self._iterator

    def close(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


@contextlib.contextmanager
def _batches(loader: DataLoader):
    """Iterate ``loader``, shutting its worker processes down at once if the loop fails (a bad image).

    Otherwise the failed iterator sits in a reference cycle with the exception's traceback and its workers
    are only stopped by a later garbage collection, which then stalls for several seconds per worker.
    """
    batches = _LoaderBatches(loader)
    try:
        yield batches
    finally:
        batches.close()


def _f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The image-score threshold with the best F1 (a decision point for production use)."""
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
    config: Config,
    out_dir: Path,
    progress: Progress | None = None,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Score the object's test split, compute its metrics, write predictions / heatmaps / maps.

    Also sets ``model.calibration_`` (test-set map range and F1-optimal image threshold).
    """
    if not obj.test:
        log.warning("%s: no test images, nothing to evaluate", obj.name)
        return {}, {"n_test_images": 0}
    transform = model.transform
    with_masks = obj.has_masks
    loader = _loader(obj.test, transform, config.model.batch_size, config.data.num_workers, with_masks)
    if progress is not None:
        progress.start(obj.name, {"predict": len(obj.test)})
    labels, scores, maps, masks = [], [], [], []
    # Folder data sets may mix defect images with and without masks: only those with ground truth (and
    # good images) enter the pixel metrics, else an unannotated defect would count as all-good pixels.
    pixel_usable: list[bool] = []
    spro_masks: list[list[np.ndarray]] = []
    spro_specs: list[list[SaturationSpec]] = []
    original_sizes = []
    t0 = time.perf_counter()
    done = 0
    with _batches(loader) as batches:
        for batch in batches:
            prediction = model.predict(batch["image"])
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
        pro_fpr_limit=config.evaluation.pro_fpr_limit,
        spro_fpr_limits=tuple(config.evaluation.spro_fpr_limits),
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
    threshold = _f1_threshold(label_array, image_scores)
    if threshold is not None:
        model.calibration_["image_threshold"] = threshold

    out_dir.mkdir(parents=True, exist_ok=True)
    span = (image_scores.max() - image_scores.min()) or 1.0
    lines = ["name,label,anomalous,image_score,normalized_score"]
    for sample, score in zip(obj.test, image_scores, strict=True):
        normalized = (score - image_scores.min()) / span
        lines.append(f"{sample.name},{sample.label},{int(sample.is_anomalous)},{score:.6f},{normalized:.6f}")
    atomic_write_text(out_dir / f"predictions_{_safe_name(obj.name)}.csv", "\n".join(lines) + "\n")

    if config.evaluation.heatmaps > 0:
        order = np.argsort(-image_scores, kind="stable")[: config.evaluation.heatmaps]
        heat_dir = out_dir / "heatmaps" / _safe_name(obj.name)
        for rank, i in enumerate(order):
            sample = obj.test[int(i)]
            unit = normalize_maps(transform.to_original(maps[i], original_sizes[i]), map_min, map_max)
            name = f"{rank:03d}_{_safe_name(sample.name)}.png"
            save_heatmap(heat_dir / name, load_image(sample.image_path), unit)

    if config.evaluation.save_autovi_maps:
        # Official AutoVI evaluation layout: <maps>/<object>/test/<defect or good>/NNNN.png, native size.
        maps_root = out_dir / "anomaly_maps" / obj.name / "test"
        for sample, amap, size in zip(obj.test, maps, original_sizes, strict=True):
            unit = normalize_maps(transform.to_original(amap, size), map_min, map_max)
            save_map_png(maps_root / sample.label / f"{sample.image_path.stem}.png", unit, sixteen_bit=True)

    stats = {"n_test_images": len(obj.test), "predict_seconds": round(predict_seconds, 3)}
    return metrics, stats


def _header(config: Config) -> dict[str, Any]:
    return {
        "project": config.project,
        "group": config.group,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "patchcore_version": __version__,
        "data": f"{config.data.kind} ({config.data.root or 'bundled'})",
        "backbone": config.model.backbone,
        "layers": config.model.layers,
        "sampler": f"{config.model.sampler} {config.model.percentage:g}",
        "config": config_to_dict(config),
    }


def _objects(config: Config) -> list[ObjectData]:
    options: dict[str, Any] = {}
    if config.data.kind == "elpv":
        options = {
            "train_fraction": config.data.train_fraction,
            "include_uncertain": config.data.include_uncertain,
        }
    return load_dataset(config.data.kind, config.data.root, config.data.objects, **options)


# --------------------------------------------------------------------- train


def train(config: Config, online: str | None = None) -> RunSummary:
    """Fit, save and (optionally) evaluate one model per object; write the summary reports."""
    # Bad input (missing data folder, tracker not installed) fails before a run folder is taken.
    objects = _objects(config)
    check_tracker(online or config.logging.online)
    run_dir = make_run_dir(config.output_dir, config.project, config.group)
    setup_logging(run_dir, config.logging.level)
    import yaml

    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    log.info("run folder: %s", run_dir)
    log.info("data: %s, objects: %s", config.data.kind, ", ".join(o.name for o in objects))
    tracker = make_tracker(
        online or config.logging.online, config.project, run_dir.name, config_to_dict(config), run_dir
    )
    header = _header(config)
    results: list[ObjectResult] = []
    models_dir = run_dir / "models"
    try:
        with Progress(config.logging.progress) as progress:
            for obj in objects:
                if not obj.train:
                    raise DataError(f"{obj.name}: no training images")
                seed_everything(config.seed)
                model = build_model(config)
                log.info("%s: fitting on %d good images", obj.name, len(obj.train))
                progress.start(obj.name, {"extract": len(obj.train)})
                loader = _loader(
                    obj.train, model.transform, config.model.batch_size, config.data.num_workers, False
                )
                with _batches(loader) as batches:
                    model.fit(batches, progress=progress)
                model.stats_["object"] = obj.name
                header["layers"] = list(model.layers_)  # the resolved layers, also when left to the default
                stats = dict(model.stats_)
                metrics: dict[str, float | None] = {}
                if config.evaluation.enabled:
                    metrics, eval_stats = evaluate_object(model, obj, config, run_dir, progress)
                    stats.update(eval_stats)
                model_path = model.save(models_dir / f"patchcore_{_safe_name(obj.name)}.pt")
                atomic_write_json(
                    models_dir / f"patchcore_{_safe_name(obj.name)}.json",
                    {
                        "object": obj.name,
                        "params": model.get_params(),
                        "stats": stats,
                        "metrics": metrics,
                        "calibration": model.calibration_,
                        "weights_id": model.weights_id_,
                    },
                )
                result = ObjectResult(obj.name, metrics, stats, str(model_path))
                results.append(result)
                tracker.log_object(obj.name, {**metrics, **stats})
                log.info("%s: %s", obj.name, _metrics_line(metrics, stats))
                # Reports after every object: an interrupted run keeps what it finished.
                reports = write_reports(run_dir, results, header)
        means = mean_metrics(results)
        tracker.log_summary(means)
    finally:
        tracker.finish()
    log.info("mean: %s", _metrics_line(means, {}))
    log.info("summary: %s", reports["markdown"])
    return RunSummary(run_dir, results, means, reports)


def _metrics_line(metrics: dict[str, float | None], stats: dict[str, Any]) -> str:
    parts = [f"{k}={'n/a' if v is None else f'{100 * v:.2f}'}" for k, v in metrics.items()]
    if "memory_size" in stats:
        parts.append(f"bank={stats['memory_size']}/{stats['n_patches']}x{stats['feature_dim']}")
    return ", ".join(parts)


# --------------------------------------------------------------------- evaluate saved models


def _model_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("patchcore_*.pt")) or sorted(p.glob("models/patchcore_*.pt"))
            if not found:
                raise FileNotFoundError(f"no patchcore_*.pt model files in {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"model file {p} does not exist")
    return files


def evaluate_models(
    config: Config,
    model_paths: Sequence[str | os.PathLike],
    device: str = "auto",
    weights: str | os.PathLike | None = None,
) -> RunSummary:
    """Re-evaluate saved models on the test split of the configured data set (object from each model)."""
    files = _model_files(model_paths)
    objects = {o.name: o for o in _objects(config)}
    run_dir = make_run_dir(config.output_dir, config.project, f"{config.group}_eval")
    setup_logging(run_dir, config.logging.level)
    results: list[ObjectResult] = []
    header = _header(config)
    header["models"] = [str(f) for f in files]
    with Progress(config.logging.progress) as progress:
        for path in files:
            model = PatchCore.load(path, device=device, weights=weights)
            name = model.stats_.get("object") or path.stem.removeprefix("patchcore_")
            if name not in objects:
                raise DataError(
                    f"model {path} is for object {name!r}, not in the data set ({', '.join(objects)})"
                )
            config.model.batch_size = model.batch_size
            metrics, eval_stats = evaluate_object(model, objects[name], config, run_dir, progress)
            stats = {**model.stats_, **eval_stats}
            results.append(ObjectResult(name, metrics, stats, str(path)))
            log.info("%s: %s", name, _metrics_line(metrics, stats))
            reports = write_reports(run_dir, results, header)
    means = mean_metrics(results)
    log.info("mean: %s", _metrics_line(means, {}))
    return RunSummary(run_dir, results, means, reports)


# --------------------------------------------------------------------- predict new images


def _expand_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # Like the data set loaders: skip hidden files and folders (macOS "._x.png", .ipynb_checkpoints).
            found = sorted(
                p for p in item.rglob("*")
                if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )  # fmt: skip
            if not found:
                raise DataError(f"no images in folder {item}")
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            raise DataError(f"image {item} does not exist")
    return images


def predict_images(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    device: str = "auto",
    batch_size: int | None = None,
    heatmaps: bool = True,
    weights: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Score images with a saved model: one JSON-able record per image, heatmap PNGs in ``out_dir``.

    Heatmaps use the map range recorded when the model was evaluated; without one (a model fitted only
    through the API), one range over all maps of this call (never a per-image range).
    """
    model = PatchCore.load(model_path, device=device, weights=weights)
    if batch_size:
        model.batch_size = batch_size
    paths = _expand_images(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = model.transform
    records: list[dict[str, Any]] = []
    all_maps: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    for start in range(0, len(paths), model.batch_size):
        chunk = paths[start : start + model.batch_size]
        pil_images = [load_image(p) for p in chunk]
        tensors = [transform(im) for im in pil_images]
        shapes = {tuple(t.shape) for t in tensors}
        groups = [tensors] if len(shapes) == 1 else [[t] for t in tensors]
        offset = 0
        for group in groups:
            prediction = model.predict(torch.stack(group))
            for j, score in enumerate(prediction.image_scores):
                path = chunk[offset + j]
                all_maps.append(prediction.anomaly_maps[j])
                sizes.append((pil_images[offset + j].height, pil_images[offset + j].width))
                records.append({"image": str(path), "score": float(score)})
            offset += len(group)
    calibration = getattr(model, "calibration_", {})
    if "map_min" in calibration:
        low, high = calibration["map_min"], calibration["map_max"]
        score_low, score_high = calibration["score_min"], calibration["score_max"]
    else:
        log.warning(
            "model %s carries no evaluation range: heatmaps use one range over these images", model_path
        )
        low, high = min(float(m.min()) for m in all_maps), max(float(m.max()) for m in all_maps)
        scores = [r["score"] for r in records]
        score_low, score_high = min(scores), max(scores)
    threshold = calibration.get("image_threshold")
    used_names: set[str] = set()
    for record, amap, size in zip(records, all_maps, sizes, strict=True):
        span = (score_high - score_low) or 1.0
        record["normalized_score"] = float(np.clip((record["score"] - score_low) / span, 0.0, None))
        record["anomalous"] = None if threshold is None else bool(record["score"] >= threshold)
        if heatmaps:
            stem = _safe_name(Path(record["image"]).stem)
            name, n = stem, 1
            while name in used_names:
                name, n = f"{stem}_{n}", n + 1
            used_names.add(name)
            unit = normalize_maps(transform.to_original(amap, size), low, high)
            heat = save_heatmap(out_dir / f"{name}_heatmap.png", load_image(Path(record["image"])), unit)
            record["heatmap"] = str(heat)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records

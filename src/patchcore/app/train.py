"""``patchcore train``: data set -> one fitted, saved and evaluated PatchCore per object -> reports."""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..data import DataError, ObjectData, load_dataset
from ..data.loading import iterate_batches, make_loader
from ..engine.model import PatchCore
from ..evaluation.evaluate import EvaluationSettings, evaluate_object
from ..evaluation.reports import ObjectResult, mean_metrics, write_reports
from ..fileio import atomic_write_json, atomic_write_text, safe_name
from .cache import fit_cached
from .calibrate import calibrate_fitted, check_calibration_settings, split_calibration
from .config import Config, config_to_dict
from .runs import Progress, make_run_dir, metrics_line, seed_everything, setup_logging
from .tracking import check_tracker, make_tracker

__all__ = ["RunSummary", "build_model", "evaluation_settings", "load_objects", "run_header", "train"]

log = logging.getLogger("patchcore")


@dataclass
class RunSummary:
    run_dir: Path
    results: list[ObjectResult]
    mean: dict[str, float | None]
    reports: dict[str, Path] = field(default_factory=dict)


def build_model(config: Config) -> PatchCore:
    """The estimator the configuration describes (the feature cache is the application's, not the model's)."""
    params = dict(config_to_dict(config)["model"])
    params.pop("feature_cache", None)
    return PatchCore(**params, seed=config.seed)


def evaluation_settings(config: Config) -> EvaluationSettings:
    return EvaluationSettings(
        batch_size=config.model.batch_size,
        num_workers=config.data.num_workers,
        pro_fpr_limit=config.evaluation.pro_fpr_limit,
        spro_fpr_limits=tuple(config.evaluation.spro_fpr_limits),
        heatmaps=config.evaluation.heatmaps,
        save_autovi_maps=config.evaluation.save_autovi_maps,
    )


def run_header(config: Config) -> dict[str, Any]:
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


def load_objects(config: Config) -> list[ObjectData]:
    options: dict[str, Any] = {}
    if config.data.kind == "elpv":
        options = {
            "train_fraction": config.data.train_fraction,
            "include_uncertain": config.data.include_uncertain,
        }
    return load_dataset(config.data.kind, config.data.root, config.data.objects, **options)


def train(config: Config, online: str | None = None) -> RunSummary:
    """Fit, save and (optionally) evaluate one model per object; write the summary reports."""
    # Bad input (missing data folder, tracker not installed) fails before a run folder is taken.
    objects = load_objects(config)
    check_calibration_settings(config.evaluation.calibration_fraction, config.evaluation.false_alarm_rate)
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
    header = run_header(config)
    results: list[ObjectResult] = []
    models_dir = run_dir / "models"
    try:
        with Progress(config.logging.progress) as progress:
            for obj in objects:
                if not obj.train:
                    raise DataError(f"{obj.name}: no training images")
                seed_everything(config.seed)
                model = build_model(config)
                train_samples, calibration_samples = split_calibration(
                    obj, config.evaluation.calibration_fraction, config.seed
                )
                log.info("%s: fitting on %d good images", obj.name, len(train_samples))
                progress.start(obj.name, {"extract": len(train_samples)})
                loader = make_loader(
                    train_samples, model.transform, config.model.batch_size, config.data.num_workers, False
                )
                with iterate_batches(loader) as batches:
                    fit_cached(model, batches, config.model.feature_cache, progress=progress)
                model.stats_["object"] = obj.name
                if calibration_samples:
                    calibrate_fitted(
                        model, calibration_samples, config.evaluation.false_alarm_rate,
                        f"{obj.name}: {len(calibration_samples)} held-out good images",
                    )  # fmt: skip
                header["layers"] = list(model.layers_)  # the resolved layers, also when left to the default
                stats = dict(model.stats_)
                metrics: dict[str, float | None] = {}
                if config.evaluation.enabled:
                    progress.start(obj.name, {"predict": len(obj.test)})
                    metrics, eval_stats = evaluate_object(
                        model, obj, run_dir, evaluation_settings(config), progress
                    )
                    stats.update(eval_stats)
                model_path = model.save(models_dir / f"patchcore_{safe_name(obj.name)}.pt")
                atomic_write_json(
                    models_dir / f"patchcore_{safe_name(obj.name)}.json",
                    {
                        "object": obj.name,
                        "params": model.get_params(),
                        "stats": stats,
                        "metrics": metrics,
                        "calibration": model.calibration_,
                        "evaluation": model.evaluation_,
                        "weights_id": model.weights_id_,
                    },
                )
                result = ObjectResult(obj.name, metrics, stats, str(model_path))
                results.append(result)
                tracker.log_object(obj.name, {**metrics, **stats})
                log.info("%s: %s", obj.name, metrics_line(metrics, stats))
                # Reports after every object: an interrupted run keeps what it finished.
                reports = write_reports(run_dir, results, header)
        means = mean_metrics(results)
        tracker.log_summary(means)
    finally:
        tracker.finish()
    log.info("mean: %s", metrics_line(means, {}))
    log.info("summary: %s", reports["markdown"])
    return RunSummary(run_dir, results, means, reports)

"""``patchcore train``: data set -> one fitted, saved and evaluated PatchCore per object -> reports.

Each object is one call of :func:`train_object` (fit, evaluate, return the model state and the files it
wrote), run here one after another or as Ray tasks across a cluster (``execution.engine: ray``); either
way this process writes the model files, the per-object records and the reports. ``execution.shards``
splits one object's images over parallel shard tasks (``distributed.sharded``).

Resumable: ``train(..., resume=RUN_DIR)`` keeps the objects whose completion record (``app.completion``:
config hash and file checksums) matches and redoes every other one, first removing whatever it had left.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._version import __version__
from ..data import DataError, ObjectData, dataset_kind, load_dataset
from ..data.check import check_samples
from ..data.loading import iterate_batches, make_loader
from ..engine.backbones import ensure_weights
from ..engine.model import NonFiniteError, PatchCore
from ..evaluation.evaluate import EvaluationSettings, evaluate_object
from ..evaluation.reports import ObjectResult, mean_metrics, write_reports
from .cache import fit_cached
from .calibrate import calibrate_fitted, check_calibration_settings, split_calibration
from .cmd_audit import training_audit_files
from .completion import (
    ObjectOutput,
    completed_result,
    config_changes,
    config_hash,
    fitted_model,
    forget_object,
    object_paths,
    recorded_objects,
    write_fitted,
    write_object,
)
from .config import Config, ConfigError, config_to_dict
from .runs import (
    Progress,
    check_run_folder,
    finish_run,
    lock_run,
    make_run_dir,
    mark_object,
    metrics_line,
    run_temp_dir,
    seed_everything,
    start_run,
    unlock_run,
)
from .tracking import check_tracker, make_tracker

__all__ = [
    "ObjectOutput",
    "ObjectTask",
    "ObjectsFailedError",
    "RunSummary",
    "build_model",
    "check_objects",
    "config_hash",
    "evaluation_settings",
    "load_objects",
    "model_record",
    "name_bad_images",
    "run_header",
    "train",
    "train_object",
]

log = logging.getLogger("patchcore")


class ObjectsFailedError(RuntimeError):
    """Some objects failed on every try (the others finished and are reported): names them and why."""


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
    """The configured data set's objects; the loader's options are the data keys its kind declares."""
    options = {key: getattr(config.data, key) for key in dataset_kind(config.data.kind).options}
    return load_dataset(config.data.kind, config.data.root, config.data.objects, **options)


def check_objects(objects: list[ObjectData], model: PatchCore, train: bool, test: bool) -> None:
    """Every image and mask header of the splits that will be read, before any work (data/check.py)."""
    for obj in objects:
        if train:
            if not obj.train:
                raise DataError(f"{obj.name}: no training images")
            check_samples(obj.train, model.transform, f"{obj.name} train")
            if obj.validation:  # held-out goods (calibration; MVTec AD 2's segmentation threshold)
                check_samples(obj.validation, model.transform, f"{obj.name} validation")
        if test:
            check_samples(obj.test, model.transform, f"{obj.name} test")
            for split, samples in obj.unlabelled.items():  # scored for a benchmark server only
                check_samples(samples, model.transform, f"{obj.name} {split}")


def name_bad_images(exc: NonFiniteError, samples: list[Any]) -> NonFiniteError:
    """The engine names images by position in its input; the application knows their files."""
    names = [str(samples[p].image_path) if 0 <= p < len(samples) else f"#{p}" for p in exc.positions]
    return NonFiniteError(exc.what, exc.positions, names)


@dataclass
class ObjectTask:
    """One object to train: everything :func:`train_object` needs, picklable (it may travel to a worker).
    ``fitted``: a saved, verified model of this object and config (a resumed run): evaluated, not refitted."""

    config: Config
    obj: ObjectData
    fitted: Path | None = None


class SampleImages:
    """Training images of a list of samples, as the estimator takes them: batches from a DataLoader, opened
    where they are iterated (a shard task's machine). Picklable."""

    def __init__(self, samples: list, transform: Any, batch_size: int, num_workers: int):
        self.samples, self.transform = samples, transform
        self.batch_size, self.num_workers = batch_size, num_workers

    def __iter__(self):
        loader = make_loader(self.samples, self.transform, self.batch_size, self.num_workers, False)
        with iterate_batches(loader) as batches:
            yield from batches


def _shard_runner(config: Config):
    """Runs shard tasks the way the configured engine runs objects."""
    from ..distributed.ray_runner import run_local, run_ray

    if config.execution.engine == "ray":
        options = ray_options(config)
        return lambda function, items: run_ray(function, items, options)
    return lambda function, items: run_local(function, items, retries=config.execution.retries)


def ray_options(config: Config):
    from ..distributed.ray_runner import RayOptions

    ex = config.execution
    return RayOptions(
        address=ex.address, num_cpus=ex.cpus_per_object, num_gpus=ex.gpus_per_object, retries=ex.retries
    )


def fit_object(
    config: Config,
    obj: ObjectData,
    progress: Progress | None = None,
    train: list | None = None,
    work_dir: Path | None = None,
) -> PatchCore:
    """A fitted estimator for one object on ``train`` (default: all its training images), sharded when
    ``execution.shards`` > 1. ``work_dir``: where the streamed training features go (the run's tmp)."""
    train = list(obj.train) if train is None else train
    if not train:
        raise DataError(f"{obj.name}: no training images")
    seed_everything(config.seed)
    model = build_model(config)
    if work_dir is not None:
        model.work_dir = str(work_dir)
    shards = min(config.execution.shards, len(train))
    if shards > 1:
        from ..distributed.sharded import sharded_fit

        bounds = [round(i * len(train) / shards) for i in range(shards + 1)]
        parts = [
            SampleImages(train[a:b], model.transform, config.model.batch_size, config.data.num_workers)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return sharded_fit(model, parts, _shard_runner(config), config.execution.shard_oversampling)
    if progress is not None:
        progress.start(obj.name, {"extract": len(train)})
    loader = make_loader(train, model.transform, config.model.batch_size, config.data.num_workers, False)
    try:
        with iterate_batches(loader) as batches:
            fit_cached(model, batches, config.model.feature_cache, progress=progress)
    except NonFiniteError as exc:
        raise name_bad_images(exc, train) from None
    return model


def train_object(
    task: ObjectTask, out_dir: Path | None = None, progress: Progress | None = None
) -> ObjectOutput:
    """Fit and evaluate one object. The evaluation's files go to ``out_dir``; None (a worker): to a
    temporary folder, returned in ``files`` for the driver to write.

    With ``out_dir`` (the run folder, local runs) the model file is saved as soon as it is fitted and the
    object marked ``fitted``: an evaluation that fails never loses the fit.
    """
    config, obj = task.config, task.obj
    if task.fitted is not None:
        model = PatchCore.load(task.fitted, device=config.model.device)
    else:
        model = _fit_and_calibrate(config, obj, out_dir, progress)
    # The training-set audit of this fit (app/cmd_audit.py; a model loaded from an earlier fit has none).
    train_samples = split_calibration(obj, config.evaluation.calibration_fraction, config.seed)[0]
    audit_outputs = training_audit_files(model, train_samples, obj.name)
    stats = model.stats_.to_dict()
    metrics: dict[str, float | None] = {}
    files: dict[str, bytes] = {}
    if config.evaluation.enabled:
        if progress is not None:
            progress.start(obj.name, {"predict": len(obj.test)})
        temporary = out_dir is None
        target = Path(tempfile.mkdtemp(prefix="patchcore-eval-")) if temporary else out_dir
        try:
            metrics, eval_stats, model.evaluation_ = evaluate_object(
                model, obj, target, evaluation_settings(config), progress
            )
            if temporary:
                files = {
                    p.relative_to(target).as_posix(): p.read_bytes()
                    for p in sorted(target.rglob("*"))
                    if p.is_file()
                }
        finally:
            if temporary:
                shutil.rmtree(target, ignore_errors=True)
        stats.update(eval_stats)
    files.update(audit_outputs)
    metadata = model_record(model, obj.name, stats, metrics)
    return ObjectOutput(obj.name, model.state_dict(), metadata, metrics, stats, files)


def _fit_and_calibrate(config: Config, obj: ObjectData, out_dir: Path | None, progress: Progress | None) -> PatchCore:
    """Fit one object (and calibrate it on its held-out good images). With ``out_dir`` and an evaluation to
    come, the model file is saved at once, its fitted record written and the object marked ``fitted``."""
    train_samples, calibration_samples = split_calibration(obj, config.evaluation.calibration_fraction, config.seed)
    work_dir = run_temp_dir(out_dir) if out_dir is not None else None
    model = fit_object(config, obj, progress, train_samples, work_dir)
    model.stats_ = replace(model.stats_, object=obj.name)
    if calibration_samples:
        calibrate_fitted(
            model, calibration_samples, config.evaluation.false_alarm_rate,
            f"{obj.name}: {len(calibration_samples)} held-out good images",
        )  # fmt: skip
    if out_dir is not None and config.evaluation.enabled:
        model.save(object_paths(out_dir, obj.name)["model"])  # rewritten with the evaluation's records
        write_fitted(out_dir, obj.name, config_hash(config))
        mark_object(out_dir, obj.name, "fitted")
    return model


def model_record(
    model: PatchCore, name: str, stats: dict[str, Any], metrics: dict[str, float | None]
) -> dict[str, Any]:
    """The ``patchcore_<object>.json`` written beside a model file: what a person or a tool reads."""
    return {
        "object": name,
        "params": model.get_params(),
        "stats": stats,
        "metrics": metrics,
        "calibration": {} if model.calibration_ is None else model.calibration_.to_dict(),
        "evaluation": {} if model.evaluation_ is None else model.evaluation_.to_dict(),
        "weights_id": model.weights_id_,
    }


def train(
    config: Config, online: str | None = None, resume: str | Path | None = None, restart_changed: bool = False
) -> RunSummary:
    """Fit, save and (optionally) evaluate one model per object; write the summary reports.

    ``resume``: the folder of an interrupted run to continue: objects finished with the same config hash
    are kept, a saved and verified model whose evaluation did not finish is evaluated only, the others are
    trained again. A config that differs from the run's in a setting that determines models or metrics is
    refused unless ``restart_changed`` (the log then names each changed key).
    """
    lock: int | None = None
    changes: list[str] = []
    if resume is not None:
        # Refused before anything is read or written: a folder that is not a run, a run another process is
        # writing (its lock), a changed configuration.
        run_dir = check_run_folder(resume)
        lock = lock_run(run_dir)
    try:
        if resume is not None:
            changes = config_changes(run_dir, config)
            if changes and not restart_changed:
                raise ConfigError(
                    f"--resume {run_dir}: the configuration differs from the run's in {len(changes)} setting(s) "
                    f"({'; '.join(changes)}); pass --restart-changed to retrain under the new one, or resume "
                    "without them"
                )
        # Bad input (missing data folder, an unreadable image or mask, images that cannot be batched, tracker
        # not installed, a Ray address that cannot be reached) fails before a run folder is taken.
        objects = load_objects(config)
        check_calibration_settings(config.evaluation.calibration_fraction, config.evaluation.false_alarm_rate)
        check_objects(objects, build_model(config), train=True, test=config.evaluation.enabled)
        # The backbone's weights are on this machine (downloaded now on first use) before the run folder.
        ensure_weights(config.model.backbone, config.model.weights, progress=config.logging.progress)
        check_tracker(online or config.logging.online)
        if config.execution.engine == "ray":
            from ..distributed.ray_runner import check_ray_address

            check_ray_address(config.execution.address)
        if resume is None:
            run_dir = make_run_dir(config.output_dir, config.project, config.group)
            lock = lock_run(run_dir)
        try:
            return _train_in(run_dir, config, objects, online, resume, changes)
        finally:
            shutil.rmtree(run_dir / "tmp", ignore_errors=True)  # the streamed features of this run
    finally:
        unlock_run(lock)


def _train_in(
    run_dir: Path,
    config: Config,
    objects: list[ObjectData],
    online: str | None,
    resume: str | Path | None,
    changes: list[str],
) -> RunSummary:
    import yaml

    config_text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    start_run(run_dir, [o.name for o in objects], config.logging.level, config_text)
    log.info("%s folder: %s", "resuming run" if resume is not None else "run", run_dir)
    for change in changes:
        log.warning("--restart-changed: %s", change)
    log.info("data: %s, objects: %s", config.data.kind, ", ".join(o.name for o in objects))
    digest = config_hash(config)
    header = run_header(config)
    done: dict[str, ObjectResult] = {}
    fitted: dict[str, Path] = {}
    if resume is not None:
        for name in sorted(set(recorded_objects(run_dir)) - {o.name for o in objects}):
            forget_object(run_dir, name)
            log.warning("%s: not in this configuration's data: its model and records removed", name)
    for obj in objects:
        kept = completed_result(run_dir, obj.name, digest) if resume is not None else None
        saved = None
        if kept is None and resume is not None and config.execution.engine != "ray":
            saved = fitted_model(run_dir, obj.name, digest)
        if kept is not None:
            done[obj.name] = kept[0]
            header["layers"] = kept[1]["layers"]
            mark_object(run_dir, obj.name, "done")
            log.info("%s: finished before with this config, kept", obj.name)
        elif saved is not None:
            forget_object(run_dir, obj.name, keep_fitted=True)
            fitted[obj.name] = saved
            mark_object(run_dir, obj.name, "fitted")
            log.info("%s: fitted before with this config (model file verified): evaluated, not refitted", obj.name)
        else:
            forget_object(run_dir, obj.name)
    todo = [o for o in objects if o.name not in done]
    tracker = make_tracker(
        online or config.logging.online, config.project, run_dir.name, config_to_dict(config), run_dir
    )
    failures: list[str] = []

    def finish(output: ObjectOutput) -> None:
        result = write_object(run_dir, output, digest)
        mark_object(run_dir, output.name, "done")
        done[output.name] = result
        header["layers"] = list(output.state["params"]["layers"])  # the resolved layers
        tracker.log_object(output.name, {**output.metrics, **output.stats})
        log.info("%s: %s", output.name, metrics_line(output.metrics, output.stats))
        # Reports after every object: an interrupted run keeps what it finished.
        write_reports(run_dir, [done[o.name] for o in objects if o.name in done], header)

    try:
        if config.execution.engine == "ray":
            failures = _train_on_ray(config, todo, finish)
        else:
            with Progress(config.logging.progress) as progress:
                for obj in todo:
                    if obj.name not in fitted:
                        log.info("%s: fitting on %d good images", obj.name, _n_train(config, obj))
                    finish(train_object(ObjectTask(config, obj, fitted.get(obj.name)), run_dir, progress))
        results = [done[o.name] for o in objects if o.name in done]
        reports = write_reports(run_dir, results, header)
        means = mean_metrics(results)
        tracker.log_summary(means)
    finally:
        tracker.finish()
    log.info("mean: %s", metrics_line(means, {}))
    log.info("summary: %s", reports["markdown"])
    if not failures:
        finish_run(run_dir)
    if failures:
        raise ObjectsFailedError(
            f"{len(failures)} of {len(objects)} objects failed ({'; '.join(failures)}); the others are in "
            f"{run_dir}: `patchcore train --resume {run_dir}` retrains only the failed ones"
        )
    return RunSummary(run_dir, results, means, reports)


def _n_train(config: Config, obj: ObjectData) -> int:
    """Training images of an object after the calibration hold-out."""
    return len(split_calibration(obj, config.evaluation.calibration_fraction, config.seed)[0])


def _train_on_ray(config: Config, objects: list[ObjectData], finish) -> list[str]:
    """Objects as Ray tasks; each finished one is written as it arrives. Returns the failures."""
    from ..distributed.ray_runner import Outcome, run_ray

    failures: list[str] = []

    def on_done(outcome: Outcome) -> None:
        obj = objects[outcome.item]
        if outcome.ok:
            finish(outcome.value)
            reserved = ", ".join(f"{k} {v:g}" for k, v in sorted((outcome.resources or {}).items()))
            log.info(
                "%s: trained in %.1f s on Ray node %s (reserved: %s)",
                obj.name, outcome.seconds, outcome.node, reserved or "nothing",
            )  # fmt: skip
        else:
            failures.append(f"{obj.name}: {outcome.error}")
            log.error("%s: failed after %d attempt(s): %s", obj.name, outcome.attempts, outcome.error)

    def on_retry(outcome: Outcome) -> None:
        log.warning(
            "%s: attempt %d failed (%s); retrying",
            objects[outcome.item].name,
            outcome.attempts,
            outcome.error,
        )

    for obj in objects:
        if not obj.train:
            raise DataError(f"{obj.name}: no training images")
        log.info("%s: fitting on %d good images (Ray task)", obj.name, _n_train(config, obj))
    tasks = [ObjectTask(config, obj) for obj in objects]
    run_ray(train_object, tasks, ray_options(config), on_done=on_done, on_retry=on_retry)
    return failures

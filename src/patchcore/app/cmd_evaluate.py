"""``patchcore evaluate``: re-score saved models on the test split of a configured data set."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import DataError, ObjectData
from ..engine.model import ModelFileError, PatchCore
from ..evaluation.evaluate import evaluate_object
from ..evaluation.reports import ObjectResult, mean_metrics, write_reports
from ..fileio import safe_name
from .config import Config
from .runs import (
    INCOMPLETE_MARKER,
    Progress,
    finish_run,
    lock_run,
    make_run_dir,
    mark_object,
    metrics_line,
    run_state,
    start_run,
    unlock_run,
)
from .train import RunSummary, check_objects, evaluation_settings, load_objects, run_header

__all__ = ["check_model_complete", "evaluate_models", "model_files"]

log = logging.getLogger("patchcore")


def model_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Model files given directly, or ``patchcore_*.pt`` in given folders (or their ``models/``)."""
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


def check_model_complete(path: Path) -> None:
    """Refuse a model file of a run that did not finish it (its run folder's ``incomplete`` marker has the
    object still pending: the file may be from before a crash, or another run's leftover)."""
    run_dir = path.parent.parent if path.parent.name == "models" else path.parent
    if not (run_dir / INCOMPLETE_MARKER).exists():
        return
    state = run_state(run_dir)
    stem = path.stem.removeprefix("patchcore_")
    usable = [name for name in state.objects if safe_name(name) == stem and state.model_usable(name)]
    if not usable:
        raise ModelFileError(
            f"model {path} belongs to run {run_dir}, which did not finish fitting it ({run_dir / INCOMPLETE_MARKER} "
            "is present and the object is not recorded as fitted); re-train it (train --resume) or use a model "
            "from a finished run"
        )


def _model_settings(models: list[PatchCore]) -> dict[str, Any]:
    """The report header's backbone / layers / sampler, from the models evaluated (not the config)."""

    def one(values: list[Any]) -> Any:
        distinct = {json.dumps(v, sort_keys=True) for v in values}
        return values[0] if len(distinct) == 1 else "varies: " + ", ".join(sorted(distinct))

    return {
        "backbone": one([m.backbone for m in models]),
        "layers": one([list(m.layers_) for m in models]),
        "sampler": one([f"{m.sampler} {m.percentage:g}" for m in models]),
        "weights_id": one([m.weights_id_ for m in models]),
    }


def evaluate_models(
    config: Config,
    model_paths: Sequence[str | os.PathLike],
    device: str = "auto",
    weights: str | os.PathLike | None = None,
) -> RunSummary:
    """Re-evaluate saved models on the test split of the configured data set (object from each model).

    The model files, their runs' completion, the data set and every test image header are checked
    before the evaluation's run folder is created; the report shows the models' own settings.
    """
    files = model_files(model_paths)
    for path in files:
        check_model_complete(path)
    objects = {o.name: o for o in load_objects(config)}
    models = []
    for path in files:
        model = PatchCore.load(path, device=device, weights=weights)
        name = model.stats_.object or path.stem.removeprefix("patchcore_")
        if name not in objects:
            raise DataError(
                f"model {path} is for object {name!r}, not in the data set ({', '.join(objects)})"
            )
        check_objects([objects[name]], model, train=False, test=True)
        models.append(model)
    settings = _model_settings(models)
    if settings["backbone"] != config.model.backbone:
        log.warning(
            "the models were fitted with backbone %s, the configuration names %s: the models' settings are used",
            settings["backbone"], config.model.backbone,
        )  # fmt: skip
    del models  # loaded again one at a time: the banks of many objects need not all be in memory
    run_dir = make_run_dir(config.output_dir, config.project, f"{config.group}_eval")
    lock = lock_run(run_dir)
    try:
        return _evaluate_in(run_dir, config, files, objects, settings, device, weights)
    finally:
        unlock_run(lock)


def _evaluate_in(
    run_dir: Path,
    config: Config,
    files: list[Path],
    objects: dict[str, ObjectData],
    settings: dict[str, Any],
    device: str,
    weights: str | os.PathLike | None,
) -> RunSummary:
    start_run(run_dir, [p.stem.removeprefix("patchcore_") for p in files], config.logging.level)
    results: list[ObjectResult] = []
    header = run_header(config)
    header.update(settings)
    header["models"] = [str(f) for f in files]
    with Progress(config.logging.progress) as progress:
        for path in files:
            model = PatchCore.load(path, device=device, weights=weights)
            name = model.stats_.object or path.stem.removeprefix("patchcore_")
            config.model.batch_size = model.batch_size
            progress.start(name, {"predict": len(objects[name].test)})
            metrics, eval_stats, model.evaluation_ = evaluate_object(
                model, objects[name], run_dir, evaluation_settings(config), progress
            )
            stats = {**model.stats_.to_dict(), **eval_stats}
            results.append(ObjectResult(name, metrics, stats, str(path)))
            log.info("%s: %s", name, metrics_line(metrics, stats))
            reports = write_reports(run_dir, results, header)
            mark_object(run_dir, path.stem.removeprefix("patchcore_"), "done")
    finish_run(run_dir)
    means = mean_metrics(results)
    log.info("mean: %s", metrics_line(means, {}))
    return RunSummary(run_dir, results, means, reports)

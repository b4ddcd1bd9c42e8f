"""``patchcore evaluate``: re-score saved models on the test split of a configured data set."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..data import DataError
from ..engine.model import PatchCore
from ..evaluation.evaluate import evaluate_object
from ..evaluation.reports import ObjectResult, mean_metrics, write_reports
from .config import Config
from .runs import Progress, make_run_dir, metrics_line, setup_logging
from .train import RunSummary, evaluation_settings, load_objects, run_header

__all__ = ["evaluate_models", "model_files"]

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


def evaluate_models(
    config: Config,
    model_paths: Sequence[str | os.PathLike],
    device: str = "auto",
    weights: str | os.PathLike | None = None,
) -> RunSummary:
    """Re-evaluate saved models on the test split of the configured data set (object from each model)."""
    files = model_files(model_paths)
    objects = {o.name: o for o in load_objects(config)}
    run_dir = make_run_dir(config.output_dir, config.project, f"{config.group}_eval")
    setup_logging(run_dir, config.logging.level)
    results: list[ObjectResult] = []
    header = run_header(config)
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
            progress.start(name, {"predict": len(objects[name].test)})
            metrics, eval_stats = evaluate_object(
                model, objects[name], run_dir, evaluation_settings(config), progress
            )
            stats = {**model.stats_, **eval_stats}
            results.append(ObjectResult(name, metrics, stats, str(path)))
            log.info("%s: %s", name, metrics_line(metrics, stats))
            reports = write_reports(run_dir, results, header)
    means = mean_metrics(results)
    log.info("mean: %s", metrics_line(means, {}))
    return RunSummary(run_dir, results, means, reports)

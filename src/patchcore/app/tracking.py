"""Optional experiment tracking: Weights & Biases or MLflow, when installed (extras)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "TrackingError", "check_tracker", "make_tracker"]

log = logging.getLogger("patchcore")


class TrackingError(RuntimeError):
    """The requested tracker cannot be used (its package is missing)."""


class Tracker:
    """No-op tracker: the default."""

    def log_object(self, name: str, metrics: dict[str, Any]) -> None:
        pass

    def log_summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class WandbTracker(Tracker):
    def __init__(self, project: str, group: str, config: dict[str, Any], run_dir: Path):
        # Offline unless the user configured otherwise (WANDB_MODE): runs are synced later with `wandb sync`.
        import os

        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        self._wandb = wandb
        # Passed on as set: wandb.init's annotation omits the legacy modes (dryrun, run) its settings accept.
        self._run = wandb.init(
            project=project, group=group, config=config, dir=str(run_dir), mode=mode  # type: ignore[arg-type]
        )

    def log_object(self, name: str, metrics: dict[str, Any]) -> None:
        self._run.log({f"{name}/{k}": v for k, v in _numeric(metrics).items()})

    def log_summary(self, metrics: dict[str, Any]) -> None:
        for key, value in _numeric(metrics).items():
            self._run.summary[f"mean/{key}"] = value

    def finish(self) -> None:
        self._run.finish()


class MlflowTracker(Tracker):
    def __init__(self, project: str, group: str, config: dict[str, Any], run_dir: Path):
        import os

        import mlflow

        # A local store inside the run folder unless MLFLOW_TRACKING_URI points elsewhere: SQLite when
        # SQLAlchemy is there (full mlflow), else the file store, which MLflow 3 only opens on request.
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            if importlib.util.find_spec("sqlalchemy") is not None:
                mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
            else:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.tracking_uri = mlflow.get_tracking_uri()
        mlflow.set_experiment(project)
        self._mlflow = mlflow
        self._run = mlflow.start_run(run_name=group)
        flat = {}
        for section, values in config.items():
            if isinstance(values, dict):
                flat.update({f"{section}.{k}": str(v) for k, v in values.items()})
            else:
                flat[section] = str(values)
        mlflow.log_params(flat)

    def log_object(self, name: str, metrics: dict[str, Any]) -> None:
        self._mlflow.log_metrics({f"{name}.{k}": v for k, v in _numeric(metrics).items()})

    def log_summary(self, metrics: dict[str, Any]) -> None:
        self._mlflow.log_metrics({f"mean.{k}": v for k, v in _numeric(metrics).items()})

    def finish(self) -> None:
        self._mlflow.end_run()


_TRACKERS = {"wandb": (WandbTracker, "wandb"), "mlflow": (MlflowTracker, "mlflow")}


def check_tracker(kind: str | None) -> None:
    """Raise TrackingError (saying what to install) unless tracker ``kind`` can be used; None is fine."""
    if kind is None:
        return
    if kind not in _TRACKERS:
        raise TrackingError(f"unknown tracker {kind!r}; known: {', '.join(_TRACKERS)}")
    package = _TRACKERS[kind][1]
    if importlib.util.find_spec(package) is None:
        raise TrackingError(
            f"--log-online {kind} needs the package '{package}': pip install 'patchcore[{kind}]' (or pip install {package})"
        )


def make_tracker(
    kind: str | None, project: str, group: str, config: dict[str, Any], run_dir: Path
) -> Tracker:
    """A tracker by name (None: no tracking). A missing package is a TrackingError saying what to install."""
    check_tracker(kind)
    if kind is None:
        return Tracker()
    try:
        return _TRACKERS[kind][0](project, group, config, run_dir)
    except Exception as exc:  # the tracker's own error, e.g. a store it refuses: one clear line
        raise TrackingError(f"cannot start {kind} tracking: {exc}") from exc

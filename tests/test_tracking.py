"""Experiment trackers in their local modes (run when the optional packages are installed)."""

from __future__ import annotations

import importlib.util

import pytest

from patchcore.app.tracking import Tracker, TrackingError, make_tracker

CONFIG = {"model": {"backbone": "resnet18", "percentage": 0.1}, "seed": 0}


def test_no_tracker_is_a_silent_no_op(tmp_path):
    tracker = make_tracker(None, "p", "g", CONFIG, tmp_path)
    assert type(tracker) is Tracker
    tracker.log_object("a", {"image_auroc": 1.0})
    tracker.finish()


def test_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(TrackingError, match="unknown tracker"):
        make_tracker("tensorboard", "p", "g", CONFIG, tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="mlflow not installed (extra 'mlflow')"
)
def test_mlflow_logs_metrics_to_a_local_store_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = make_tracker("mlflow", "proj", "group", CONFIG, tmp_path)
    tracker.log_object("bottle", {"image_auroc": 0.9, "pixel_auroc": None, "n_patches": 100})
    tracker.log_summary({"image_auroc": 0.9, "pixel_auroc": None})
    tracker.finish()
    from mlflow.tracking import MlflowClient

    store = tracker.tracking_uri
    assert str(tmp_path) in store
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("proj")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["bottle.image_auroc"] == pytest.approx(0.9)
    assert run.data.metrics["mean.image_auroc"] == pytest.approx(0.9)
    assert "bottle.pixel_auroc" not in run.data.metrics  # n/a is not logged as a number
    assert run.data.params["model.backbone"] == "resnet18"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (extra 'wandb')")
def test_wandb_runs_offline_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = make_tracker("wandb", "proj", "group", CONFIG, tmp_path)
    tracker.log_object("bottle", {"image_auroc": 0.9})
    tracker.log_summary({"image_auroc": 0.9})
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))

"""``patchcore calibrate``: set a model's decision threshold from a folder of good images, and the
training-time hold-out (``evaluation.calibration_fraction`` or a data set's validation images)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data import ObjectData, Sample
from ..data.loading import expand_images
from ..deploy.calibration import CalibrationError, calibrate, describe_calibration
from ..deploy.inference import Predictor
from ..engine.model import PatchCore
from ..engine.records import Calibration

__all__ = ["calibrate_fitted", "calibrate_model_file", "check_calibration_settings", "split_calibration"]

log = logging.getLogger("patchcore")


def check_calibration_settings(fraction: float, false_alarm_rate: float) -> None:
    """Refuse unusable calibration settings before a run starts."""
    if not 0.0 <= fraction < 1.0:
        raise CalibrationError(f"evaluation.calibration_fraction must be in [0, 1), got {fraction}")
    if not 0.0 < false_alarm_rate < 1.0:
        raise CalibrationError(f"evaluation.false_alarm_rate must be in (0, 1), got {false_alarm_rate}")


def split_calibration(obj: ObjectData, fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples, calibration samples) of an object.

    A data set's own validation images of good parts (MVTec LOCO's validation/good: ``obj.validation``)
    are used when present; otherwise ``fraction`` of train/good is held out (seeded random choice, at
    least one image kept for training). ``fraction`` 0 and no validation images: no calibration.
    """
    validation = list(getattr(obj, "validation", None) or [])
    if validation:
        return list(obj.train), [s for s in validation if not s.is_anomalous]
    if fraction <= 0:
        return list(obj.train), []
    if fraction >= 1:
        raise CalibrationError(f"evaluation.calibration_fraction must be below 1, got {fraction}")
    n = len(obj.train)
    n_hold = min(n - 1, max(1, round(n * fraction)))
    if n_hold < 1:
        raise CalibrationError(f"{obj.name}: {n} training image(s) are too few to hold some out")
    held = set(np.random.default_rng(seed).choice(n, size=n_hold, replace=False).tolist())
    train = [s for i, s in enumerate(obj.train) if i not in held]
    return train, [s for i, s in enumerate(obj.train) if i in held]


def calibrate_fitted(
    model: PatchCore, samples: Sequence[Sample], false_alarm_rate: float, source: str
) -> Calibration:
    """Calibrate a fitted model on good samples; sets and returns ``model.calibration_``."""
    predictor = Predictor(model)
    model.calibration_ = calibrate(
        predictor, [s.image_path for s in samples], false_alarm_rate, source, model.batch_size
    )
    log.info("%s", describe_calibration(model.calibration_))
    return model.calibration_


def calibrate_model_file(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    false_alarm_rate: float = 0.01,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    weights: str | os.PathLike | None = None,
    batch_size: int | None = None,
) -> tuple[Path, Calibration]:
    """Calibrate a saved model on good images; write it back (or to ``out``). Returns (path, record)."""
    if not 0.0 < false_alarm_rate < 1.0:
        raise CalibrationError(f"--false-alarm-rate must be in (0, 1), got {false_alarm_rate}")
    model = PatchCore.load(model_path, device=device, weights=weights)
    paths = expand_images(inputs)  # bad paths fail here, before any work
    source = ", ".join(str(Path(p)) for p in inputs)
    if len(paths) + 1 < 1 / false_alarm_rate:
        log.warning(
            "%d good images cannot certify a false-alarm rate of %g (needs at least %d): the threshold is "
            "the largest good score",
            len(paths), false_alarm_rate, int(np.ceil(1 / false_alarm_rate - 1)),
        )  # fmt: skip
    model.calibration_ = calibrate(Predictor(model), paths, false_alarm_rate, source, batch_size)
    target = model.save(out or model_path)
    return target, model.calibration_

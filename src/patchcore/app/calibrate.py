"""``patchcore calibrate``: set a model's decision threshold from a folder of good images, and the
training-time hold-out (``evaluation.calibration_fraction`` or a data set's validation images)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..data import ObjectData, Sample
from ..data.loading import expand_images
from ..deploy.calibration import CalibrationError, calibrate, describe_calibration
from ..deploy.inference import Predictor
from ..engine.model import PatchCore
from ..engine.records import Calibration, file_sha256

__all__ = [
    "calibrate_fitted",
    "calibrate_model_file",
    "check_calibration_settings",
    "check_model_target",
    "distinct_images",
    "split_calibration",
]

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


def check_model_target(target: Path) -> None:
    """Refuse, before any scoring, a model file calibrate may not replace: a folder, a read-only file (mode
    without any write bit: the owner asked for it to stay as it is, and root ignores permissions), or a
    file in a folder nobody may create files in."""
    if target.is_dir():
        raise CalibrationError(f"{target} is a folder; --out takes a model file path")
    if target.exists():
        mode = target.stat().st_mode
        if not mode & 0o222 or not os.access(target, os.W_OK):
            raise CalibrationError(
                f"model file {target} is read-only (mode {stat.S_IMODE(mode):04o}); make it writable, or write "
                "the calibrated model elsewhere with --out"
            )
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CalibrationError(f"cannot write {target}: {folder} is a file, not a folder")
    try:  # a probe file, not os.access (wrong for root and for read-only mounts)
        with tempfile.TemporaryFile(dir=folder, prefix=".patchcore-probe-"):
            pass
    except OSError as exc:
        raise CalibrationError(f"cannot write {target}: folder {folder} is not writable ({exc.strerror or exc})") from None


def distinct_images(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with repeats left out: the same file given twice, or two files of identical content (by
    SHA-256), count once (the first is kept). A calibration's guarantee needs distinct good images."""
    seen: dict[str | None, Path] = {}
    kept: list[Path] = []
    for path in paths:
        digest = _content_digest(path)
        if digest not in seen:
            seen[digest] = path
            kept.append(path)
    if len(kept) < len(paths):
        log.warning(
            "%d image files given, %d distinct images (%d repeats of the same content left out)",
            len(paths), len(kept), len(paths) - len(kept),
        )  # fmt: skip
    return kept


def _content_digest(path: Path) -> str | None:
    return file_sha256(path) if path.exists() else None


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock; released when the block ends or the process dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def calibrate_model_file(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    false_alarm_rate: float = 0.01,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    weights: str | os.PathLike | None = None,
    batch_size: int | None = None,
) -> tuple[Path, Calibration]:
    """Calibrate a saved model on good images; write it back (or to ``out``). Returns (path, record).

    Refused before any scoring: a rate outside (0, 1), a batch size below 1, a model file that cannot be
    replaced (:func:`check_model_target`). Repeated images count once (:func:`distinct_images`). The file is
    replaced by compare-and-swap: under a lock of its folder, only if its content is still what it was when
    this calibration started; otherwise (another calibration, or a training, wrote it meanwhile) nothing is
    written and the command says so, so two concurrent calibrations never lose one silently.
    """
    if not 0.0 < false_alarm_rate < 1.0:
        raise CalibrationError(f"--false-alarm-rate must be in (0, 1), got {false_alarm_rate}")
    if batch_size is not None and batch_size < 1:
        raise CalibrationError(f"--batch-size must be >= 1, got {batch_size}")
    target = Path(out or model_path)
    check_model_target(target)
    before = _content_digest(target)
    model = PatchCore.load(model_path, device=device, weights=weights)
    paths = distinct_images(expand_images(inputs))  # bad paths fail here, before any work
    source = ", ".join(str(Path(p)) for p in inputs)
    if len(paths) + 1 < 1 / false_alarm_rate:
        log.warning(
            "%d good images cannot certify a false-alarm rate of %g (needs at least %d): the threshold is "
            "the largest good score",
            len(paths), false_alarm_rate, int(np.ceil(1 / false_alarm_rate - 1)),
        )  # fmt: skip
    previous = model.calibration_ if target == Path(model_path) else None
    model.calibration_ = calibrate(Predictor(model), paths, false_alarm_rate, source, batch_size)
    with _folder_lock(target.parent if target.parent.exists() else Path(".")):
        if _content_digest(target) != before:
            raise CalibrationError(
                f"{target} changed while this calibration ran (another calibration or a training wrote it); "
                "nothing written: run calibrate again"
            )
        if previous:
            log.warning("this calibration replaces the one in %s: %s", target, describe_calibration(previous))
        elif before is not None and target != Path(model_path):
            log.warning("--out %s existed and is replaced by the calibrated model", target)
        model.save(target)
    return target, model.calibration_

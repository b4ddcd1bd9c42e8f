"""``patchcore update / history / rollback``: teach a saved model more good images, list what it was taught,
and undo (back to a version, or one update out).

Every command checks its input before any work (the model file, the images, the version) and writes the
model file atomically (a reader never sees half a file); a refused update writes nothing. After a change the
calibration is brought up to date when its good images are still where it found them (same SHA-256), else
the model says plainly that its threshold predates the change (``patchcore.deploy.calibration``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.loading import expand_images
from ..deploy.calibration import describe_calibration, refresh_calibration
from ..deploy.inference import Predictor
from ..engine.model import PatchCore
from ..engine.records import Calibration, UpdateRecord
from ..engine.updates import UpdateError, UpdateRule

__all__ = ["ChangeOutcome", "history_text", "rollback_model_file", "update_model_file"]

log = logging.getLogger("patchcore")


@dataclass(frozen=True)
class ChangeOutcome:
    """What an update / rollback / removal did: the file written, the model's version and bank size now,
    the update's record (for ``update``), and what happened to the calibration."""

    path: Path
    version: int
    bank_rows: int
    record: UpdateRecord | None
    calibration: Calibration | None
    calibration_note: str


def _check_out(model_path: str | os.PathLike, out: str | os.PathLike | None) -> Path:
    target = Path(out) if out is not None else Path(model_path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--out {target}: folder {target.parent} does not exist")
    return target


def update_model_file(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    note: str | None = None,
    force: bool = False,
    guard: float | None = 2.0,
    until: str | float | int = "radius",
    out: str | os.PathLike | None = None,
    device: str = "auto",
    weights: str | os.PathLike | None = None,
    batch_size: int | None = None,
) -> ChangeOutcome:
    """``partial_fit`` a saved model on good images (files or folders), refresh its calibration where its
    good images are reachable, and write it back (or to ``out``)."""
    UpdateRule.parse(until)  # bad settings fail before the model is read
    if guard is not None and not guard > 0:
        raise UpdateError(f"--guard must be > 0, got {guard}")
    target = _check_out(model_path, out)
    model = PatchCore.load(model_path, device=device, weights=weights)
    paths = expand_images(inputs)  # missing files and empty folders fail here, before any work
    if batch_size is not None:
        model.set_params(batch_size=batch_size)
    record = model.partial_fit([str(p) for p in paths], note=note, force=force, guard=guard, until=until)
    calibration, line = refresh_calibration(Predictor(model), batch_size)
    model.save(target)
    log.info("%s: version %d, %d bank rows; %s", target, model.version_, len(model.memory_bank_), line)
    return ChangeOutcome(target, model.version_, len(model.memory_bank_), record, calibration, line)


def rollback_model_file(
    model_path: str | os.PathLike,
    *,
    to: int | None = None,
    remove: int | None = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    weights: str | os.PathLike | None = None,
) -> ChangeOutcome:
    """Roll a saved model back to version ``to``, or take update ``remove`` out (exactly one of the two)."""
    if (to is None) == (remove is None):
        raise UpdateError("give exactly one of --to VERSION and --remove VERSION")
    target = _check_out(model_path, out)
    model = PatchCore.load(model_path, device=device, weights=weights)
    if to is not None:
        model.rollback(to)
    else:
        assert remove is not None
        model.remove_update(remove)
    calibration, line = refresh_calibration(Predictor(model))
    model.save(target)
    return ChangeOutcome(target, model.version_, len(model.memory_bank_), None, calibration, line)


def history_text(model: PatchCore) -> str:
    """The model's history as a table people read: the fit, then every update."""
    space = model.coreset_space_
    radius = "not recorded" if space is None else f"{space.radius:.4g}"
    lines = [
        f"version {model.version_}; bank {len(model.memory_bank_)} rows "
        f"({model.stats_.memory_size} from the fit of {model.stats_.n_train_images} images); "
        f"covering radius at fit {radius}",
        f"calibration: {describe_calibration(model.calibration_, model)}",
        "",
        "| version | time (UTC) | images | rows added | radius before -> after | rule | max score / guard "
        "| forced | note | removed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in model.history_:
        guard = "none" if r.guard_limit is None else f"{r.guard_limit:.4g}"
        lines.append(
            f"| {r.version} | {r.time} | {r.n_images} | {r.rows_added} | {r.radius_before:.4g} -> "
            f"{r.radius_after:.4g} | {r.rule} | {r.max_score:.4g} / {guard} | {'yes' if r.forced else 'no'} "
            f"| {_cell(r.note)} | {r.removed or ''} |"
        )
    if not model.history_:
        lines.append("| (no updates) | | | | | | | | | |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")

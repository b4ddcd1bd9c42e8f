"""The training-set audit as a user meets it (issue 21; the computation is ``engine/audit.py``).

After every fit, ``audit/<object>.json`` (ranked training images, the rule, the threshold), ``audit/<object>.csv``
(every training image's score) and ``audit/<object>/NN_<name>.png`` (image | map of the most suspicious images)
go into the run folder; the reports list them and the run log warns when some images stand out.
``patchcore audit DIR`` runs the same audit on a folder of images without training.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DataError, load_image
from ..data.loading import expand_images
from ..engine.audit import DenoisePlan, TrainingAudit, audit_features, image_ids_for
from ..engine.model import PatchCore
from ..engine.scoring import anomaly_maps
from ..engine.store import FeatureStore
from ..fileio import safe_name
from ..heatmaps import normalize_maps, overlay

__all__ = [
    "AUDIT_LISTED",
    "audit_files",
    "audit_folder",
    "audit_record",
    "audit_table",
    "describe_audit",
    "log_audit",
    "run_audit_command",
    "training_audit_files",
]

log = logging.getLogger("patchcore")

AUDIT_LISTED = 20  # training images listed in the record (every image is in the CSV)


def audit_record(audit: TrainingAudit, names: Sequence[str], object_name: str) -> dict[str, Any]:
    """The JSON record of an audit: the rule, the threshold, the suspects and the top of the ranking."""
    listed = [int(i) for i in audit.ranking[:AUDIT_LISTED]]
    maps = {int(i): _map_name(object_name, rank, names[int(i)]) for rank, i in enumerate(audit.maps)}
    return {
        "object": object_name,
        "rule": audit.rule,
        "method": audit.method,
        "threshold": float(audit.threshold),
        "n_images": len(audit.image_scores),
        "median_score": float(np.median(audit.image_scores)),
        "suspects": [str(names[i]) for i in audit.suspects],
        "seconds": round(audit.seconds, 3),
        "ranking": [
            {
                "rank": rank + 1,
                "image": str(names[i]),
                "score": float(audit.image_scores[i]),
                "suspect": i in audit.suspects,
                "map": maps.get(i),
                # coreset audit: the score is above the exact leave-one-image-out score by at most this
                **({} if audit.bounds is None else {"bound": float(audit.bounds[i])}),
            }
            for rank, i in enumerate(listed)
        ],
    }


def _map_name(object_name: str, rank: int, name: str) -> str:
    return f"audit/{safe_name(object_name)}/{rank + 1:02d}_{safe_name(Path(str(name)).stem)}.png"


def audit_files(
    audit: TrainingAudit, paths: Sequence[str | os.PathLike], model: PatchCore, object_name: str
) -> dict[str, bytes]:
    """The files of an audit, relative to the run folder: JSON record, CSV of all scores, map pictures."""
    names = [str(p) for p in paths]
    record = audit_record(audit, names, object_name)
    files = {f"audit/{safe_name(object_name)}.json": (json.dumps(record, indent=2) + "\n").encode()}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "image", "score", "suspect"])
    for rank, i in enumerate(audit.ranking):
        writer.writerow([rank + 1, names[i], f"{audit.image_scores[i]:.6f}", int(i in audit.suspects)])
    files[f"audit/{safe_name(object_name)}.csv"] = buffer.getvalue().encode()
    if audit.maps and audit.patch_grid is not None:
        grids = [np.asarray(m, dtype=np.float32).reshape(audit.patch_grid) for m in audit.maps.values()]
        low = float(np.median(audit.image_scores)) * 0.5  # one colour range for all maps of the object
        high = max(float(g.max()) for g in grids)
        for rank, (i, grid) in enumerate(zip(audit.maps, grids, strict=True)):
            files[_map_name(object_name, rank, names[i])] = _map_picture(paths[i], grid, model, low, high)
    return files


def _map_picture(
    path: str | os.PathLike, grid: np.ndarray, model: PatchCore, low: float, high: float
) -> bytes:
    from PIL import Image

    image = load_image(Path(path)).convert("RGB")
    height, width = model.input_size_
    size = (int(height), int(width))
    smooth = anomaly_maps(grid[None], size, model.smoothing_sigma)[0]
    unit = normalize_maps(model.transform.to_original(smooth, (image.height, image.width)), low, high)
    canvas = Image.new("RGB", (image.width * 2, image.height))
    canvas.paste(image, (0, 0))
    canvas.paste(overlay(image, unit), (image.width, 0))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def describe_audit(audit: TrainingAudit, names: Sequence[str]) -> str:
    """One line for the log: the suspects (or that none stands out)."""
    if not audit.suspects:
        return (
            f"training-set audit: no training image stands out (threshold {audit.threshold:.4g}, "
            f"{audit.rule}; {audit.seconds:.1f} s)"
        )
    shown = ", ".join(f"{names[i]} ({audit.image_scores[i]:.4g})" for i in audit.suspects[:5])
    more = f" and {len(audit.suspects) - 5} more" if len(audit.suspects) > 5 else ""
    return (
        f"training-set audit: {len(audit.suspects)} training image(s) look unlike all the others (score above "
        f"{audit.threshold:.4g} = {audit.rule}); check them for defects: {shown}{more}"
    )


def log_audit(
    audit: TrainingAudit | None, plan: DenoisePlan | None, names: Sequence[str], object_name: str
) -> None:
    """Warn in the run log about suspects and about images the robust fit left out."""
    if audit is not None:
        level = logging.WARNING if audit.suspects else logging.INFO
        log.log(level, "%s: %s", object_name, describe_audit(audit, names))
    if plan is not None:
        log.info(
            "%s: denoise left %d outlier patches out of the coreset's candidates (threshold %.4g)",
            object_name, plan.outlier_patches, plan.threshold,
        )  # fmt: skip
        if plan.dropped_images:
            log.warning(
                "%s: denoise left %d training image(s) out of the memory bank (more than %d %% of their "
                "patches are outliers): %s",
                object_name, len(plan.dropped_images), round(100 * plan.drop_share),
                ", ".join(str(names[i]) for i in plan.dropped_images),
            )  # fmt: skip


def audit_folder(
    inputs: Sequence[str | os.PathLike], model: PatchCore, work_dir: str | os.PathLike | None = None
) -> tuple[TrainingAudit, list[Path]]:
    """The audit of a folder (or files) of images, without training: (audit, the image paths in order)."""
    paths = expand_images(inputs)
    if len(paths) < 2:
        raise DataError(
            f"the audit compares images with each other: need at least 2 images, got {len(paths)}"
        )
    folder = Path(tempfile.mkdtemp(prefix="patchcore-audit-", dir=work_dir))
    try:
        store = FeatureStore(folder / "features.f32", durable=False)  # scratch: removed below
        meta = model.extract_features([str(p) for p in paths], store)
        features = store.array()
        model.input_size_ = tuple(int(s) for s in meta["input_size"])  # for the map pictures
        audit = audit_features(
            features,
            image_ids_for(meta["n_images"], len(features)),
            tuple(meta["patch_grid"]),
            seed=model.seed,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return audit, list(paths)


def audit_table(audit: TrainingAudit, names: Sequence[str], top: int) -> str:
    """The ranked table ``patchcore audit`` prints."""
    lines = [f"{'rank':>4}  {'score':>10}  {'':7}  image"]
    for rank, i in enumerate(audit.ranking[:top]):
        flag = "SUSPECT" if i in audit.suspects else ""
        lines.append(f"{rank + 1:>4}  {audit.image_scores[i]:>10.4f}  {flag:7}  {names[i]}")
    lines.append(
        f"threshold {audit.threshold:.4f} ({audit.rule}); {len(audit.suspects)} suspect(s) of {len(names)}"
    )
    return "\n".join(lines)


def training_audit_files(model: PatchCore, samples: Sequence[Any], object_name: str) -> dict[str, bytes]:
    """After a fit: log the audit (and what denoise left out) and return its files for the run folder."""
    audit = getattr(model, "audit_", None)
    paths = [s.image_path for s in samples]
    names = [str(p) for p in paths]
    if audit is not None and len(audit.image_scores) != len(names):
        audit = None  # not the fit of these samples (a sharded fit has no audit either)
    log_audit(audit, getattr(model, "denoise_plan_", None), names, object_name)
    return {} if audit is None else audit_files(audit, paths, model, object_name)


def run_audit_command(
    model: PatchCore, inputs: Sequence[str], top: int, as_json: bool, out: str | os.PathLike | None
) -> str:
    """``patchcore audit``: the audit of ``inputs`` with ``model``'s settings (unfitted: its backbone only);
    returns the text to print (a ranked table, or JSON) and writes the files into ``out`` when given."""
    from ..fileio import atomic_write_bytes

    if not inputs:
        raise DataError("patchcore audit: no image files or folders given")
    paths = expand_images(inputs)  # bad input fails here, before the backbone runs
    audit, paths = audit_folder(paths, model)
    names = [str(p) for p in paths]
    if out is not None:
        for relative, content in audit_files(audit, paths, model, "audit").items():
            atomic_write_bytes(Path(out) / relative, content)
    if as_json:
        record = audit_record(audit, names, "audit")
        record["ranking"] = [
            {
                "rank": r + 1,
                "image": names[i],
                "score": float(audit.image_scores[i]),
                "suspect": i in audit.suspects,
            }
            for r, i in enumerate(audit.ranking[:top])
        ]
        return json.dumps(record, indent=2)
    return audit_table(audit, names, top)

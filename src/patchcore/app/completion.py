"""Completion records of a training run: what ``patchcore train --resume`` trusts.

After an object's files are all written, ``completed/<object>.json`` records the config hash (of the settings
that determine its model and metrics) and the SHA-256 of its model and metadata files. A resumed run keeps an
object only when its record matches both; anything else is forgotten (record first) and redone.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..evaluation.reports import ObjectResult
from ..fileio import atomic_write, atomic_write_json, safe_name
from .config import Config, config_to_dict
from .runs import mark_object

__all__ = ["ObjectOutput", "completed_result", "config_hash", "forget_object", "object_paths", "write_object"]


# Keys that change what an object's model or metrics are; the rest (names, logging, where and how it runs,
# worker counts, the feature cache) do not, and may differ between a run and its resumption.
_NEUTRAL_KEYS = {
    "": ("project", "group", "output_dir", "logging", "federated"),
    "data": ("num_workers",),
    "model": ("feature_cache", "search_threads", "device"),
    "execution": ("engine", "address", "cpus_per_object", "gpus_per_object", "retries"),
}


def config_hash(config: Config) -> str:
    """SHA-256 of the settings that determine each object's model and metrics."""
    data = config_to_dict(config)
    for section, keys in _NEUTRAL_KEYS.items():
        node = data if not section else data[section]
        for key in keys:
            node.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ObjectOutput:
    """What training one object gives back to the process that writes the run."""

    name: str
    state: dict[str, Any]  # the model file's content (PatchCore.state_dict)
    metadata: dict[str, Any]  # the model's JSON sidecar
    metrics: dict[str, float | None]
    stats: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)  # written by the evaluation, relative to the run


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def object_paths(run_dir: Path, name: str) -> dict[str, Path]:
    stem = f"patchcore_{safe_name(name)}"
    return {
        "model": run_dir / "models" / f"{stem}.pt",
        "metadata": run_dir / "models" / f"{stem}.json",
        "record": run_dir / "completed" / f"{safe_name(name)}.json",
    }


def write_object(run_dir: Path, output: ObjectOutput, digest: str) -> ObjectResult:
    """Write one object's files (each atomically), its completion record last."""
    import torch

    paths = object_paths(run_dir, output.name)
    for relative, content in output.files.items():
        atomic_write(run_dir / relative, lambda handle, c=content: handle.write(c))
    buffer = io.BytesIO()
    torch.save(output.state, buffer)
    atomic_write(paths["model"], lambda handle: handle.write(buffer.getbuffer()))
    atomic_write_json(paths["metadata"], output.metadata)
    mark_object(run_dir, output.name, "fitted")
    record = {
        "object": output.name,
        "config_hash": digest,
        "model": {"path": str(paths["model"]), "sha256": _sha256(paths["model"])},
        "metadata": {"path": str(paths["metadata"]), "sha256": _sha256(paths["metadata"])},
        "metrics": output.metrics,
        "stats": output.stats,
        "layers": list(output.state["params"]["layers"]),
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(paths["record"], record)
    return ObjectResult(output.name, output.metrics, output.stats, str(paths["model"]))


def completed_result(run_dir: Path, name: str, digest: str) -> tuple[ObjectResult, dict[str, Any]] | None:
    """The recorded result (and the record) of an object finished with this config, or None if it must be
    (re)done."""
    paths = object_paths(run_dir, name)
    try:
        record = json.loads(paths["record"].read_text())
        if record.get("config_hash") != digest or record.get("object") != name:
            return None
        for key in ("model", "metadata"):
            if _sha256(paths[key]) != record[key]["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ObjectResult(name, record["metrics"], record["stats"], str(paths["model"])), record


def forget_object(run_dir: Path, name: str) -> None:
    """Remove an unfinished or outdated object's record first, then its model files: nothing of it is
    left for a later run or ``evaluate`` to take for finished."""
    paths = object_paths(run_dir, name)
    for key in ("record", "model", "metadata"):
        paths[key].unlink(missing_ok=True)

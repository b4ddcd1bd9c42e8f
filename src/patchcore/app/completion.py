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
from .config import Config, ConfigError, config_from_dict, config_to_dict
from .runs import mark_object

__all__ = [
    "ObjectOutput",
    "completed_result",
    "config_changes",
    "config_hash",
    "fitted_model",
    "forget_object",
    "object_paths",
    "recorded_objects",
    "write_fitted",
    "write_object",
]


# Keys that change what an object's model or metrics are; the rest (names, logging, where and how it runs,
# worker counts, the feature cache) do not, and may differ between a run and its resumption.
_NEUTRAL_KEYS = {
    "": ("project", "group", "output_dir", "logging", "federated"),
    "data": ("num_workers",),
    "model": ("feature_cache", "search_threads", "device"),
    "execution": ("engine", "address", "cpus_per_object", "gpus_per_object", "retries"),
}


def _determining(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict without its neutral keys, normalised as JSON (tuples as lists)."""
    data = json.loads(json.dumps(data, default=str))
    for section, keys in _NEUTRAL_KEYS.items():
        node = data if not section else data.get(section, {})
        for key in keys:
            node.pop(key, None)
    return data


def config_hash(config: Config) -> str:
    """SHA-256 of the settings that determine each object's model and metrics."""
    return hashlib.sha256(json.dumps(_determining(config_to_dict(config)), sort_keys=True).encode()).hexdigest()


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_changes(run_dir: Path, config: Config) -> list[str]:
    """Each setting that determines models or metrics and differs between the run's saved config.yaml and
    ``config``, as ``key: old -> new`` (empty: the same run). Neutral keys (names, logging, where it runs)
    may differ."""
    import yaml

    try:
        saved_raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the run's configuration {run_dir / 'config.yaml'}: {exc}") from None
    try:  # through the schema, so that a default left out of one of them is no change
        saved = config_to_dict(config_from_dict(saved_raw, str(run_dir / "config.yaml")))
    except ConfigError:
        saved = saved_raw
    old, new = _flat(_determining(saved)), _flat(_determining(config_to_dict(config)))
    absent = "(absent)"
    return [
        f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, absent) != new.get(key, absent)
    ]


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
        # The model file was saved, its evaluation had not finished: what --resume may evaluate again.
        "fitted": run_dir / "completed" / f"{safe_name(name)}.fitted.json",
    }


def write_fitted(run_dir: Path, name: str, digest: str) -> None:
    """Record that ``name``'s model file is saved (config hash, file checksum), before its evaluation."""
    paths = object_paths(run_dir, name)
    record = {"object": name, "config_hash": digest, "model": {"sha256": _sha256(paths["model"])}}
    atomic_write_json(paths["fitted"], record)


def fitted_model(run_dir: Path, name: str, digest: str) -> Path | None:
    """The saved model of ``name`` when its fitted record matches this config and the file's checksum (its
    evaluation is all that is left to do), else None."""
    paths = object_paths(run_dir, name)
    try:
        record = json.loads(paths["fitted"].read_text())
        if record.get("config_hash") != digest or record.get("object") != name:
            return None
        if _sha256(paths["model"]) != record["model"]["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return paths["model"]


def recorded_objects(run_dir: Path) -> list[str]:
    """The objects a run folder holds records of (finished or fitted), by their recorded names."""
    names: set[str] = set()
    for path in sorted((run_dir / "completed").glob("*.json")):
        try:
            name = json.loads(path.read_text()).get("object")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str):
            names.add(name)
    return sorted(names)


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
    paths["fitted"].unlink(missing_ok=True)  # the record above supersedes it
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


def forget_object(run_dir: Path, name: str, keep_fitted: bool = False) -> None:
    """Remove an unfinished or outdated object's records first, then its model files: nothing of it is
    left for a later run or ``evaluate`` to take for finished. ``keep_fitted``: keep a verified fitted model
    (and its record) that is to be evaluated again."""
    paths = object_paths(run_dir, name)
    keys = ("record", "metadata") if keep_fitted else ("record", "fitted", "model", "metadata")
    for key in keys:
        paths[key].unlink(missing_ok=True)

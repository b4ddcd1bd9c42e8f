"""What an export folder holds and how it is trusted: the file names, the model's metadata written beside the
graph, and the digests that tie the folder's files to one export of one model.

``patchcore_export.json`` records the SHA-256 of every file of the export (``files``), the content digest
of the model it was exported from (``model_digest``, the model file's own digest), and a digest over all of
that (``digest``). A folder is served only when the JSON's digest matches its content, every listed file
matches its hash, and no graph file (``*.onnx``, ``*.xml``, ``*.bin``) lies there that the JSON does not list:
a tampered initializer, an edited threshold, or files of two exports mixed in one folder are refused.

Both the exporter (``deploy/export.py``) and the runtimes (``deploy/runtimes.py``) import this module, and it
imports neither (no import circle).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..engine.records import file_sha256
from .errors import DeployError
from .settings import EXPORTED_RUNTIMES

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_META",
    "GRAPH_SUFFIXES",
    "ONNX_FILE",
    "OPENVINO_FILE",
    "file_sha256",
    "meta_digest",
    "model_info",
    "read_verified_meta",
]

EXPORT_FORMATS: tuple[str, ...] = tuple(runtime.value for runtime in EXPORTED_RUNTIMES)  # the one list
EXPORT_META = "patchcore_export.json"
ONNX_FILE = "patchcore.onnx"
OPENVINO_FILE = "patchcore.xml"
GRAPH_SUFFIXES = (".onnx", ".xml", ".bin")


def model_info(model: Any) -> dict[str, Any]:
    """Plain metadata of a fitted model (what ``GET /models`` and the export JSON show)."""
    params = model.get_params()
    return {
        "backbone": model.backbone,
        "layers": list(getattr(model, "layers_", None) or params["layers"] or []),
        "input_size": list(model.input_size_),
        "transform": model.transform.to_dict(),
        "params": params,
        "weights_id": getattr(model, "weights_id_", None),
        "stats": model.stats_.to_dict(),
        "evaluation": {} if model.evaluation_ is None else model.evaluation_.to_dict(),
    }


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 over the JSON's content (sorted keys), its own ``digest`` field left out."""
    record = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def read_verified_meta(folder: Path) -> dict[str, Any]:
    """The export JSON of ``folder`` after every check of the module docstring; DeployError naming the
    file that does not belong otherwise."""
    meta_path = folder / EXPORT_META
    if not meta_path.is_file():
        raise DeployError(f"{folder} is not a patchcore export folder (no {EXPORT_META})")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        files = meta["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError("'files' must list the export's files")
    except (ValueError, KeyError, TypeError) as exc:
        raise DeployError(
            f"{meta_path} is unreadable or incomplete ({exc}); export the model again with this version"
        ) from exc
    if meta.get("digest") != meta_digest(meta):
        raise DeployError(
            f"{meta_path} was modified after the export (its digest does not match its content); export the "
            "model again"
        )
    for name, expected in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise DeployError(f"{folder} lacks {name}, a file of its export; export the model again")
        if file_sha256(path) != expected:
            raise DeployError(
                f"{path} does not belong to the export described by {EXPORT_META} (its SHA-256 differs: "
                "modified, or written by another export); export the model again into an empty folder"
            )
    strangers = sorted(
        p.name for p in folder.iterdir() if p.suffix.lower() in GRAPH_SUFFIXES and p.name not in files
    )
    if strangers:
        raise DeployError(
            f"{folder} mixes exports: {', '.join(strangers)} is not part of the export described by "
            f"{EXPORT_META} (model {str(meta.get('model_digest'))[:12]}); export into an empty folder"
        )
    return meta

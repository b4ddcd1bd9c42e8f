"""Model files: what a fitted PatchCore holds on disk (format 3), and the checks before one is trusted.

A model file is a dict of plain types and tensors (the memory bank, the version of each of its rows, the
coreset's projection), so it loads with ``torch.load(weights_only=True)``. A SHA-256 digest over the
parameters, the tensors and the records makes an edited file fail to load; the bank is checked against the
parameters and records that describe it (the fit's, and the history of its updates).

Format 2 (before updates) still loads: its bank is all the fit's (version 0), with no history and no
recorded coreset space (``partial_fit`` then needs a fraction or a count).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from .records import Calibration, CoresetSpace, FitStats, RecordError, TestRanges, UpdateRecord
from .updates import versions_problem

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "ModelFileError",
    "bank_problem",
    "check_state",
    "foreign_kind",
    "library_versions",
    "model_state",
    "plain",
    "plain_dict",
    "read_state",
    "restore_fitted",
    "state_digest",
    "torch_load_problem",
]

MODEL_FORMAT = "patchcore-model"
# 2: a content digest over the parameters, the bank and the fit's records (an edited file is refused).
# 3: + the version of every bank row, the model's version and update history, the coreset's space.
MODEL_FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (2, 3)


class ModelFileError(ValueError):
    """A model file that cannot be used: truncated, not ours, or of another format version."""


def plain(value: Any) -> Any:
    """A value as plain Python (lists, str, numbers), as a weights_only-loadable file needs it."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, np.generic):  # numpy scalars would not load with weights_only=True
        return value.item()
    return value


def plain_dict(values: dict[str, Any]) -> dict[str, Any]:
    return {k: plain(v) for k, v in values.items()}


def model_state(model: Any) -> dict[str, Any]:
    """Everything a model file holds for a fitted model: plain types and one float32 tensor."""
    params = model.get_params()
    params["layers"] = list(model.layers_)
    params["device"] = "auto"
    params["work_dir"] = None
    state = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "params": params,
        "weights_id": model.weights_id_,
        "memory_bank": torch.from_numpy(model.memory_bank_.copy()),
        "patch_grid": list(model.patch_grid_),
        "input_size": list(model.input_size_),
        "stats": plain_dict(model.stats_.to_dict()),
        "calibration": _record_dict(getattr(model, "calibration_", None)),
        "evaluation": _record_dict(getattr(model, "evaluation_", None)),
        "row_versions": torch.from_numpy(np.ascontiguousarray(model.row_versions_, dtype=np.int64)),
        "version": int(model.version_),
        "history": [plain_dict(r.to_dict()) for r in model.history_],
        "coreset_space": None,
        "coreset_projection": None,
        "versions": library_versions(),
    }
    space = model.coreset_space_
    if space is not None:
        state["coreset_space"] = {"radius": float(space.radius)}
        if space.projection is not None:
            state["coreset_projection"] = torch.from_numpy(np.ascontiguousarray(space.projection, np.float32))
    state["digest"] = state_digest(state)
    return state


def _record_dict(record: Calibration | TestRanges | None) -> dict[str, Any]:
    """A record as stored (an empty dict: none)."""
    return {} if record is None else plain_dict(record.to_dict())


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 over everything a model file holds but the library versions and the digest itself: the
    plain values as sorted JSON, then each tensor (the memory bank first, the others by name; for a format-2
    file, whose only tensor is the bank, the digest it was written with)."""
    digest = hashlib.sha256()
    tensors = sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and k != "memory_bank")
    record = {k: v for k, v in state.items() if k not in ("memory_bank", "versions", "digest", *tensors)}
    digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    for key in ["memory_bank", *tensors]:
        tensor = state[key].detach().cpu().contiguous()
        if key != "memory_bank":
            digest.update(key.encode())
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The dict a model file holds, read with ``weights_only=True`` (nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    kind = foreign_kind(path)
    if kind is not None:
        raise ModelFileError(f"{path} is not a patchcore model file: it is {kind}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable patchcore model file: {torch_load_problem(exc)}") from exc


# Leading bytes of files people pass by mistake where a torch file is expected.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x08\x01\x12", "an ONNX graph (serve it with --runtime onnx from its export folder)"),
)


def foreign_kind(path: Path) -> str | None:
    """What ``path`` is when its first bytes show it is not a torch file (an image, JSON, text), else None."""
    with path.open("rb") as handle:
        head = handle.read(512)
    if not head:
        return "empty (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # torch's zip format, or a legacy pickle: torch.load decides
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "JSON text (a model's .json sidecar? pass the .pt file beside it)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file"


def torch_load_problem(exc: BaseException) -> str:
    """torch.load's failure in one line, without its advice to load with ``weights_only=False`` (that would
    run whatever code the file carries)."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if "weights_only" in message or "Weights only load failed" in message:
        return (
            "it holds Python objects beyond plain tensors and numbers, which are refused (unpickling them "
            "could run code)"
        )
    return f"truncated or corrupted? ({message or type(exc).__name__})"


def check_state(state: Any, source: str) -> None:
    """Refuse what is not a model file of this format version, or was modified after it was saved."""
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{source} is not a patchcore model file")
    version = state.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ModelFileError(
            f"{source} has model format version {version}; this patchcore ({__version__}) reads versions "
            f"{', '.join(str(v) for v in READABLE_FORMAT_VERSIONS)}. Re-train the model with this version."
        )
    try:
        expected = state_digest(state)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ModelFileError(f"{source} is missing or has malformed model fields: {exc}") from exc
    if state.get("digest") != expected:
        raise ModelFileError(
            f"{source} was modified after it was saved (its content digest does not match): its "
            "parameters may no longer describe its memory bank. Re-train, or use the original file."
        )


def restore_fitted(model: Any, state: dict[str, Any], source: str) -> None:
    """Set the fitted attributes of ``model`` (built from the state's parameters) from a checked state."""
    try:
        model.memory_bank_ = state["memory_bank"].detach().cpu().numpy().astype(np.float32, copy=False)
        model.patch_grid_ = tuple(state["patch_grid"])
        model.input_size_ = tuple(state["input_size"])
        model.stats_ = FitStats.from_dict(state["stats"])
        model.weights_id_ = state["weights_id"]
        model.layers_ = tuple(state["params"]["layers"])
        model.versions_ = dict(state.get("versions", {}))
        calibration = dict(state.get("calibration") or {})
        evaluation = dict(state.get("evaluation") or {})
        if "map_min" in calibration:
            # Files from before good-image calibration kept the test-set ranges there: figures only.
            legacy = calibration
            calibration = {}
            evaluation = {**legacy, **evaluation}
            if "image_threshold" in legacy:
                evaluation["f1_threshold"] = evaluation.pop("image_threshold")
        model.calibration_ = Calibration.from_dict(calibration) if calibration else None
        model.evaluation_ = TestRanges.from_dict(evaluation) if evaluation else None
        if state["format_version"] >= 3:
            model.row_versions_ = state["row_versions"].detach().cpu().numpy().astype(np.int64)
            model.version_ = int(state["version"])
            model.history_ = tuple(UpdateRecord.from_dict(r) for r in state["history"])
            space = state["coreset_space"]
            projection = state["coreset_projection"]
            model.coreset_space_ = None if space is None else CoresetSpace(
                None if projection is None else projection.detach().cpu().numpy().astype(np.float32),
                float(space["radius"]),
            )
        else:  # format 2: the fit's bank, never updated; no coreset space recorded
            model.row_versions_ = np.zeros(len(model.memory_bank_), dtype=np.int64)
            model.version_ = 0
            model.history_ = ()
            model.coreset_space_ = None
    except (KeyError, TypeError, AttributeError, ValueError, RecordError) as exc:
        raise ModelFileError(f"{source} is missing or has malformed model fields: {exc}") from exc
    problem = bank_problem(model)
    if problem:
        raise ModelFileError(f"{source}: {problem}; the file is inconsistent, re-train the model")


def bank_problem(model: Any) -> str | None:
    """What disagrees between the stored parameters, records and memory bank (None: all agree)."""
    bank, stats = model.memory_bank_, model.stats_
    if bank.ndim != 2 or len(bank) == 0:
        return f"the memory bank has shape {bank.shape}, not (M >= 1, D)"
    if not np.isfinite(bank).all():
        return "the memory bank holds non-finite values (NaN or inf)"
    if model.target_embed_dimension is not None and bank.shape[1] != model.target_embed_dimension:
        return (
            f"target_embed_dimension is {model.target_embed_dimension} but the memory bank has "
            f"{bank.shape[1]}-dimensional features"
        )
    if len(model.row_versions_) != len(bank):
        return f"{len(model.row_versions_)} row versions for a bank of {len(bank)} rows"
    problem = versions_problem(model.row_versions_, model.history_, model.version_, stats.memory_size)
    if problem:
        return problem
    fitted = stats.memory_size  # the fit's rows; updates add rows (checked against the history above)
    if stats.feature_dim != bank.shape[1]:
        return (
            f"the records say a {stats.memory_size} x {stats.feature_dim} memory bank, "
            f"the file holds {bank.shape[0]} x {bank.shape[1]}"
        )
    n_patches = stats.n_patches
    if n_patches != stats.n_train_images * int(np.prod(model.patch_grid_)):
        return f"n_patches {n_patches} is not n_train_images x the patch grid {list(model.patch_grid_)}"
    if fitted > n_patches:
        return f"the memory bank ({fitted}) is larger than the training patches ({n_patches})"
    # The robust fit (denoise) selects from the patches it kept (engine/audit.py).
    kept = stats.denoise_kept_patches
    candidates = kept if getattr(model, "denoise", False) and kept is not None else n_patches
    if not isinstance(candidates, int) or not 1 <= candidates <= n_patches:
        return f"denoise_kept_patches {candidates!r} is not in [1, n_patches {n_patches}]"
    if model.sampler == "identity" and fitted != candidates:
        return f"sampler identity keeps all {candidates} patches, the bank has {fitted}"
    if model.sampler != "identity" and fitted != max(1, int(candidates * model.percentage)):
        return (
            f"percentage {model.percentage} of {candidates} patches gives a bank of "
            f"{max(1, int(candidates * model.percentage))}, the file holds {fitted}"
        )
    space = model.coreset_space_
    if space is not None and space.projection is not None and space.projection.shape[1] != bank.shape[1]:
        return f"the coreset projection {space.projection.shape} does not fit {bank.shape[1]}-d features"
    return None


def library_versions() -> dict[str, str]:
    import faiss
    import torchvision

    # Plain str: torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses.
    return {
        "patchcore": str(__version__),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "faiss": str(getattr(faiss, "__version__", "unknown")),
        "numpy": str(np.__version__),
        "python": str(platform.python_version()),
    }

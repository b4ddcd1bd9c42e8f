"""Backends that run an exported graph (``patchcore export``) for the :class:`Predictor`: ONNX Runtime and
OpenVINO. Each reads ``patchcore_export.json`` for the preprocessing, the calibration and the metadata;
both sessions are safe to call from several threads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.transforms import ImageTransform
from ..engine.records import Calibration, TestRanges
from .artifacts import EXPORT_META, ONNX_FILE, OPENVINO_FILE, read_verified_meta
from .errors import DeployError
from .settings import EXPORTED_RUNTIMES, Runtime

__all__ = ["ExportedBackend", "RUNTIMES", "load_exported"]

RUNTIMES: tuple[str, ...] = tuple(r.value for r in EXPORTED_RUNTIMES)


class ExportedBackend:
    """An exported graph, run by ``runtime`` (onnx = ONNX Runtime, openvino = OpenVINO, float32)."""

    def __init__(self, folder: Path, runtime: str, threads: int | None = None):
        self.meta: dict[str, Any] = read_verified_meta(folder)  # digests: one export, untouched
        meta_path = folder / EXPORT_META
        try:
            self.transform = ImageTransform.from_dict(self.meta["preprocessing"])
            calibration = self.meta.get("calibration") or {}
            evaluation = self.meta.get("evaluation") or {}
            self.calibration: Calibration | None = Calibration.from_dict(calibration) if calibration else None
            self.evaluation: TestRanges | None = TestRanges.from_dict(evaluation) if evaluation else None
        except (ValueError, KeyError, TypeError) as exc:  # RecordError is a ValueError
            raise DeployError(f"{meta_path} is unreadable or incomplete: {exc}") from exc
        self.runtime = runtime
        onnx_path, xml_path = folder / ONNX_FILE, folder / OPENVINO_FILE
        if runtime == Runtime.ONNX:
            if not onnx_path.is_file():
                raise DeployError(f"{folder} holds no {ONNX_FILE} (export with --format onnx)")
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise DeployError("runtime onnx needs the 'export' extra (onnxruntime)") from exc
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            self._run = lambda x: self._session.run(None, {"images": x})
        elif runtime == Runtime.OPENVINO:
            source = xml_path if xml_path.is_file() else onnx_path
            if not source.is_file():
                raise DeployError(f"{folder} holds neither {OPENVINO_FILE} nor {ONNX_FILE}")
            try:
                import openvino
            except ImportError as exc:
                raise DeployError("runtime openvino needs the 'export' extra (openvino)") from exc
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU default may be bf16
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = openvino.Core().compile_model(str(source), "CPU", config)
            outputs = (compiled.output("image_scores"), compiled.output("anomaly_maps"))

            def run(x: np.ndarray) -> list[np.ndarray]:
                # One infer request per call, so concurrent threads never share one.
                result = compiled.create_infer_request().infer([x])
                return [np.array(result[o]) for o in outputs]

            self._run = run
        else:
            raise DeployError(f"unknown runtime {runtime!r}; known: {', '.join(r.value for r in Runtime)}")

    def score(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        outputs = self._run(np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32))
        return np.asarray(outputs[0]), np.asarray(outputs[1])

    def info(self) -> dict[str, Any]:
        return dict(self.meta.get("info") or {})


def load_exported(path: str | os.PathLike, runtime: str, threads: int | None = None) -> ExportedBackend:
    """The backend for an export folder (or a file inside it)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise DeployError(f"export folder {folder} does not exist")
    return ExportedBackend(folder, runtime, threads)

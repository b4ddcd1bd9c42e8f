"""Export a fitted model to one graph: normalised images (N, 3, H, W) -> ``image_scores`` (N,) and
``anomaly_maps`` (N, H, W), for ONNX Runtime and OpenVINO.

The graph composes the engine's own torch modules, so there is one arithmetic for the estimator and the
export (nothing here derives a pooling matrix or a distance):
- backbone: the model's feature extractor (the hooked layers of the frozen network);
- patch features: the model's :class:`~patchcore.engine.features.LinearPatchAggregator` (one p x p
  convolution per layer, coarse layers reduced first and upsampled second);
- nearest-neighbour distance: :class:`~patchcore.engine.graph.NearestBankDistance` (bank-centred matrix
  products, minimum / top-k per block of ``chunk`` bank rows; memory N*P x chunk);
- maps: :class:`~patchcore.engine.graph.AnomalyMapHead` (bilinear upsampling, scipy's gaussian as two 1-D
  convolutions).
Preprocessing (resize, crop, mean/std), the calibration, the model's metadata and the digests that tie the
folder's files to this export of this model go to ``patchcore_export.json`` beside the graph
(:mod:`patchcore.deploy.artifacts`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.graph import AnomalyMapHead, NearestBankDistance
from ..engine.model import PatchCore
from ..fileio import atomic_write_json
from .artifacts import (
    EXPORT_FORMATS,
    EXPORT_META,
    GRAPH_SUFFIXES,
    ONNX_FILE,
    OPENVINO_FILE,
    file_sha256,
    meta_digest,
    model_info,
)
from .errors import DeployError

__all__ = ["EXPORT_FORMATS", "EXPORT_META", "ExportableGraph", "check_export_dir", "export_model"]

log = logging.getLogger("patchcore")

_OPSET = 17


class ExportableGraph(nn.Module):
    """The fitted PatchCore as one traceable module (float32), built from the engine's modules."""

    def __init__(self, model: PatchCore, chunk: int = 4096):
        super().__init__()
        model._check_fitted()
        if model.reweight:
            raise DeployError("export does not support reweight=True (the paper's Eq. 7) yet")
        if model.precision != "fp32":
            raise DeployError(f"export needs precision fp32, the model uses {model.precision}")
        transform = model.transform
        sizes = {tuple(transform.output_size(hw)) for hw in ((300, 500), (500, 300), (400, 400))}
        if sizes != {tuple(int(v) for v in model.input_size_)}:
            # The graph's upsampling and smoothing are built for one input size.
            raise DeployError(
                "export needs a fixed input size (a crop, imagesize, or resize to (h, w)); this model's "
                f"transform gives sizes {sorted(sizes)}"
            )
        features = model._patch_features()
        self.extractor = features.extractor.cpu().eval()
        self.input_size = tuple(int(s) for s in model.input_size_)
        with torch.no_grad():
            maps = self.extractor(torch.zeros(1, 3, *self.input_size))
        self.aggregator = features.aggregator([int(m.shape[1]) for m in maps.values()])
        self.distance = NearestBankDistance(model.memory_bank_, model.num_neighbors, model.distance, chunk)
        self.head = AnomalyMapHead(self.input_size, model.smoothing_sigma)
        self.n_bank = self.distance.n_bank

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.extractor(images)
        rows, grid = self.aggregator(list(maps.values()))
        scores = self.distance(rows).reshape(images.shape[0], 1, grid[0], grid[1])
        return self.head(scores)


def export_meta(model: PatchCore, fmt: str, graph_file: str) -> dict[str, Any]:
    """The JSON beside the graph: what a runtime needs to feed it and to decide with its outputs."""
    return {
        "format": fmt,
        "graph": graph_file,
        "inputs": {"images": ["N", 3, *model.input_size_]},
        "outputs": {"image_scores": ["N"], "anomaly_maps": ["N", *model.input_size_]},
        "preprocessing": model.transform.to_dict(),
        "calibration": {} if model.calibration_ is None else model.calibration_.to_dict(),
        "evaluation": {} if model.evaluation_ is None else model.evaluation_.to_dict(),
        "info": model_info(model),
    }


def export_onnx(graph: ExportableGraph, path: Path) -> None:
    example = torch.zeros(2, 3, *graph.input_size)
    with warnings.catch_warnings():
        # The TorchScript-based exporter: the dynamo one needs onnxscript, which is not a dependency.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["image_scores", "anomaly_maps"],
            dynamic_axes={"images": {0: "N"}, "image_scores": {0: "N"}, "anomaly_maps": {0: "N"}},
            opset_version=_OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def check_export_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that cannot take an export, before any work and writing nothing: a file, a path
    under a file, a folder nobody may write in, or a non-empty folder without ``overwrite`` (its files would
    be replaced or mixed with this export's)."""
    if out.exists() and not out.is_dir():
        raise DeployError(f"--out folder {out} is an existing file, not a folder")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DeployError(f"--out folder {out} is inside a file ({ancestor}), not a folder")
    if out.is_dir() and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise DeployError(
                f"--out folder {out} is not empty ({len(entries)} entries: {shown}); pass --overwrite to "
                "replace an earlier export, or choose another folder"
            )
    try:  # a probe file, not os.access (wrong for root and for read-only mounts)
        with tempfile.TemporaryFile(dir=ancestor, prefix=".patchcore-probe-"):
            pass
    except OSError as exc:
        raise DeployError(f"cannot write the --out folder {out}: {exc.strerror or exc}") from None


def export_model(
    model_path: str | os.PathLike | PatchCore,
    fmt: str,
    out_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    chunk: int = 4096,
    overwrite: bool = False,
) -> list[Path]:
    """Write the graph and ``patchcore_export.json`` into ``out_dir``; returns the files written.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then the graph files already there (``*.onnx``,
    ``*.xml``, ``*.bin``) and the old JSON are replaced, so the folder holds one export only. The files are
    written in a staging folder first and moved in at the end: a failed export leaves the folder as it was.
    """
    if fmt not in EXPORT_FORMATS:
        raise DeployError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    if chunk < 1:
        raise DeployError(f"--chunk must be positive, got {chunk}")
    out = Path(out_dir)
    check_export_dir(out, overwrite)
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise DeployError("export needs the 'export' extra: pip install 'patchcore[export]'") from exc
    if fmt == "openvino":
        try:
            import openvino
        except ImportError as exc:
            raise DeployError("OpenVINO export needs the 'export' extra (openvino)") from exc
    model = (
        model_path
        if isinstance(model_path, PatchCore)
        else PatchCore.load(model_path, device="cpu", weights=weights)
    )
    if model.torch_device.type != "cpu":
        model.set_params(device="cpu")
    graph = ExportableGraph(model, chunk=chunk).eval()
    model_digest = model.state_dict()["digest"]
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".export-staging-"))
    try:
        onnx_path = staging / ONNX_FILE
        export_onnx(graph, onnx_path)
        written = [onnx_path]
        graph_file = ONNX_FILE
        if fmt == "openvino":
            ov_model = openvino.convert_model(str(onnx_path))
            xml = staging / OPENVINO_FILE
            openvino.save_model(ov_model, str(xml), compress_to_fp16=False)
            onnx_path.unlink()
            written = [xml, xml.with_suffix(".bin")]
            graph_file = OPENVINO_FILE
        meta = export_meta(model, fmt, graph_file)
        meta["model_digest"] = model_digest
        meta["files"] = {p.name: file_sha256(p) for p in written}
        meta["digest"] = meta_digest(meta)
        # Replace the folder's previous export: its graph files first, the JSON last (a reader that sees
        # the new JSON sees the new graph; one that sees the old JSON finds its files changed and refuses).
        for old in out.iterdir():
            if old.is_file() and (old.suffix.lower() in GRAPH_SUFFIXES or old.name == EXPORT_META):
                old.unlink()
        files = []
        for path in written:
            os.replace(path, out / path.name)
            files.append(out / path.name)
        meta_path = out / EXPORT_META
        atomic_write_json(meta_path, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s graph (%d bank rows, chunk %d) to %s", fmt, graph.n_bank, chunk, out)
    return [*files, meta_path]

"""Export a fitted model to one graph: normalised images (N, 3, H, W) -> ``image_scores`` (N,) and
``anomaly_maps`` (N, H, W), for ONNX Runtime and OpenVINO.

The graph is the estimator's arithmetic rewritten with ops every runtime has:
- backbone: the hooked layers of the frozen network;
- patch features: unfolding p x p neighbourhoods and adaptive mean pooling are both linear, so each
  layer's contribution to the final patch vector is one convolution (kernel p x p, weights = the pooling
  matrices applied to the unfold layout); the coarser layers' bilinear alignment commutes with it (it acts
  on positions, the pooling on channels), so they are convolved first and resized second;
- nearest-neighbour distance to the memory bank: ||x||^2 - 2 x.b + ||b||^2 by matrix products, minimum
  (top-k for k > 1) per block of ``chunk`` bank rows, then over blocks (memory: N*P x chunk);
- bilinear upsampling (align_corners=False) and the gaussian as two 1-D convolutions with scipy's
  'reflect' (half-sample symmetric) border, done by an index gather.
Preprocessing (resize, crop, mean/std), the calibration and the model's metadata go to
``patchcore_export.json`` beside the graph.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.model import PatchCore
from ..fileio import atomic_write_json
from .errors import DeployError
from .inference import model_info

__all__ = ["EXPORT_FORMATS", "EXPORT_META", "ExportableGraph", "export_model"]

log = logging.getLogger("patchcore")

EXPORT_FORMATS = ("onnx", "openvino")
EXPORT_META = "patchcore_export.json"
ONNX_FILE = "patchcore.onnx"
OPENVINO_FILE = "patchcore.xml"
_OPSET = 17


def _pool_matrix(length: int, size: int) -> torch.Tensor:
    """The (length, size) matrix M with rows @ M == adaptive_avg_pool1d(rows, size) (exactly linear)."""
    eye = torch.eye(length, dtype=torch.float64).unsqueeze(1)
    return F.adaptive_avg_pool1d(eye, size).squeeze(1)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter's 1-D kernel (radius round(truncate * sigma))."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return torch.from_numpy(kernel / kernel.sum())


def _symmetric_index(size: int, radius: int) -> torch.Tensor:
    """Indices of a 'reflect' (d c b a | a b c d | d c b a) padding by ``radius`` of a length-``size`` axis."""
    index = np.arange(-radius, size + radius)
    period = 2 * size
    index = np.mod(index, period)
    index = np.where(index >= size, period - 1 - index, index)
    return torch.from_numpy(index.astype(np.int64))


class ExportableGraph(nn.Module):
    """The fitted PatchCore as one traceable module (float32)."""

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
        self.layers = list(self.extractor.layers)
        self.patchsize = int(model.patchsize)
        self.stride = int(model.patchstride)
        self.k = int(model.num_neighbors)
        self.euclidean = model.distance == "euclidean"
        self.sigma = float(model.smoothing_sigma)
        self.input_size = tuple(int(s) for s in model.input_size_)
        self.chunk = int(chunk)
        channels = self._layer_channels()
        weights = self._projection_weights(channels, model)
        for i, w in enumerate(weights):
            self.register_buffer(f"projection_{i}", w.float())
        bank = torch.from_numpy(np.ascontiguousarray(model.memory_bank_, dtype=np.float32))
        self.n_bank = len(bank)
        self.register_buffer("bank_t", bank.t().contiguous())  # (D, M): the matrix product's layout
        self.register_buffer("bank_sq", (bank.double() ** 2).sum(1).float())
        if self.sigma > 0:
            kernel = _gaussian_kernel(self.sigma).float()
            self.radius = (len(kernel) - 1) // 2
            self.register_buffer("kernel_h", kernel.view(1, 1, -1, 1))
            self.register_buffer("kernel_w", kernel.view(1, 1, 1, -1))
            height, width = self.input_size
            self.register_buffer("pad_h", _symmetric_index(height, self.radius))
            self.register_buffer("pad_w", _symmetric_index(width, self.radius))

    def _layer_channels(self) -> list[int]:
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self.input_size)
            maps = self.extractor(probe)
        return [int(maps[name].shape[1]) for name in self.layers]

    def _projection_weights(self, channels: list[int], model: PatchCore) -> list[torch.Tensor]:
        """Per layer, the conv weight (D, C, p, p) of unfold -> pooling (-> pooling of the stack)."""
        p2 = self.patchsize**2
        target, pretrain = model.target_embed_dimension, model.pretrain_embed_dimension
        if target is None:
            # Concatenation of each layer pooled from C*p*p to C.
            blocks = [_pool_matrix(c * p2, c) for c in channels]
            total = sum(channels)
            mats, offset = [], 0
            for c, block in zip(channels, blocks, strict=True):
                full = torch.zeros(c * p2, total, dtype=torch.float64)
                full[:, offset : offset + c] = block
                mats.append(full)
                offset += c
        else:
            if pretrain is None:
                raise DeployError("pretrain_embed_dimension None needs target_embed_dimension None")
            stack = _pool_matrix(len(channels) * pretrain, target)
            mats = [
                _pool_matrix(c * p2, pretrain) @ stack[i * pretrain : (i + 1) * pretrain]
                for i, c in enumerate(channels)
            ]
        # rows (C*p*p in unfold order: channel, kernel row, kernel column) @ M -> conv weight (D, C, p, p).
        return [
            m.t().reshape(m.shape[1], c, self.patchsize, self.patchsize)
            for m, c in zip(mats, channels, strict=True)
        ]

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D, gh, gw)."""
        maps = self.extractor(images)
        padding = (self.patchsize - 1) // 2
        out = None
        grid = None
        for i, name in enumerate(self.layers):
            weight = getattr(self, f"projection_{i}")
            part = F.conv2d(maps[name].float(), weight, stride=self.stride, padding=padding)
            if grid is None:
                grid = part.shape[-2:]
            elif part.shape[-2:] != grid:
                part = F.interpolate(part, size=grid, mode="bilinear", align_corners=False)
            out = part if out is None else out + part
        return out

    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, D) -> patch scores (R,): mean over the k nearest bank vectors, blocks of ``chunk`` rows."""
        row_sq = (rows * rows).sum(1, keepdim=True)
        best = []
        for start in range(0, self.n_bank, self.chunk):
            block = self.bank_t[:, start : start + self.chunk]
            squared = row_sq - 2.0 * (rows @ block) + self.bank_sq[start : start + self.chunk].unsqueeze(0)
            if self.k == 1:
                best.append(squared.min(dim=1, keepdim=True).values)
            else:
                best.append(torch.topk(squared, min(self.k, block.shape[1]), dim=1, largest=False).values)
        squared = torch.cat(best, dim=1) if len(best) > 1 else best[0]
        if self.k == 1:
            squared = squared.min(dim=1).values if squared.shape[1] > 1 else squared[:, 0]
        else:
            squared = torch.topk(squared, self.k, dim=1, largest=False).values
        squared = squared.clamp_min(0.0)
        values = squared.sqrt() if self.euclidean else squared
        return values if self.k == 1 else values.mean(dim=1)

    def smooth(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) gaussian filter with scipy's default 'reflect' border, as two 1-D convolutions."""
        padded = maps.index_select(2, self.pad_h)
        maps = F.conv2d(padded, self.kernel_h)
        padded = maps.index_select(3, self.pad_w)
        return F.conv2d(padded, self.kernel_w)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.patch_features(images)
        n, d, gh, gw = feats.shape
        rows = feats.permute(0, 2, 3, 1).reshape(-1, d)
        scores = self.nearest(rows).reshape(n, 1, gh, gw)
        image_scores = scores.flatten(1).max(dim=1).values
        maps = F.interpolate(scores, size=self.input_size, mode="bilinear", align_corners=False)
        if self.sigma > 0:
            maps = self.smooth(maps)
        return image_scores, maps[:, 0]


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


def export_model(
    model_path: str | os.PathLike | PatchCore,
    fmt: str,
    out_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    chunk: int = 4096,
) -> list[Path]:
    """Write the graph and ``patchcore_export.json`` into ``out_dir``; returns the files written."""
    if fmt not in EXPORT_FORMATS:
        raise DeployError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    if chunk < 1:
        raise DeployError(f"--chunk must be positive, got {chunk}")
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graph = ExportableGraph(model, chunk=chunk).eval()
    onnx_path = out / ONNX_FILE
    # Written under a temporary name and renamed: a reader never sees half a graph.
    tmp = out / f".{ONNX_FILE}.tmp"
    export_onnx(graph, tmp)
    os.replace(tmp, onnx_path)
    files = [onnx_path]
    graph_file = ONNX_FILE
    if fmt == "openvino":
        ov_model = openvino.convert_model(str(onnx_path))
        xml = out / OPENVINO_FILE
        openvino.save_model(ov_model, str(xml), compress_to_fp16=False)
        onnx_path.unlink()
        files = [xml, xml.with_suffix(".bin")]
        graph_file = OPENVINO_FILE
    meta_path = out / EXPORT_META
    atomic_write_json(meta_path, export_meta(model, fmt, graph_file))
    log.info("exported %s graph (%d bank rows, chunk %d) to %s", fmt, graph.n_bank, chunk, out)
    return [*files, meta_path]

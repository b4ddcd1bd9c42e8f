"""Locally aware patch features (SPEC section 3).

For each hooked layer map (B, C, h, w): unfold p x p neighbourhoods (zero padding), bring every layer after
the first onto the first layer's grid (bilinear, per neighbourhood map: unfold first, resize second), mean
pool each layer's rows to ``pretrain_embed_dimension`` and pool the stacked layers to
``target_embed_dimension``. The result is one vector per patch, rows in (image, row, column) order.

Two implementations of the same arithmetic:

- :func:`patch_features` (``aggregation="reference"``) builds the C*p*p-wide neighbourhood rows and pools
  them, op for op as the reference code does.
- :class:`LinearPatchAggregator` (``aggregation="conv"``, the default of :class:`PatchFeatures`) uses that
  every step after the backbone is linear and fixed: unfolding followed by the two adaptive poolings is one
  p x p convolution per layer with a derived weight (its rows are rows of the pooling matrices), and bilinear
  resizing acts on each channel alike, so it commutes with that per-pixel channel map: a coarse layer is
  reduced to its output channels *before* it is upsampled. Equal to the reference in exact arithmetic; in
  float32 each output sums a handful of nonzero products in another order (the test derives the tolerance).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .backbones import FeatureExtractor

__all__ = ["AGGREGATIONS", "LinearPatchAggregator", "PatchFeatures", "patchify", "patch_features"]

AGGREGATIONS = ("conv", "reference")


def patchify(
    feature_map: torch.Tensor, patchsize: int, stride: int = 1
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Unfold p x p neighbourhoods: (B, C, h, w) -> (B, C*p*p, gh, gw) and the patch grid (gh, gw).

    Inside one neighbourhood the channel is outermost, then kernel row, then column (torch's unfold order).
    """
    padding = (patchsize - 1) // 2
    batch = feature_map.shape[0]
    unfolded = F.unfold(feature_map, kernel_size=patchsize, stride=stride, padding=padding, dilation=1)
    grid = tuple((size + 2 * padding - (patchsize - 1) - 1) // stride + 1 for size in feature_map.shape[-2:])
    return unfolded.reshape(batch, unfolded.shape[1], grid[0], grid[1]), grid  # type: ignore[return-value]


def patch_features(
    layer_maps: Sequence[torch.Tensor],
    patchsize: int = 3,
    stride: int = 1,
    pretrain_embed_dimension: int | None = 1024,
    target_embed_dimension: int | None = 1024,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch feature vectors of a batch: ((B*gh*gw, D), (gh, gw)).

    ``target_embed_dimension=None`` gives the plain concatenation of the aligned layers' locally averaged
    features (each layer pooled from C*p*p to C, which is the p x p mean with zero padding), so D is the
    sum of the layers' channel counts (1536 for Wide-ResNet-50 layer2 + layer3).
    Computation is in float32 whatever the backbone's precision.
    """
    unfolded = []
    reference_grid: tuple[int, int] | None = None
    for layer_map in layer_maps:
        patches, grid = patchify(layer_map.float(), patchsize, stride)
        if reference_grid is None:
            reference_grid = grid
        elif grid != reference_grid:
            # Each of the C*p*p neighbourhood maps is resized on its own: identical to the reference's
            # per-map bilinear interpolation, in one call.
            patches = F.interpolate(patches, size=reference_grid, mode="bilinear", align_corners=False)
        batch, length = patches.shape[:2]
        # (B, L, gh, gw) -> (B*gh*gw, L): one row per patch.
        unfolded.append(patches.reshape(batch, length, -1).permute(0, 2, 1).reshape(-1, length))
    assert reference_grid is not None
    if target_embed_dimension is None:
        pooled = [
            F.adaptive_avg_pool1d(rows.unsqueeze(1), rows.shape[1] // (patchsize * patchsize)).squeeze(1)
            for rows in unfolded
        ]
        return torch.cat(pooled, dim=1), reference_grid
    if pretrain_embed_dimension is None:
        raise ValueError("pretrain_embed_dimension=None needs target_embed_dimension=None")
    pooled = [
        F.adaptive_avg_pool1d(rows.unsqueeze(1), pretrain_embed_dimension).squeeze(1) for rows in unfolded
    ]
    stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_embed_dimension).reshape(len(pooled[0]), -1), reference_grid


def _pooling_matrix(length: int, size: int) -> torch.Tensor:
    """The (size, length) float64 matrix of ``F.adaptive_avg_pool1d`` from ``length`` to ``size`` values.

    Bin i averages the inputs [floor(i*length/size), ceil((i+1)*length/size)), as torch's kernel does.
    """
    matrix = torch.zeros((size, length), dtype=torch.float64)
    for i in range(size):
        start = (i * length) // size
        stop = -((-(i + 1) * length) // size)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


class LinearPatchAggregator(torch.nn.Module):
    """:func:`patch_features` as one p x p convolution per layer (plus a bilinear upsampling of the coarse
    layers' *reduced* maps). Built for fixed layer channel counts; weights are derived in float64 from the
    pooling matrices and stored in float32 (buffers ``weight_0``, ``weight_1``...: a torch module, so the
    exported graph (``patchcore.deploy.export``) runs this very arithmetic).

    For layer l with C_l channels, the reference computes ``target_pool(concat_l(pre_pool_l(unfold(x_l))))``.
    Everything is linear, so output = sum_l up_l(conv(x_l, W_l)) with W_l = T[:, block_l] @ P_l reshaped to
    (out, C_l, p, p): P_l the (pre, C_l*p*p) pooling matrix, T the (target, sum pre) one, and unfold's row
    order (channel outermost, then kernel row, column) equal to a convolution weight's (C, p, p) order. Only
    the output rows a layer touches are convolved (for 1024 + 1024 -> 1024: the first layer gives rows
    0..511, the second 512..1023).
    """

    def __init__(
        self,
        channels: Sequence[int],
        patchsize: int = 3,
        stride: int = 1,
        pretrain_embed_dimension: int | None = 1024,
        target_embed_dimension: int | None = 1024,
    ):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.patchsize = patchsize
        self.stride = stride
        self.padding = (patchsize - 1) // 2
        window = patchsize * patchsize
        if target_embed_dimension is None:
            pre = [_pooling_matrix(c * window, c) for c in self.channels]
            target = torch.eye(sum(self.channels), dtype=torch.float64)
        else:
            if pretrain_embed_dimension is None:
                raise ValueError("pretrain_embed_dimension=None needs target_embed_dimension=None")
            pre = [_pooling_matrix(c * window, pretrain_embed_dimension) for c in self.channels]
            target = _pooling_matrix(len(self.channels) * pretrain_embed_dimension, target_embed_dimension)
        self.dim = target.shape[0]
        # Per layer: the output rows it touches (first, stop) and its conv weight (rows, C, p, p) float32.
        self.spans: list[tuple[int, int]] = []
        offset = 0
        for i, (c, pooling) in enumerate(zip(self.channels, pre, strict=True)):
            block = target[:, offset : offset + pooling.shape[0]]
            offset += pooling.shape[0]
            used = torch.flatten(torch.nonzero(block.abs().sum(1)))
            start, stop = int(used[0]), int(used[-1]) + 1
            weight = block[start:stop] @ pooling  # (rows, C*p*p)
            self.spans.append((start, stop))
            self.register_buffer(f"weight_{i}", weight.reshape(stop - start, c, patchsize, patchsize).float())
        spans = self.spans
        # The common case: the layers fill consecutive, disjoint row ranges, so the output is a concatenation.
        self._concatenate = (
            spans[0][0] == 0
            and spans[-1][1] == self.dim
            and all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=False))
        )

    @property
    def parts(self) -> list[tuple[int, int, torch.Tensor]]:
        """Per layer: (first output row, stop row, conv weight (rows, C, p, p))."""
        return [(start, stop, getattr(self, f"weight_{i}")) for i, (start, stop) in enumerate(self.spans)]

    def forward(self, layer_maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Layer maps (B, C_l, h_l, w_l) -> patch vectors (B*gh*gw, D) and the patch grid (gh, gw)."""
        if tuple(m.shape[1] for m in layer_maps) != self.channels:
            raise ValueError(
                f"layer maps with {[m.shape[1] for m in layer_maps]} channels given to an aggregator built "
                f"for {list(self.channels)}"
            )
        grid: tuple[int, int] | None = None
        outputs = []
        for layer_map, (start, stop, weight) in zip(layer_maps, self.parts, strict=True):
            x = layer_map.float()
            reduced = F.conv2d(x, weight.to(x.device), stride=self.stride, padding=self.padding)
            if grid is None:
                grid = (int(reduced.shape[-2]), int(reduced.shape[-1]))
            elif tuple(reduced.shape[-2:]) != grid:
                reduced = F.interpolate(reduced, size=grid, mode="bilinear", align_corners=False)
            outputs.append((start, stop, reduced))
        assert grid is not None
        batch = layer_maps[0].shape[0]
        if self._concatenate:
            maps = torch.cat([r for _, _, r in outputs], dim=1) if len(outputs) > 1 else outputs[0][2]
        else:
            maps = outputs[0][2].new_zeros((batch, self.dim, *grid))
            for start, stop, reduced in outputs:
                maps[:, start:stop] += reduced
        # (B, D, gh, gw) -> (B*gh*gw, D): one row per patch (a view when the maps are channels-last).
        return maps.permute(0, 2, 3, 1).reshape(-1, self.dim), grid


class PatchFeatures:
    """Backbone + patch aggregation: images (B, 3, H, W) -> patch vectors (B*gh*gw, D) on the patch grid.

    ``aggregation``: ``"conv"`` (default, :class:`LinearPatchAggregator`) or ``"reference"``
    (:func:`patch_features`, the reference's op-for-op arithmetic). ``channels_last``: run the backbone on
    NHWC tensors (oneDNN's fast layout on CPUs; tensor cores' on GPUs); same values up to float rounding.
    ``cpu_chunk``: on the CPU, run a batch through the backbone this many images at a time (None: the whole
    batch at once). No operation mixes images, so the rows are each image's own; the values can differ in
    the last bits only where oneDNN picks another convolution algorithm for another batch size (on
    EfficientNet-Lite0 at 224 px here they are the same bit for bit; NOTES.md issue 22).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        patchsize: int = 3,
        stride: int = 1,
        pretrain_embed_dimension: int | None = 1024,
        target_embed_dimension: int | None = 1024,
        autocast_dtype: torch.dtype | None = None,
        aggregation: str = "conv",
        channels_last: bool = True,
        cpu_chunk: int | None = None,
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.extractor = extractor
        self.cpu_chunk = cpu_chunk
        self.patchsize = patchsize
        self.stride = stride
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self.autocast_dtype = autocast_dtype
        self.aggregation = aggregation
        self.channels_last = channels_last
        if channels_last:
            extractor.to(memory_format=torch.channels_last)
        self._aggregator: LinearPatchAggregator | None = None
        self._aggregator_lock = threading.Lock()

    def aggregator(self, channels: Sequence[int]) -> LinearPatchAggregator:
        """The convolution weights for these layer channel counts (derived once, then reused)."""
        with self._aggregator_lock:
            if self._aggregator is None or self._aggregator.channels != tuple(channels):
                self._aggregator = LinearPatchAggregator(
                    channels,
                    self.patchsize,
                    self.stride,
                    self.pretrain_embed_dimension,
                    self.target_embed_dimension,
                )
            return self._aggregator

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        chunk = self.cpu_chunk
        if chunk is not None and images.device.type == "cpu" and len(images) > chunk:
            # A small chunk's activations stay in the caches instead of streaming through memory (and fresh
            # memory is slow to touch in VMs): EfficientNet-Lite0, 224 px, 2 cores here: 25.7 img/s at 32
            # images per call, 55 at 4 (NOTES.md issue 22).
            parts = [self._features(images[start : start + chunk]) for start in range(0, len(images), chunk)]
            return torch.cat([rows for rows, _ in parts]), parts[0][1]
        return self._features(images)

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is not None:
            # Mixed precision for the backbone only; patch features and the bank stay float32.
            with torch.autocast(device_type=images.device.type, dtype=self.autocast_dtype):
                maps = self.extractor(images)
        else:
            maps = self.extractor(images)
        layer_maps = list(maps.values())
        if self.aggregation == "conv":
            return self.aggregator([m.shape[1] for m in layer_maps])(layer_maps)
        return patch_features(
            layer_maps,
            self.patchsize,
            self.stride,
            self.pretrain_embed_dimension,
            self.target_embed_dimension,
        )

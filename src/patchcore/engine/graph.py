"""The scoring steps after the patch features as torch modules built from ops every graph runtime has, so that
``patchcore export`` composes the engine's own arithmetic instead of re-deriving it (SPEC section 5):

- :class:`NearestBankDistance`: patch score = mean over the k nearest bank vectors of the distance
  (Euclidean or squared L2), exact in float32, by blocks of ``chunk`` bank rows (minimum, or top-k, per
  block, then over blocks), as :func:`~patchcore.engine.scoring.patch_scores` computes from the index. The
  distances are the torch exact search's own estimate (:func:`~patchcore.engine.search.torch_exact.squared_distances`
  on vectors centred like its bank); that search re-ranks in float64, which a graph cannot, so the graph
  keeps the float32 values (parity 1e-4 with the estimator, tested);
- :class:`AnomalyMapHead`: patch scores (N, 1, gh, gw) -> image scores (max) and maps: bilinear upsampling
  (align_corners=False), then scipy's gaussian filter (radius round(4 sigma), 'reflect' border) as two 1-D
  convolutions over an index-gathered padding, as :func:`~patchcore.engine.scoring.anomaly_maps` computes
  with scipy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .index import DISTANCES
from .search.torch_exact import squared_distances

__all__ = ["AnomalyMapHead", "NearestBankDistance", "gaussian_kernel", "reflect_index"]


class NearestBankDistance(nn.Module):
    """(R, D) patch vectors -> (R,) patch scores against a fixed memory bank, in float32 torch ops.

    The bank is stored centred on its mean (buffers ``mean``, ``bank_t`` (D, M), ``bank_sq`` (M,)), so the
    products work on small norms; memory per call: R x ``chunk`` distances.
    """

    def __init__(self, bank: np.ndarray, num_neighbors: int = 1, distance: str = "euclidean", chunk: int = 4096):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; known: {', '.join(DISTANCES)}")
        if chunk < 1 or num_neighbors < 1:
            raise ValueError(f"chunk and num_neighbors must be >= 1, got {chunk} and {num_neighbors}")
        values = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
        mean = values.double().mean(0).float()  # centred as TorchExactSearch centres its bank
        centred = values - mean
        self.k = int(num_neighbors)
        self.euclidean = distance == "euclidean"
        self.chunk = int(chunk)
        self.n_bank = len(values)
        self.register_buffer("mean", mean)
        self.register_buffer("bank_t", centred.t().contiguous())  # (D, M): the product's layout
        self.register_buffer("bank_sq", (centred.double() ** 2).sum(1).float())

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        queries = rows - self.mean
        best = []
        for start in range(0, self.n_bank, self.chunk):
            squared = squared_distances(
                queries, self.bank_t[:, start : start + self.chunk], self.bank_sq[start : start + self.chunk]
            )
            if self.k == 1:
                best.append(squared.min(dim=1, keepdim=True).values)
            else:
                best.append(torch.topk(squared, min(self.k, squared.shape[1]), dim=1, largest=False).values)
        squared = torch.cat(best, dim=1) if len(best) > 1 else best[0]
        if self.k == 1:
            squared = squared.min(dim=1).values if squared.shape[1] > 1 else squared[:, 0]
        else:
            squared = torch.topk(squared, min(self.k, squared.shape[1]), dim=1, largest=False).values
        squared = squared.clamp_min(0.0)
        values = squared.sqrt() if self.euclidean else squared
        return values if self.k == 1 else values.mean(dim=1)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter's 1-D kernel (radius round(truncate * sigma)), float64."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return torch.from_numpy(kernel / kernel.sum())


def reflect_index(size: int, radius: int) -> torch.Tensor:
    """Indices of scipy's 'reflect' padding (d c b a | a b c d | d c b a) by ``radius`` of a length-``size``
    axis."""
    index = np.arange(-radius, size + radius)
    period = 2 * size
    index = np.mod(index, period)
    index = np.where(index >= size, period - 1 - index, index)
    return torch.from_numpy(index.astype(np.int64))


class AnomalyMapHead(nn.Module):
    """Patch scores (N, 1, gh, gw) -> (image scores (N,), anomaly maps (N, H, W)) for one input size."""

    def __init__(self, input_size: tuple[int, int], sigma: float):
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.sigma = float(sigma)
        if self.sigma > 0:
            kernel = gaussian_kernel(self.sigma).float()
            radius = (len(kernel) - 1) // 2
            self.register_buffer("kernel_h", kernel.view(1, 1, -1, 1))
            self.register_buffer("kernel_w", kernel.view(1, 1, 1, -1))
            self.register_buffer("pad_h", reflect_index(self.input_size[0], radius))
            self.register_buffer("pad_w", reflect_index(self.input_size[1], radius))

    def smooth(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) gaussian filter with scipy's default 'reflect' border, as two 1-D convolutions."""
        maps = F.conv2d(maps.index_select(2, self.pad_h), self.kernel_h)
        return F.conv2d(maps.index_select(3, self.pad_w), self.kernel_w)

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_scores = scores.flatten(1).max(dim=1).values
        maps = F.interpolate(scores, size=self.input_size, mode="bilinear", align_corners=False)
        if self.sigma > 0:
            maps = self.smooth(maps)
        return image_scores, maps[:, 0]

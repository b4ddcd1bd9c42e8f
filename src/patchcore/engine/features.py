"""Locally aware patch features (SPEC section 3).

For each hooked layer map (B, C, h, w): unfold p x p neighbourhoods (zero padding), bring every layer after
the first onto the first layer's grid (bilinear, per neighbourhood map: unfold first, resize second), mean
pool each layer's rows to ``pretrain_embed_dimension`` and pool the stacked layers to
``target_embed_dimension``. The result is one vector per patch, rows in (image, row, column) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PatchFeatures", "patchify", "patch_features"]


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


class PatchFeatures:
    """Backbone + patch aggregation: images (B, 3, H, W) -> patch vectors (B*gh*gw, D) on the patch grid."""

    def __init__(
        self,
        extractor: torch.nn.Module,
        patchsize: int = 3,
        stride: int = 1,
        pretrain_embed_dimension: int | None = 1024,
        target_embed_dimension: int | None = 1024,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.extractor = extractor
        self.patchsize = patchsize
        self.stride = stride
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.autocast_dtype is not None:
            # Mixed precision for the backbone only; patch features and the bank stay float32.
            with torch.autocast(device_type=images.device.type, dtype=self.autocast_dtype):
                maps = self.extractor(images)
        else:
            maps = self.extractor(images)
        return patch_features(
            list(maps.values()),
            self.patchsize,
            self.stride,
            self.pretrain_embed_dimension,
            self.target_embed_dimension,
        )

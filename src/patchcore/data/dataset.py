"""torch Dataset over a list of samples, plus a collate function for its dicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .base import Sample, check_mask_size
from .transforms import ImageTransform, load_image, load_mask

__all__ = ["ImageDataset", "collate_samples"]


class ImageDataset(Dataset):
    """Loads and transforms samples on access.

    Items are dicts: ``image`` (3, H, W) float tensor, ``label`` int (0 good / 1 anomalous),
    ``index`` int, ``original_size`` (h, w) of the source image and, with ``with_masks``,
    ``mask`` (H, W) uint8 0/1 (union of all mask files; zeros when there are none, as for good
    images) and ``mask_channels`` (C, H, W) uint8 raw channel-0 values of each of the C mask files.
    """

    def __init__(
        self, samples: Sequence[Sample], transform: ImageTransform, with_masks: bool = False
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = load_image(sample.image_path)
        original_size = (image.height, image.width)
        tensor = self.transform(image)
        item: dict[str, Any] = {
            "image": tensor,
            "label": int(sample.is_anomalous),
            "index": int(index),
            "original_size": original_size,
        }
        if self.with_masks:
            channels = []
            for mask_path in sample.mask_paths:
                arr = load_mask(mask_path)
                check_mask_size(mask_path, arr.shape, sample.image_path, original_size)
                channels.append(self.transform.mask(arr))
            h, w = tensor.shape[-2:]
            stacked = torch.stack(channels) if channels else torch.zeros((0, h, w), dtype=torch.uint8)
            item["mask_channels"] = stacked
            item["mask"] = (stacked != 0).any(dim=0).to(torch.uint8)
        return item


def _stack(values: list[torch.Tensor], key: str) -> torch.Tensor:
    """torch.stack with an error that says what to change when sizes differ."""
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch '{key}' tensors of different shapes {sorted(shapes)}; "
            "set a fixed imagesize/resize or use batch_size=1"
        )
    return torch.stack(values)


def collate_samples(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for :class:`ImageDataset` items.

    Stacks images, labels, indices and masks; ``mask_channels`` and ``original_size`` stay lists
    because their shapes vary per sample.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {
        "image": _stack([b["image"] for b in batch], "image"),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "original_size": [tuple(b["original_size"]) for b in batch],
    }
    if "mask" in batch[0]:
        out["mask"] = _stack([b["mask"] for b in batch], "mask")
        out["mask_channels"] = [b["mask_channels"] for b in batch]
    return out

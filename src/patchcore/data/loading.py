"""Batching for the runs: a DataLoader over samples, iterated so that its workers stop at once on failure,
and the expansion of user-given files and folders into image paths."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .base import DataError, Sample, is_image_file
from .dataset import ImageDataset, collate_samples
from .transforms import ImageTransform

__all__ = ["LoaderBatches", "expand_images", "iterate_batches", "make_loader"]


def make_loader(
    samples: Sequence[Sample], transform: ImageTransform, batch_size: int, num_workers: int, with_masks: bool
) -> DataLoader:
    """A DataLoader of :class:`ImageDataset` items in sample order."""
    return DataLoader(
        ImageDataset(samples, transform, with_masks=with_masks),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_samples,
        persistent_workers=False,
    )


class LoaderBatches:
    """The loader's batches, iterated once, with ``dataset`` still visible (the feature cache fingerprints
    its files). The worker processes start only when iteration does: not at all on a cache hit."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.dataset = loader.dataset
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        self._iterator = iter(self.loader)
        return self._iterator

    def close(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


@contextlib.contextmanager
def iterate_batches(loader: DataLoader) -> Iterator[LoaderBatches]:
    """Iterate ``loader``, shutting its worker processes down at once if the loop fails (a bad image).

    Otherwise the failed iterator sits in a reference cycle with the exception's traceback and its workers
    are only stopped by a later garbage collection, which then stalls for several seconds per worker.
    """
    batches = LoaderBatches(loader)
    try:
        yield batches
    finally:
        batches.close()


def expand_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files given directly, plus every image under given folders (sorted, hidden ones skipped)."""
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # Like the data set loaders: skip hidden files and folders (macOS "._x.png", .ipynb_checkpoints).
            found = sorted(
                p for p in item.rglob("*")
                if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )  # fmt: skip
            if not found:
                raise DataError(f"no images in folder {item}")
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            raise DataError(f"image {item} does not exist")
    return images

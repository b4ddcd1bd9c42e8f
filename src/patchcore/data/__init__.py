"""Data sets (MVTec AD, AutoVI, MVTec LOCO, VisA, MVTec AD 2, Real-IAD, own folders, ELPV) and the image/mask transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .autovi import AUTOVI_OBJECTS, load_autovi, saturation_for
from .base import IMAGE_EXTENSIONS, DataError, ObjectData, Sample
from .dataset import ImageDataset, collate_samples
from .elpv import ELPV_OBJECTS, load_elpv
from .folder import load_folder
from .mvtec import MVTEC_CLASSES, load_mvtec
from .mvtec_ad2 import MVTEC_AD2_OBJECTS, load_mvtec_ad2
from .mvtec_loco import LOCO_OBJECTS, load_mvtec_loco
from .real_iad import REAL_IAD_OBJECTS, load_real_iad
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_image, load_mask
from .visa import VISA_OBJECTS, load_visa

__all__ = [
    "AUTOVI_OBJECTS",
    "DATASETS",
    "ELPV_OBJECTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "LOCO_OBJECTS",
    "MVTEC_AD2_OBJECTS",
    "MVTEC_CLASSES",
    "REAL_IAD_OBJECTS",
    "VISA_OBJECTS",
    "DataError",
    "ImageDataset",
    "ImageTransform",
    "ObjectData",
    "Sample",
    "collate_samples",
    "load_autovi",
    "load_dataset",
    "load_elpv",
    "load_folder",
    "load_image",
    "load_mask",
    "load_mvtec",
    "load_mvtec_ad2",
    "load_mvtec_loco",
    "load_real_iad",
    "load_visa",
    "saturation_for",
]

DATASETS: dict[str, Callable[..., list[ObjectData]]] = {
    "mvtec": load_mvtec,
    "autovi": load_autovi,
    "folder": load_folder,
    "elpv": load_elpv,
    "mvtec_loco": load_mvtec_loco,
    "visa": load_visa,
    "mvtec_ad2": load_mvtec_ad2,
    "real_iad": load_real_iad,
}


def load_dataset(
    kind: str, root: str | Path | None, objects: Sequence[str] | None = None, **options: Any
) -> list[ObjectData]:
    """Load data set ``kind`` (a key of :data:`DATASETS`); ``options`` go to its loader."""
    try:
        loader = DATASETS[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown data set kind {kind!r}; known: {', '.join(DATASETS)}") from None
    return loader(root, objects, **options)

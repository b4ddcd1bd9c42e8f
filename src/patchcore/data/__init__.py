"""Data sets (MVTec AD, AutoVI, MVTec LOCO, VisA, MVTec AD 2, Real-IAD, own folders, ELPV) and the image/mask transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .autovi import AUTOVI_OBJECTS, load_autovi, saturation_for
from .base import (
    AUTOVI_PROTOCOL,
    IMAGE_EXTENSIONS,
    LOCO_PROTOCOL,
    MVTEC_PROTOCOL,
    DataError,
    DatasetKind,
    EvaluationProtocol,
    ObjectData,
    Sample,
)
from .dataset import ImageDataset, collate_samples
from .elpv import ELPV_KIND, ELPV_OBJECTS, load_elpv
from .folder import load_folder
from .mvtec import MVTEC_CLASSES, load_mvtec
from .mvtec_ad2 import MVTEC_AD2_OBJECTS, load_mvtec_ad2
from .mvtec_loco import LOCO_OBJECTS, load_mvtec_loco
from .real_iad import REAL_IAD_OBJECTS, load_real_iad
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_image, load_mask
from .visa import VISA_OBJECTS, load_visa

__all__ = [
    "AUTOVI_OBJECTS",
    "AUTOVI_PROTOCOL",
    "DATASETS",
    "ELPV_OBJECTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "LOCO_OBJECTS",
    "LOCO_PROTOCOL",
    "MVTEC_AD2_OBJECTS",
    "MVTEC_CLASSES",
    "MVTEC_PROTOCOL",
    "REAL_IAD_OBJECTS",
    "VISA_OBJECTS",
    "DataError",
    "DatasetKind",
    "EvaluationProtocol",
    "ImageDataset",
    "ImageTransform",
    "ObjectData",
    "Sample",
    "collate_samples",
    "dataset_kind",
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

# Kinds whose loader takes options from the data section or needs no data.root (declared by their modules);
# every other kind: no options, data.root required.
DATASET_KINDS: dict[str, DatasetKind] = {"elpv": ELPV_KIND}


def dataset_kind(kind: str) -> DatasetKind:
    """What kind ``kind`` (a key of :data:`DATASETS`) takes from the data section and needs."""
    return DATASET_KINDS.get(kind.lower(), DatasetKind())


def load_dataset(
    kind: str, root: str | Path | None, objects: Sequence[str] | None = None, **options: Any
) -> list[ObjectData]:
    """Load data set ``kind`` (a key of :data:`DATASETS`); ``options`` go to its loader."""
    try:
        loader = DATASETS[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown data set kind {kind!r}; known: {', '.join(DATASETS)}") from None
    return loader(root, objects, **options)

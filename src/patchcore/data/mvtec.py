"""MVTec AD loader (Bergmann et al., CVPR 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .base import (
    DataError,
    ObjectData,
    Sample,
    find_mask,
    labelled_images,
    require_dir,
    resolve_root,
    sample_name,
    train_good_samples,
)

__all__ = ["MVTEC_CLASSES", "load_mvtec", "load_mvtec_object"]

MVTEC_CLASSES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


def load_mvtec_object(class_dir: Path, name: str | None = None) -> ObjectData:
    """One class folder: ``train/good``, ``test/{good,<defect>}``, ``ground_truth/<defect>/<stem>_mask.png``."""
    class_dir = require_dir(Path(class_dir), "MVTec class folder")
    train = train_good_samples(class_dir, "MVTec")

    test_root = require_dir(class_dir / "test", "MVTec test folder")
    test: list[Sample] = []
    for label, image_path in labelled_images(test_root):
        masks: tuple[Path, ...] = ()
        if label != "good":
            gt_dir = class_dir / "ground_truth" / label
            mask = find_mask(gt_dir, (f"{image_path.stem}_mask",))
            if mask is None:
                expected = gt_dir / f"{image_path.stem}_mask.png"
                raise DataError(f"missing ground-truth mask {expected} for defect image {image_path}")
            masks = (mask,)
        test.append(Sample(image_path, label, masks, sample_name(image_path, class_dir)))
    if not test:
        raise DataError(f"no test images in {test_root}")
    return ObjectData(
        name=name or class_dir.name,
        train=train,
        test=test,
        has_masks=True,
        root=class_dir,
    )


def load_mvtec(root: str | Path | None, objects: Sequence[str] | None = None) -> list[ObjectData]:
    """Load MVTec AD classes from ``root`` (the folder holding ``bottle/``, ``cable/``, ...).

    ``objects`` None loads every class of :data:`MVTEC_CLASSES` present under root, in that order.
    Explicitly requested names need not be official classes (MVTec-layout custom data works).
    """
    root_dir = resolve_root(root, "mvtec")
    if objects is None:
        names = [c for c in MVTEC_CLASSES if (root_dir / c).is_dir()]
        if not names:
            raise DataError(f"no MVTec AD class folders ({', '.join(MVTEC_CLASSES)}) found under {root_dir}")
    else:
        names = list(dict.fromkeys(objects))  # de-duplicate, keep order
        for n in names:
            require_dir(root_dir / n, f"MVTec class '{n}' folder")
    return [load_mvtec_object(root_dir / n, n) for n in names]

"""Loader for a user's own product images in an MVTec-like folder layout."""

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

__all__ = ["load_folder", "load_folder_object"]


def _has_train(path: Path) -> bool:
    return (path / "train" / "good").is_dir()


def load_folder_object(obj_dir: Path, name: str | None = None) -> ObjectData:
    """One object: ``train/good/*``, optional ``test/<label>/*``, optional ``ground_truth/<label>/``.

    Label "good" is defect-free, any other label a defect type. A defect image's mask is
    ``ground_truth/<label>/<stem>_mask.<ext>`` or ``ground_truth/<label>/<stem>.<ext>``; defect images
    without a mask are allowed (image-level ground truth only). ``has_masks`` is True when at least
    one defect image has a mask, so with partial annotation some anomalous samples have no
    ``mask_paths``; pixel metrics should then only use samples that have them.
    """
    obj_dir = require_dir(Path(obj_dir), "object folder")
    train = train_good_samples(obj_dir, "")

    test: list[Sample] = []
    test_root = obj_dir / "test"
    if test_root.is_dir():
        for label, image_path in labelled_images(test_root):
            masks: tuple[Path, ...] = ()
            if label != "good":
                stem = image_path.stem
                mask = find_mask(obj_dir / "ground_truth" / label, (f"{stem}_mask", stem))
                masks = (mask,) if mask is not None else ()
            test.append(Sample(image_path, label, masks, sample_name(image_path, obj_dir)))
    return ObjectData(
        name=name or obj_dir.name,
        train=train,
        test=test,
        has_masks=any(s.mask_paths for s in test),
        root=obj_dir,
    )


def load_folder(
    root: str | Path | None, objects: Sequence[str] | None = None, name: str | None = None
) -> list[ObjectData]:
    """Load one object (``root/train/good`` exists) or several (each sub-folder with ``train/good``).

    ``name`` names the single object (default: the folder name); it is ignored for several objects,
    which are named after their sub-folders. ``objects`` filters by object name; a requested
    name that is not there is a DataError.
    """
    root_dir = resolve_root(root, "folder")
    if (root_dir / "train").is_dir():
        obj_name = name or root_dir.name
        if objects is not None and obj_name not in objects:
            raise DataError(f"{root_dir} holds the single object '{obj_name}', not {list(objects)}")
        return [load_folder_object(root_dir, obj_name)]

    available = {
        p.name: p
        for p in sorted(root_dir.iterdir(), key=lambda p: p.name)
        if p.is_dir() and not p.name.startswith(".") and _has_train(p)
    }
    if not available:
        raise DataError(
            f"no training folder {root_dir / 'train' / 'good'} and no object sub-folders with train/good"
        )
    if objects is None:
        names = list(available)
    else:
        names = list(dict.fromkeys(objects))
        for n in names:
            if n not in available:
                raise DataError(f"object folder {root_dir / n / 'train' / 'good'} not found")
    return [load_folder_object(available[n], n) for n in names]

"""VisA loader (Zou et al., ECCV 2022; amazon-science/spot-diff): the 1-class split of ``split_csv/1cls.csv``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from .base import DataError, ObjectData, Sample, resolve_root

__all__ = ["VISA_OBJECTS", "load_visa"]

VISA_OBJECTS: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
_COLUMNS = ("object", "split", "label", "image", "mask")


def _read_split(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DataError(f"VisA split file not found: {csv_path} (the archive root holds split_csv/1cls.csv)")
    # newline="" lets the csv module take the file's CRLF line ends itself.
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"VisA split file {csv_path} lacks columns {missing} (header: {reader.fieldnames})"
            )
        rows = [{k: (row.get(k) or "").strip() for k in _COLUMNS} for row in reader]
    for i, row in enumerate(rows, start=2):
        if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
            raise DataError(
                f"VisA split file {csv_path} line {i}: split must be train/test and label normal/anomaly, "
                f"got {row['split']!r}, {row['label']!r}"
            )
    return rows


def _object_data(root: Path, name: str, rows: list[dict[str, str]]) -> ObjectData:
    """Samples of one object; the split is the CSV's, never the folders' (Normal/ holds test images too)."""
    train: list[Sample] = []
    test: list[Sample] = []
    for row in rows:
        image = root / row["image"]
        if not image.is_file():
            raise DataError(f"VisA image {image} listed in split_csv/1cls.csv does not exist")
        # Named by the path below the object (Normal/000 and Anomaly/000 both exist).
        sample_id = Path(row["image"]).with_suffix("").as_posix().removeprefix(f"{name}/")
        if row["split"] == "train":
            if row["label"] != "normal":
                raise DataError(f"VisA split file lists anomalous image {image} for training")
            train.append(Sample(image, "good", (), sample_id))
            continue
        masks: tuple[Path, ...] = ()
        if row["label"] == "anomaly" and row["mask"]:
            mask = root / row["mask"]
            if not mask.is_file():
                raise DataError(f"VisA mask {mask} of image {image} does not exist")
            masks = (mask,)
        label = "good" if row["label"] == "normal" else "anomaly"
        test.append(Sample(image, label, masks, sample_id))
    if not train:
        raise DataError(f"VisA object {name!r}: no training images in split_csv/1cls.csv")
    return ObjectData(
        name=name,
        train=train,
        test=test,
        has_masks=any(s.mask_paths for s in test),
        # class ids 1..9 or 0/255: non-zero is defect (the default protocol's binary masks)
        root=root / name,
    )


def load_visa(root: str | Path | None, objects: Sequence[str] | None = None) -> list[ObjectData]:
    """Load VisA objects from the archive root (``split_csv/1cls.csv`` + ``<object>/Data/...``).

    ``objects`` None loads every object of the CSV, official ones in :data:`VISA_OBJECTS` order first.
    """
    root_dir = resolve_root(root, "visa")
    rows = _read_split(root_dir / "split_csv" / "1cls.csv")
    by_object: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_object.setdefault(row["object"], []).append(row)
    if objects is None:
        names = [n for n in VISA_OBJECTS if n in by_object] + sorted(set(by_object) - set(VISA_OBJECTS))
        if not names:
            raise DataError(f"split_csv/1cls.csv under {root_dir} lists no objects")
    else:
        names = list(dict.fromkeys(objects))
        for n in names:
            if n not in by_object:
                raise DataError(f"VisA object {n!r} is not in {root_dir / 'split_csv' / '1cls.csv'}")
    return [_object_data(root_dir, n, by_object[n]) for n in names]

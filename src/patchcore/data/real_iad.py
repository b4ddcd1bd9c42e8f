"""Real-IAD loader (Wang et al., CVPR 2024: 30 objects, 5 camera views per sample, JSON split files).

Layout, as public loaders read it (anomalib's ``RealIADDataset``; the data set's own JSON files)::

    <root>/realiad_<256 | 512 | 1024 | raw>/<object>/OK/S0001/<object>_0001_OK_C1_<time>.jpg
    <root>/realiad_<res>/<object>/NG/<defect code>/S0002/<object>_0002_NG_<code>_C1_<time>.jpg  (+ its mask .png)
    <root>/realiad_jsons/realiad_jsons/<object>.json

The JSON file is the split: ``{"meta": {"prefix": ..., "normal_class": "OK", ...}, "train": [...], "test":
[...]}``, each entry ``{"category", "anomaly_class", "image_path", "mask_path"}`` with paths relative to
``realiad_<res>/<prefix>`` (the prefix is the object's folder; the object name when absent). An entry whose
``anomaly_class`` is the normal class is good, any other is a defect of that code; the folders are never
read for labels. ``data.root`` is the Real-IAD folder holding ``realiad_jsons/`` and one ``realiad_<res>/``
(or that ``realiad_<res>/`` folder itself, when several resolutions are unpacked).

A sample is the folder of its five views (``.../S0002``): ``Sample.name`` keeps that folder, so the
evaluation can give sample-level figures (a sample is defective if any view is; its score is the highest
view score), the data set's headline numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .base import DataError, EvaluationProtocol, ObjectData, Sample, require_dir, resolve_root

__all__ = ["REAL_IAD_OBJECTS", "REAL_IAD_PROTOCOL", "load_real_iad", "load_real_iad_object", "real_iad_folders"]

# MVTec AD's per-view metrics, plus AUROC / F1 over samples (a sample = the views in one folder).
REAL_IAD_PROTOCOL = EvaluationProtocol("real_iad", sample_level=True)

REAL_IAD_OBJECTS: tuple[str, ...] = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
    "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1",
    "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper",
)  # fmt: skip


def real_iad_folders(root: str | Path | None) -> tuple[Path, Path]:
    """(image folder ``realiad_<res>``, split folder ``realiad_jsons/realiad_jsons``) of a data root."""
    root_dir = resolve_root(root, "real_iad")
    if (root_dir / "realiad_jsons").is_dir():
        images = sorted(p for p in root_dir.glob("realiad_*") if p.is_dir() and p.name != "realiad_jsons")
        if not images:
            raise DataError(f"real_iad: no realiad_<resolution> image folder under {root_dir}")
        if len(images) > 1:
            raise DataError(
                f"real_iad: several resolutions under {root_dir} ({', '.join(p.name for p in images)}); set "
                f"data.root to the one to use, e.g. {images[0]}"
            )
        image_dir, json_root = images[0], root_dir / "realiad_jsons"
    elif root_dir.name.startswith("realiad_") and (root_dir.parent / "realiad_jsons").is_dir():
        image_dir, json_root = root_dir, root_dir.parent / "realiad_jsons"
    else:
        raise DataError(f"real_iad: {root_dir} holds no realiad_jsons/ folder (nor does its parent)")
    return image_dir, require_dir(json_root / "realiad_jsons", "real_iad split folder")


def _entries(data: dict, key: str, path: Path) -> list[dict]:
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{path}: '{key}' must be a list of entries")
    for e in entries:
        if not isinstance(e.get("image_path"), str) or not isinstance(e.get("anomaly_class"), str):
            raise DataError(f"{path}: a '{key}' entry lacks image_path or anomaly_class: {e}")
    return entries


def load_real_iad_object(image_dir: Path, json_path: Path, name: str) -> ObjectData:
    """One object from its JSON split file; every listed file must exist (an error names the first missing)."""
    try:
        data = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"real_iad: cannot read the split file {json_path}: {exc}") from exc
    if not isinstance(data, dict) or not ("train" in data or "test" in data):
        raise DataError(f"{json_path}: not a Real-IAD split file (no 'train' / 'test' lists)")
    meta = data.get("meta") or {}
    normal = meta.get("normal_class", "OK")
    base = image_dir / (meta.get("prefix") or name)

    def sample(entry: dict, split: str) -> Sample:
        image = base / entry["image_path"]
        if not image.is_file():
            raise DataError(f"real_iad {name}: {split} image {image} listed in {json_path} does not exist")
        label = "good" if entry["anomaly_class"] == normal else entry["anomaly_class"]
        masks: tuple[Path, ...] = ()
        if label != "good" and entry.get("mask_path"):
            mask = base / entry["mask_path"]
            if not mask.is_file():
                raise DataError(f"real_iad {name}: mask {mask} of {image} does not exist")
            masks = (mask,)
        return Sample(image, label, masks, Path(entry["image_path"]).with_suffix("").as_posix())

    train = [sample(e, "train") for e in _entries(data, "train", json_path)]
    defects = [s for s in train if s.is_anomalous]
    if defects:
        raise DataError(
            f"real_iad {name}: {json_path} lists defect images for training, e.g. {defects[0].image_path}"
        )
    if not train:
        raise DataError(f"real_iad {name}: no training images in {json_path}")
    test = [sample(e, "test") for e in _entries(data, "test", json_path)]
    return ObjectData(
        name=name,
        train=train,
        test=test,
        has_masks=any(s.mask_paths for s in test),
        root=base,
        protocol=REAL_IAD_PROTOCOL,
    )


def load_real_iad(root: str | Path | None, objects: Sequence[str] | None = None) -> list[ObjectData]:
    """Load Real-IAD objects (``objects`` None: every one of :data:`REAL_IAD_OBJECTS` with a split file)."""
    image_dir, json_dir = real_iad_folders(root)
    if objects is None:
        names = [n for n in REAL_IAD_OBJECTS if (json_dir / f"{n}.json").is_file()]
        if not names:
            raise DataError(f"real_iad: no split files <object>.json in {json_dir}")
    else:
        names = list(dict.fromkeys(objects))
        for n in names:
            if not (json_dir / f"{n}.json").is_file():
                raise DataError(f"real_iad: no split file {json_dir / (n + '.json')}")
    return [load_real_iad_object(image_dir, json_dir / f"{n}.json", n) for n in names]

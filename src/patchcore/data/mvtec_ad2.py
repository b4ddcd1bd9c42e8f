"""MVTec AD 2 loader (Heckler-Kram et al., 2025: 8 objects, high resolution, several lighting conditions).

Layout, as MVTec's public code (``MVTecAD2_public_code_utils``: its dataset class and upload checker) and its
evaluation script read it::

    <object>/train/good/NNN_regular.png
    <object>/validation/good/NNN_regular.png          good parts: calibration only, never trained on
    <object>/test_public/good/NNN_<lighting>.png
    <object>/test_public/bad/NNN_<lighting>.png
    <object>/test_public/ground_truth/bad/NNN_<lighting>_mask.png   0 / 255
    <object>/test_private/NNN_regular.png             no ground truth (scored on MVTec's server)
    <object>/test_private_mixed/NNN_mixed.png         no ground truth (scored on MVTec's server)

Only files named like the dataset class's glob (three digits first, ``.png``) count, in sorted order; the
test_public label folders are ``good`` and ``bad``. Every bad image must have its mask (the public code
would fail on a missing one; here it is an error naming it). The two private sets are
``ObjectData.unlabelled``: written for the benchmark server (evaluation.mvtec_ad2), never in a metric.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .base import DataError, EvaluationProtocol, ObjectData, Sample, require_dir, resolve_root, sample_name

__all__ = [
    "MVTEC_AD2_OBJECTS",
    "MVTEC_AD2_PRIVATE_SETS",
    "MVTEC_AD2_PROTOCOL",
    "load_mvtec_ad2",
    "load_mvtec_ad2_object",
]

MVTEC_AD2_OBJECTS: tuple[str, ...] = (
    "can",
    "fabric",
    "fruit_jelly",
    "rice",
    "sheet_metal",
    "vial",
    "wallplugs",
    "walnuts",
)
MVTEC_AD2_PRIVATE_SETS: tuple[str, ...] = ("test_private", "test_private_mixed")
# The public code's figures from float16 native maps (evaluation/mvtec_ad2.py); AU-PRO at 0.05 replaces the
# model-resolution AU-PRO, whose curve is therefore not drawn.
MVTEC_AD2_PROTOCOL = EvaluationProtocol("mvtec_ad2", pro_curve=False, native_pro_limit=0.05)

_IMAGE_NAME = re.compile(r"^[0-9]{3}.*\.png$")  # the public dataset class's glob: [0-9][0-9][0-9]*.png
_TEST_LABELS = ("good", "bad")


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _IMAGE_NAME.match(p.name))


def load_mvtec_ad2_object(obj_dir: Path, name: str | None = None) -> ObjectData:
    """One MVTec AD 2 object: train/good, validation/good, test_public (with masks), the private sets."""
    obj_dir = require_dir(Path(obj_dir), "MVTec AD 2 object folder")
    train_dir = require_dir(obj_dir / "train" / "good", "MVTec AD 2 train/good folder")
    train = [Sample(p, "good", (), sample_name(p, obj_dir)) for p in _images(train_dir)]
    if not train:
        raise DataError(f"no training images (NNN*.png) in {train_dir}")
    validation = [
        Sample(p, "good", (), sample_name(p, obj_dir)) for p in _images(obj_dir / "validation" / "good")
    ]
    test_dir = obj_dir / "test_public"
    test: list[Sample] = []
    if test_dir.is_dir():
        for label in _TEST_LABELS:
            for path in _images(test_dir / label):
                masks: tuple[Path, ...] = ()
                if label == "bad":
                    mask = test_dir / "ground_truth" / "bad" / f"{path.stem}_mask.png"
                    if not mask.is_file():
                        raise DataError(f"MVTec AD 2: the mask {mask} of defect image {path} is missing")
                    masks = (mask,)
                test.append(Sample(path, label, masks, sample_name(path, obj_dir)))
    unlabelled = {
        split: [Sample(p, split, (), sample_name(p, obj_dir)) for p in _images(obj_dir / split)]
        for split in MVTEC_AD2_PRIVATE_SETS
    }
    return ObjectData(
        name=name or obj_dir.name,
        train=train,
        test=test,
        has_masks=any(s.mask_paths for s in test),
        root=obj_dir,
        validation=validation,
        protocol=MVTEC_AD2_PROTOCOL,
        unlabelled={k: v for k, v in unlabelled.items() if v},
    )


def load_mvtec_ad2(root: str | Path | None, objects: Sequence[str] | None = None) -> list[ObjectData]:
    """Load MVTec AD 2 objects from ``root`` (the folder holding ``can/``, ``fabric/``, ...).

    ``objects`` None loads every object of :data:`MVTEC_AD2_OBJECTS` present, in that order; requested names
    need not be official ones (own data in the MVTec AD 2 layout works).
    """
    root_dir = resolve_root(root, "mvtec_ad2")
    if objects is None:
        names = [n for n in MVTEC_AD2_OBJECTS if (root_dir / n / "train").is_dir()]
        if not names:
            raise DataError(
                f"no MVTec AD 2 object folders ({', '.join(MVTEC_AD2_OBJECTS)}) found under {root_dir}"
            )
    else:
        names = list(dict.fromkeys(objects))
        for n in names:
            require_dir(root_dir / n, f"MVTec AD 2 object '{n}' folder")
    return [load_mvtec_ad2_object(root_dir / n, n) for n in names]

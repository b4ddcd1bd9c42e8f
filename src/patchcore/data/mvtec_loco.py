"""MVTec LOCO AD loader (Bergmann et al., IJCV 2022): logical and structural anomalies, one mask per defect."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .autovi import channel_test_samples, load_defects_config
from .base import (
    LOCO_PROTOCOL,
    DataError,
    ObjectData,
    Sample,
    list_images,
    require_dir,
    resolve_root,
    sample_name,
    train_good_samples,
)

__all__ = ["LOCO_ANOMALY_TYPES", "LOCO_OBJECTS", "load_mvtec_loco", "load_mvtec_loco_object"]

LOCO_OBJECTS: tuple[str, ...] = (
    "breakfast_box",
    "juice_bottle",
    "pushpins",
    "screw_bag",
    "splicing_connectors",
)
LOCO_ANOMALY_TYPES: tuple[str, ...] = ("logical_anomalies", "structural_anomalies")


def load_mvtec_loco_object(obj_dir: Path, name: str | None = None) -> ObjectData:
    """``train/good``, ``validation/good`` (calibration only), ``test/{good,logical_anomalies,
    structural_anomalies}``, ``ground_truth/<type>/<NNN>/<KKK>.png``, ``defects_config.json``.

    File names restart at 000 in every folder, so samples are named by their path (``test/good/000``).
    """
    obj_dir = require_dir(Path(obj_dir), "MVTec LOCO object folder")
    config = load_defects_config(obj_dir / "defects_config.json")
    train = train_good_samples(obj_dir, "MVTec LOCO")
    validation = [
        Sample(p, "good", (), sample_name(p, obj_dir)) for p in list_images(obj_dir / "validation" / "good")
    ]
    test = channel_test_samples(obj_dir, "MVTec LOCO")
    unknown = sorted({s.label for s in test} - {"good", *LOCO_ANOMALY_TYPES})
    if unknown:
        raise DataError(
            f"MVTec LOCO test folder {obj_dir / 'test'} has folders {unknown}; expected good, "
            + ", ".join(LOCO_ANOMALY_TYPES)
        )
    return ObjectData(
        name=name or obj_dir.name,
        train=train,
        test=test,
        has_masks=True,
        defects_config=config,
        root=obj_dir,
        validation=validation,
        protocol=LOCO_PROTOCOL,  # AutoVI's mask semantics: one PNG per defect, its value a pixel_value
    )


def load_mvtec_loco(root: str | Path | None, objects: Sequence[str] | None = None) -> list[ObjectData]:
    """Load MVTec LOCO AD objects from ``root`` (the folder holding ``breakfast_box/`` ...).

    ``objects`` None loads every object of :data:`LOCO_OBJECTS` present, in that order; requested names
    need not be official ones (own data in the LOCO layout works).
    """
    root_dir = resolve_root(root, "mvtec_loco")
    if objects is None:
        names = [n for n in LOCO_OBJECTS if (root_dir / n / "train").is_dir()]
        if not names:
            raise DataError(
                f"no MVTec LOCO object folders ({', '.join(LOCO_OBJECTS)}) found under {root_dir}"
            )
    else:
        names = list(dict.fromkeys(objects))
        for n in names:
            require_dir(root_dir / n, f"MVTec LOCO object '{n}' folder")
    return [load_mvtec_loco_object(root_dir / n, n) for n in names]

"""AutoVI loader (Renault automotive visual inspection data set, Carvalho et al. 2024)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from .base import (
    AUTOVI_PROTOCOL,
    DataError,
    ObjectData,
    Sample,
    labelled_images,
    list_images,
    require_dir,
    resolve_root,
    sample_name,
    train_good_samples,
)

__all__ = [
    "AUTOVI_OBJECTS",
    "channel_test_samples",
    "defect_name_for",
    "find_autovi_object",
    "load_autovi",
    "load_autovi_object",
    "load_defects_config",
    "saturation_for",
]

log = logging.getLogger("patchcore")

AUTOVI_OBJECTS: tuple[str, ...] = (
    "engine_wiring",
    "pipe_clip",
    "pipe_staple",
    "tank_screw",
    "underbody_pipes",
    "underbody_screw",
)

_CONFIG_KEYS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")


def find_autovi_object(root: Path, name: str) -> Path | None:
    """The folder of object ``name``: ``root/<name>`` or, as unzipped, ``root/<name>/<name>``."""
    for candidate in (root / name, root / name / name):
        if (candidate / "train").is_dir():
            return candidate
    return None


def _entry_error(path: Path, index: int, entry: dict, problem: str) -> DataError:
    name = entry.get("defect_name", "?") if isinstance(entry, dict) else "?"
    return DataError(f"defects config {path}: entry {index} ({name!r}): {problem}")


def load_defects_config(path: Path) -> list[dict]:
    """Parse ``defects_config.json`` and check it as strictly as the official AutoVI / MVTec LOCO scripts.

    Each entry: ``defect_name`` (string), ``pixel_value`` (integer 1..255), ``relative_saturation`` (a JSON
    boolean: the string "false" would be truthy), ``saturation_threshold`` (a float in (0, 1] when relative,
    a positive integer pixel count when absolute; null is an error). A ``pixel_value`` given twice: the
    official scripts keep the last entry, so does :func:`saturation_for`, with a warning here.
    """
    if not path.is_file():
        raise DataError(f"defects config not found: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot parse defects config {path}: {exc}") from exc
    if not isinstance(config, list) or not all(isinstance(e, dict) for e in config):
        raise DataError(f"defects config {path} must be a JSON list of objects")
    if not config:
        raise DataError(f"defects config {path} has no entries")
    seen: dict[int, int] = {}
    for i, entry in enumerate(config):
        missing = [k for k in _CONFIG_KEYS if k not in entry]
        if missing:
            raise _entry_error(path, i, entry, f"lacks {missing}")
        if not isinstance(entry["defect_name"], str):
            raise _entry_error(path, i, entry, "defect_name must be a string")
        value = entry["pixel_value"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            raise _entry_error(path, i, entry, f"pixel_value must be an integer in 1..255, got {value!r}")
        relative = entry["relative_saturation"]
        if not isinstance(relative, bool):
            raise _entry_error(
                path, i, entry, f"relative_saturation must be a JSON boolean (true/false), got {relative!r}"
            )
        threshold = entry["saturation_threshold"]
        if threshold is None:
            raise _entry_error(path, i, entry, "saturation_threshold is null")
        if relative:
            # The official DefectConfig asserts a float here: an integer 1 is refused there too.
            if not isinstance(threshold, float) or not 0.0 < threshold <= 1.0:
                raise _entry_error(
                    path, i, entry,
                    f"a relative saturation_threshold must be a float in (0, 1] (e.g. 1.0), got {threshold!r}",
                )  # fmt: skip
        elif isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise _entry_error(
                path, i, entry,
                f"an absolute saturation_threshold must be a positive integer pixel count, got {threshold!r}",
            )  # fmt: skip
        if value in seen:
            log.warning(
                "defects config %s: pixel_value %d is given by entries %d and %d; the last one (%r) is used, "
                "as the official evaluation script does",
                path, value, seen[value], i, entry["defect_name"],
            )  # fmt: skip
        seen[value] = i
    return config


def saturation_for(defects_config: Sequence[dict], pixel_value: int) -> tuple[float, bool]:
    """(saturation_threshold, relative_saturation) of the defect type drawn with ``pixel_value``.

    The last entry with that value wins (the official scripts build a dict from the list).
    """
    for entry in reversed(defects_config):
        if int(entry["pixel_value"]) == int(pixel_value):
            return float(entry["saturation_threshold"]), bool(entry["relative_saturation"])
    known = sorted({int(e["pixel_value"]) for e in defects_config})
    raise DataError(f"mask pixel value {pixel_value} is not in defects_config (known values: {known})")


def defect_name_for(defects_config: Sequence[dict], pixel_value: int) -> str:
    """``defect_name`` of the entry drawn with ``pixel_value`` (last entry wins)."""
    for entry in reversed(defects_config):
        if int(entry["pixel_value"]) == int(pixel_value):
            return str(entry["defect_name"])
    raise DataError(f"mask pixel value {pixel_value} is not in defects_config")


def channel_test_samples(obj_dir: Path, what: str) -> list[Sample]:
    """``test/<label>/*`` with ``ground_truth/<label>/<stem>/*.png`` (one PNG per annotated defect)."""
    test_root = require_dir(obj_dir / "test", f"{what} test folder")
    test: list[Sample] = []
    for label, image_path in labelled_images(test_root):
        masks: tuple[Path, ...] = ()
        if label != "good":
            gt_dir = obj_dir / "ground_truth" / label / image_path.stem
            if not gt_dir.is_dir():
                raise DataError(f"missing ground-truth folder {gt_dir} for defect image {image_path}")
            masks = tuple(list_images(gt_dir))  # one PNG per annotated defect, sorted
            if not masks:
                raise DataError(f"no mask images in {gt_dir} for defect image {image_path}")
        test.append(Sample(image_path, label, masks, sample_name(image_path, obj_dir)))
    if not test:
        raise DataError(f"no test images in {test_root}")
    return test


def load_autovi_object(obj_dir: Path, name: str | None = None) -> ObjectData:
    """One object folder: ``train/good``, ``test/<label>``, ``ground_truth/<defect>/<stem>/*.png``.

    ``defect_example.png`` and other files outside those folders are not samples.
    """
    obj_dir = require_dir(Path(obj_dir), "AutoVI object folder")
    config = load_defects_config(obj_dir / "defects_config.json")
    train = train_good_samples(obj_dir, "AutoVI")
    test = channel_test_samples(obj_dir, "AutoVI")
    return ObjectData(
        name=name or obj_dir.name,
        train=train,
        test=test,
        has_masks=True,
        defects_config=config,
        root=obj_dir,
        protocol=AUTOVI_PROTOCOL,
    )


def load_autovi(root: str | Path | None, objects: Sequence[str] | None = None) -> list[ObjectData]:
    """Load AutoVI objects from ``root``; both ``root/<obj>/train`` and ``root/<obj>/<obj>/train`` work.

    ``objects`` None loads every object of :data:`AUTOVI_OBJECTS` present, in that order.
    """
    root_dir = resolve_root(root, "autovi")
    if objects is None:
        found = [(n, find_autovi_object(root_dir, n)) for n in AUTOVI_OBJECTS]
        pairs = [(n, d) for n, d in found if d is not None]
        if not pairs:
            raise DataError(f"no AutoVI object folders ({', '.join(AUTOVI_OBJECTS)}) found under {root_dir}")
    else:
        pairs = []
        for n in dict.fromkeys(objects):
            d = find_autovi_object(root_dir, n)
            if d is None:
                raise DataError(
                    f"AutoVI object '{n}' not found: neither {root_dir / n / 'train'} "
                    f"nor {root_dir / n / n / 'train'} exists"
                )
            pairs.append((n, d))
    return [load_autovi_object(d, n) for n, d in pairs]

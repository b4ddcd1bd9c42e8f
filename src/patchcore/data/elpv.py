"""ELPV solar-cell loader (Buerhop-Lutz et al. 2018; Deitsch et al. 2019) via the ``elpv-dataset`` package."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

from .base import DataError, DatasetKind, ObjectData, Sample, resolve_root

__all__ = ["ELPV_KIND", "ELPV_OBJECTS", "elpv_data_dir", "load_elpv"]

ELPV_OBJECTS: tuple[str, ...] = ("mono", "poly")

# Annotated defect probabilities are 0, 1/3, 2/3 and 1; compare with a tolerance since the
# csv holds them as decimal strings.
_EPS = 1e-6


def elpv_data_dir() -> Path:
    """The installed ``elpv_dataset`` package's data folder (holding labels.csv and images/)."""
    # find_spec locates the package without importing it (its import pulls in numpy only,
    # but it need not run at all).
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the ELPV data set needs the elpv-dataset package: pip install elpv-dataset")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_labels(csv_path: Path) -> list[tuple[str, float, str]]:
    """Rows (relative image path, defect probability, cell type) of labels.csv, in file order."""
    rows = []
    try:
        text = csv_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read ELPV labels {csv_path}: {exc}") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.replace(",", " ").split()  # whitespace separated; tolerate a comma variant
        if not fields:
            continue
        try:
            path, prob, kind = fields[0], float(fields[1]), fields[2]
        except (IndexError, ValueError) as exc:
            raise DataError(f"{csv_path}:{lineno}: expected 'path probability type', got {line!r}") from exc
        rows.append((path, prob, kind))
    if not rows:
        raise DataError(f"no rows in ELPV labels {csv_path}")
    return rows

# The application passes these ``data`` keys to load_elpv; without data.root the pip package's copy is used.
ELPV_KIND = DatasetKind(options=("train_fraction", "include_uncertain"), needs_root=False)


def load_elpv(
    root: str | Path | None = None,
    objects: Sequence[str] | None = None,
    train_fraction: float = 2 / 3,
    include_uncertain: bool = False,
) -> list[ObjectData]:
    """Load the ELPV cells as objects "mono" and "poly" (no pixel ground truth).

    ``root`` is the folder with ``labels.csv`` (default: the installed package's data folder).
    Probability 0 is "good" and 1.0 "defective"; the uncertain 1/3 and 2/3 cells are left out
    unless ``include_uncertain``, which adds the 2/3 cells as "defective" (>= 0.5) while the 1/3
    cells stay out (neither clearly good nor defective, so they would only blur the metrics).
    Train is the first ``floor(train_fraction * n_good)`` good cells in file order; test is the
    remaining good cells plus the defective ones, in file order.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    data_dir = elpv_data_dir() if root is None else resolve_root(root, "elpv")
    csv_path = data_dir / "labels.csv"
    if not csv_path.is_file() and (data_dir / "data" / "labels.csv").is_file():
        data_dir, csv_path = data_dir / "data", data_dir / "data" / "labels.csv"  # package folder given
    if not csv_path.is_file():
        raise DataError(f"ELPV labels file not found: {csv_path}")

    names = list(ELPV_OBJECTS) if objects is None else list(dict.fromkeys(objects))
    unknown = [n for n in names if n not in ELPV_OBJECTS]
    if unknown:
        raise DataError(f"unknown ELPV objects {unknown} in {csv_path}; known: {list(ELPV_OBJECTS)}")

    rows = _read_labels(csv_path)
    result = []
    for obj in names:
        good: list[Sample] = []
        ordered: list[Sample] = []  # good and defective in file order, for the test split
        for rel, prob, kind in rows:
            if kind != obj:
                continue
            if prob <= _EPS:
                label = "good"
            elif prob >= 1.0 - _EPS or (include_uncertain and prob >= 0.5):
                label = "defective"
            else:
                continue
            image_path = data_dir / rel
            if not image_path.is_file():
                raise DataError(f"ELPV image {image_path} listed in {csv_path} does not exist")
            sample = Sample(image_path, label, (), Path(rel).with_suffix("").as_posix())
            ordered.append(sample)
            if label == "good":
                good.append(sample)
        n_train = math.floor(train_fraction * len(good))
        if n_train == 0:
            raise DataError(f"no ELPV '{obj}' training cells in {csv_path}")
        train = good[:n_train]
        train_ids = {id(s) for s in train}
        test = [s for s in ordered if id(s) not in train_ids]
        result.append(ObjectData(name=obj, train=train, test=test, has_masks=False, root=data_dir))
    return result

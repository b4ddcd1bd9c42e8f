"""Shared types and file-system helpers for the data set loaders."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ObjectData",
    "Sample",
    "find_mask",
    "is_image_file",
    "list_images",
    "require_dir",
    "resolve_root",
    "sample_name",
    "train_good_samples",
]

# Lower-case; matched case-insensitively so "IMG_001.PNG" from a camera counts too.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad input data: message names the offending path(s)."""


@dataclass(frozen=True)
class Sample:
    """One image with its label and (optional) pixel ground truth."""

    image_path: Path
    label: str  # "good" or the defect type
    mask_paths: tuple[Path, ...] = ()  # zero, one, or several mask files (AutoVI: one PNG per defect)
    name: str = ""  # stable id relative to the object root, e.g. "test/crack/000" (no extension)

    @property
    def is_anomalous(self) -> bool:
        """True for every label other than "good"."""
        return self.label != "good"


@dataclass
class ObjectData:
    """Train/test split of one object (product class) of a data set."""

    name: str  # object/class name, e.g. "bottle", "mono"
    train: list[Sample]  # defect-free only (train/good)
    test: list[Sample]
    has_masks: bool  # whether pixel ground truth exists for this data set
    mask_format: str = "binary"  # "binary" (MVTec/folder/VisA) or "autovi" (channel value = pixel_value)
    defects_config: list[dict] | None = None  # AutoVI / LOCO defects_config.json entries
    root: Path | None = None
    # Defect-free images held out from training (MVTec LOCO validation/good): for calibration, never scored.
    validation: list[Sample] = field(default_factory=list)
    # Evaluation protocol of the data set: "mvtec" (pooled image AUROC, pixel AUROC, AU-PRO), "autovi"
    # (official AutoVI script: sPRO over all test images at native size) or "mvtec_loco" (sPRO per anomaly
    # type, mean of logical and structural).
    protocol: str = "mvtec"
    # Test sets without ground truth, by name (MVTec AD 2's test_private, test_private_mixed): maps are
    # written for a benchmark server, never scored here.
    unlabelled: dict[str, list[Sample]] = field(default_factory=dict)


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a visible file with an image extension (case-insensitive)."""
    # Hidden files are skipped because macOS zips ship "._000.png" AppleDouble files
    # that carry an image extension but are not images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (deterministic across file systems)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def labelled_images(test_root: Path) -> Iterator[tuple[str, Path]]:
    """(label, image path) for the images of every ``test_root/<label>/`` folder, labels in name order.

    Hidden folders are skipped, and so is a folder without images (checkpoints, notes): not a defect type.
    """
    for label_dir in sorted(test_root.iterdir(), key=lambda p: p.name):
        if label_dir.is_dir() and not label_dir.name.startswith("."):
            for image_path in list_images(label_dir):
                yield label_dir.name, image_path


def sample_name(path: Path, root: Path) -> str:
    """Path of ``path`` relative to ``root`` without extension, always with "/" separators."""
    return path.relative_to(root).with_suffix("").as_posix()


def find_mask(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """First existing image file in ``folder`` whose stem is one of ``stems`` (in that order)."""
    if not folder.is_dir():
        return None
    by_stem: dict[str, Path] = {}
    for p in list_images(folder):
        by_stem.setdefault(p.stem, p)
    for stem in stems:
        if stem in by_stem:
            return by_stem[stem]
    return None


def train_good_samples(obj_dir: Path, what: str) -> list[Sample]:
    """The defect-free training images of ``<obj_dir>/train/good`` (an error when there are none)."""
    train_dir = require_dir(obj_dir / "train" / "good", f"{what} train/good folder".strip())
    train = [Sample(p, "good", (), sample_name(p, obj_dir)) for p in list_images(train_dir)]
    if not train:
        raise DataError(f"no training images in {train_dir}")
    return train


def resolve_root(root: str | Path | None, kind: str) -> Path:
    """``root`` as an existing directory, or DataError naming it."""
    if root is None:
        raise DataError(f"{kind}: a data root folder is required")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{kind}: data root {path} does not exist or is not a folder")
    return path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else DataError naming it."""
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path

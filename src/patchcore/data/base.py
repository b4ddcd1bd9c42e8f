"""Shared types and file-system helpers for the data set loaders."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AUTOVI_PROTOCOL",
    "IMAGE_EXTENSIONS",
    "LOCO_PROTOCOL",
    "MVTEC_PROTOCOL",
    "DataError",
    "DatasetKind",
    "EvaluationProtocol",
    "ObjectData",
    "Sample",
    "check_mask_size",
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
class EvaluationProtocol:
    """How the test split of a data set is evaluated: declared by its loader, read by ``evaluation``.

    ``mvtec`` (MVTec AD, VisA, own folders, ELPV): pooled image AUROC, pixel AUROC and AU-PRO at model
    resolution. ``autovi`` / ``mvtec_loco``: the official scripts' numbers from maps saved at native size in
    16-bit levels (sPRO replaces AU-PRO; its regions are logical, not connected). ``mvtec_ad2`` and
    ``real_iad`` are declared by their loaders (data/mvtec_ad2.py, data/real_iad.py).
    """

    name: str
    # "binary": any non-zero mask pixel is a defect; "valued": one file per defect, its value a defects_config
    # pixel_value (with a saturation threshold per defect).
    mask_kind: str = "binary"
    native_spro: bool = False  # sPRO and the class-mean image AUROC from native-size 16-bit maps
    spro_per_type: bool = (
        False  # one sPRO curve per anomaly type, the object's value their mean (else pooled)
    )
    map_format: str = "png"  # saved native maps: "png" (16-bit levels) or "tiff" (float, LOCO's evaluator)
    pro_curve: bool = True  # the AU-PRO curve is drawn in the report
    # MVTec AD 2 (its public code): from float16 native maps, AU-PRO up to this FPR limit, image AUROC of the
    # map maximum and the segmentation F1 at the validation goods' mean + 3 std; None: not this protocol.
    native_pro_limit: float | None = None
    sample_level: bool = False  # Real-IAD: also AUROC / F1 over samples (the views in one folder)

    def __post_init__(self) -> None:
        if self.mask_kind not in ("binary", "valued"):
            raise ValueError(f"unknown mask kind {self.mask_kind!r}")
        if self.map_format not in ("png", "tiff"):
            raise ValueError(f"unknown map format {self.map_format!r}")


MVTEC_PROTOCOL = EvaluationProtocol("mvtec")
AUTOVI_PROTOCOL = EvaluationProtocol("autovi", mask_kind="valued", native_spro=True, pro_curve=False)
LOCO_PROTOCOL = EvaluationProtocol(
    "mvtec_loco", mask_kind="valued", native_spro=True, spro_per_type=True, map_format="tiff", pro_curve=False
)


@dataclass(frozen=True)
class DatasetKind:
    """What the application must know of a data-set kind beyond its loader, declared by the loader's module:
    the ``data`` section keys its loader takes as options, and whether it needs ``data.root``."""

    options: tuple[str, ...] = ()
    needs_root: bool = True


def check_mask_size(
    mask_path: Path, mask_shape: tuple[int, int], image_path: Path, image_shape: tuple[int, int]
) -> None:
    """The one mask-size rule: a mask is exactly the size of its image (shapes (height, width))."""
    if tuple(mask_shape) != tuple(image_shape):
        raise DataError(
            f"mask {mask_path} is {mask_shape[1]}x{mask_shape[0]} but its image {image_path} is "
            f"{image_shape[1]}x{image_shape[0]} (width x height)"
        )


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
    defects_config: list[dict] | None = None  # AutoVI / LOCO defects_config.json entries
    root: Path | None = None
    # Defect-free images held out from training (MVTec LOCO validation/good): for calibration, never scored.
    validation: list[Sample] = field(default_factory=list)
    # How its test split is evaluated (and what its masks mean): declared by the loader.
    protocol: EvaluationProtocol = MVTEC_PROTOCOL

    @property
    def mask_format(self) -> str:
        """The mask kind of the protocol: "binary" or "valued" (one file per defect, value = pixel_value)."""
        return self.protocol.mask_kind
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

"""Up-front checks of a data set's files: every image and mask header is read (not decoded) before a run
starts, so an unreadable file or a size that cannot be batched is reported in the first seconds, naming
the file, instead of after training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import PIL.Image

from .base import DataError, Sample, check_mask_size
from .transforms import ImageTransform

__all__ = ["check_samples", "image_size"]

_EXIF_ORIENTATION = 0x0112
_SWAPPED = (5, 6, 7, 8)
_EXIF_IN_HEADER = ("JPEG", "MPO", "TIFF", "WEBP")  # EXIF orientations that rotate by 90 degrees: width and height trade places


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as :func:`load_image` returns it (EXIF orientation applied), from its
    header only; DataError naming the file when it is not a readable image."""
    try:
        with PIL.Image.open(path) as img:
            width, height = img.size
            # Only where the orientation is in the header: PIL finds a PNG's eXIf chunk by decoding it all.
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if img.format in _EXIF_IN_HEADER else 1
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if width < 1 or height < 1:
        raise DataError(f"image {path} is empty ({width}x{height})")
    return (width, height) if orientation in _SWAPPED else (height, width)


def check_samples(samples: Sequence[Sample], transform: ImageTransform, what: str) -> None:
    """Read the header of every image and mask of ``samples``: each must be readable, each mask the size
    of its image, and all images must transform to one size (they are batched together)."""
    first: tuple[Path, tuple[int, int], tuple[int, int]] | None = None
    for sample in samples:
        size = image_size(sample.image_path)
        for mask_path in sample.mask_paths:
            check_mask_size(mask_path, image_size(mask_path), sample.image_path, size)
        out = transform.output_size(size)
        if first is None:
            first = (sample.image_path, size, out)
        elif out != first[2]:
            raise DataError(
                f"{what}: images of different sizes cannot be batched: {first[0]} is {first[1][1]}x{first[1][0]} "
                f"-> {first[2][1]}x{first[2][0]}, {sample.image_path} is {size[1]}x{size[0]} -> {out[1]}x{out[0]} "
                "(width x height, after resize/crop); set model.imagesize (a crop) or model.resize: [h, w]"
            )

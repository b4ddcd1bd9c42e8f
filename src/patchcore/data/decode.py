"""The one image decoding path: files for ``predict``, ``calibrate``, training and evaluation, and the bytes of
an upload to the service, all become the same 8-bit RGB image.

- The image is fully decoded here, so a truncated file fails at once, naming it.
- A camera's EXIF orientation flag is applied (the image as every viewer shows it, and as it was annotated).
- Images with more than 8 bits per sample are scaled by their **container's** bit depth (a 16-bit PNG or
  TIFF by 65535; a TIFF that declares 12 bits per sample by 4095; a float image by its [0, 1] convention),
  never by their own maximum: two images that differ in one pixel get the same scale, so the same scores.
- A pixel budget (``max_pixels``, frames included) is checked from the header, before any pixel is decoded,
  so a small file that would expand to gigabytes is refused without the memory being taken.

Errors are :class:`~patchcore.data.base.DataError` subclasses naming the image: :class:`NotAnImageError`
(nothing decodable), :class:`CorruptImageError` (truncated or corrupt data), :class:`ImageTooLargeError`
(over the pixel budget); the service turns them into 400 / 413 answers.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import PIL.Image
import PIL.ImageOps

from .base import DataError

__all__ = [
    "CorruptImageError",
    "ImageTooLargeError",
    "NotAnImageError",
    "check_image",
    "container_bits",
    "decode_image",
    "open_upright",
    "to_rgb",
]

# Modes whose samples do not fit in 8 bits; PIL's own convert("RGB") clips these, which turns most 12/16-bit
# camera images into a white sheet.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112
_TIFF_BITS_PER_SAMPLE = 258


class NotAnImageError(DataError):
    """No decoder recognises the data."""


class CorruptImageError(DataError):
    """A recognised image whose data is truncated or corrupt."""


class ImageTooLargeError(DataError):
    """More pixels than the budget allows (checked from the header, before decoding)."""


def _mode_bits(mode: str) -> int | None:
    """The sample width a wide mode implies (None: float, no bit depth)."""
    if mode == "F":
        return None
    if mode.startswith("I;16"):
        return 16
    return 32  # "I": 32-bit integers


def container_bits(image: PIL.Image.Image) -> int | None:
    """Bits per sample the file declares, read before the image is loaded: a TIFF's BitsPerSample tag,
    else the raw layout of the encoded data (``I;16B`` in a 16-bit PNG), else the PIL mode's width.
    None for float images (their range is [0, 1] by convention)."""
    if image.mode == "F":
        return None
    tags = getattr(image, "tag_v2", None)
    if tags is not None:
        declared = tags.get(_TIFF_BITS_PER_SAMPLE)
        if isinstance(declared, tuple) and declared:
            declared = declared[0]
        if isinstance(declared, int) and 8 < declared <= 32:
            return declared
    for tile in getattr(image, "tile", None) or []:
        raw = tile.args[0] if isinstance(tile.args, tuple) and tile.args else tile.args
        if isinstance(raw, str):
            if raw.startswith("I;16"):
                return 16
            if raw.startswith("I;8"):
                return 8
    return _mode_bits(image.mode)


def _wide_to_uint8(image: PIL.Image.Image, bits: int | None) -> PIL.Image.Image:
    arr = np.asarray(image).astype(np.float64)
    scale = 255.0 if bits is None else 255.0 / (2**bits - 1)
    return PIL.Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: PIL.Image.Image, bits: int | None = None) -> PIL.Image.Image:
    """Any PIL image as 8-bit RGB.

    Grayscale is replicated to 3 channels, the alpha channel of RGBA/LA is dropped (same as
    ``convert("RGB")``, which the reference implementation used), palette images go through their palette,
    and wide images (16/32-bit integers, floats) are scaled, not clipped: by ``bits`` when the file declared
    its depth (:func:`container_bits`), else by their mode's width (``I;16``: 16 bits, ``I``: 32 bits,
    ``F``: the range [0, 1]).
    """
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_MODES:
        return _wide_to_uint8(image, bits if bits is not None else _mode_bits(image.mode)).convert("RGB")
    if image.mode in ("P", "PA"):
        # Via RGBA so palette transparency is resolved by PIL rather than producing a warning.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


@contextlib.contextmanager
def _opened(
    source: str | os.PathLike | IO[bytes], label: str, max_pixels: int | None
) -> Iterator[PIL.Image.Image]:
    """The opened (not yet decoded) image after its header checks; every decoder error becomes a
    DataError naming ``label``."""
    try:
        with warnings.catch_warnings():
            # Our own budget decides; PIL's bomb warning/error is process-wide state.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(source) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise CorruptImageError(f"image {label} is empty ({width}x{height})")
                frames = max(int(getattr(image, "n_frames", 1) or 1), 1)
                if max_pixels is not None and width * height * frames > max_pixels:
                    raise ImageTooLargeError(
                        f"{label}: {width}x{height} image ({frames} frame(s)) exceeds the limit of "
                        f"{max_pixels} pixels"
                    )
                yield image
    except DataError:
        raise
    except PIL.Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{label}: image too large to decode ({exc})") from exc
    except FileNotFoundError as exc:
        raise DataError(f"cannot read image {label}: no such file") from exc
    except PIL.UnidentifiedImageError as exc:
        raise NotAnImageError(f"cannot read image {label}: not an image file (cannot be decoded)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or corrupt data surfaces as one of these from the decoders.
        raise CorruptImageError(f"cannot read image {label}: truncated or corrupt ({exc})") from exc


def open_upright(
    source: str | os.PathLike | bytes | IO[bytes], name: str | None = None, max_pixels: int | None = None
) -> tuple[PIL.Image.Image, int | None]:
    """(decoded image in its own mode, turned upright by its EXIF orientation; its container bit depth).

    ``source``: a path, the bytes of a file, or a binary file object. ``name`` names the image in errors
    (default: the path, or "image"). ``max_pixels``: refuse images (all frames together) above it.
    """
    if isinstance(source, (str, os.PathLike)):
        label = name or str(source)
        opener: str | os.PathLike | IO[bytes] = Path(source)
    else:
        label = name or "image"
        opener = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with _opened(opener, label, max_pixels) as image:
        bits = container_bits(image)
        image.load()  # decode now, so a truncated file fails here, naming it
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return PIL.ImageOps.exif_transpose(image), bits
        return image, bits  # decoded: closing the file keeps the pixels


def decode_image(
    source: str | os.PathLike | bytes | IO[bytes], name: str | None = None, max_pixels: int | None = None
) -> PIL.Image.Image:
    """The 8-bit RGB image every caller scores (see the module's rules); DataError naming it otherwise."""
    image, bits = open_upright(source, name, max_pixels)
    return to_rgb(image, bits)


def check_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """Decode ``path`` as a check, without keeping it: (height, width) upright, or DataError naming it.

    JPEGs are decoded at reduced scale (``draft``: every entropy-coded byte is still read, so a truncated
    file still fails), other formats in full.
    """
    with _opened(Path(path), str(path), max_pixels) as image:
        width, height = image.size
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        image.load()
        swapped = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (width, height) if swapped else (height, width)

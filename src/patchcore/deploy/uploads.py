"""Checking an uploaded image by decoding it (never by its name or declared type), within size limits."""

from __future__ import annotations

import io
import warnings

import PIL.Image

from ..data.base import DataError
from ..data.decode import ImageTooLargeError, NotAnImageError, decode_image

__all__ = ["UploadError", "decode_upload", "declared_pixels"]


class UploadError(ValueError):
    """An upload that is refused: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_bytes: int, max_pixels: int, name: str = "upload") -> PIL.Image.Image:
    """The decoded 8-bit RGB image, or an :class:`UploadError` (413 too large, 400 unusable).

    The pixel count is checked from the header before any pixel is decoded, so a small file that would
    expand to gigabytes (a decompression bomb) is refused without the memory being taken.
    """
    if len(data) == 0:
        raise UploadError(400, f"{name}: empty upload (0 bytes)")
    if len(data) > max_bytes:
        raise UploadError(413, f"{name}: upload of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        # The one decoding path of predict and calibrate: EXIF orientation, container bit depth.
        return decode_image(data, name, max_pixels)
    except ImageTooLargeError as exc:
        raise UploadError(413, str(exc)) from exc
    except NotAnImageError as exc:
        raise UploadError(400, f"{name}: not an image file (cannot be decoded)") from exc
    except DataError as exc:
        raise UploadError(400, f"{name}: cannot decode the image (truncated or corrupt): {exc.__cause__ or exc}") from exc


def declared_pixels(data: bytes) -> int | None:
    """The pixel count an image's header announces (width x height x frames), read without decoding any
    pixel; None if the data is no image PIL can open (decoding will say why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                return width * height * max(int(getattr(image, "n_frames", 1)), 1)
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        return None

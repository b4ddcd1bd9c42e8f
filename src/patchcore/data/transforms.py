"""Image/mask loading and the geometric + photometric transform shared by train and test."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from .decode import WIDE_MODES, decode_image, open_upright, to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTransform",
    "load_image",
    "load_mask",
    "mask_to_array",
    "to_rgb",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Size = int | tuple[int, int] | None


def _to_uint8(arr: np.ndarray, is_float: bool) -> np.ndarray:
    """Scale a wide-range single-channel *mask* array to uint8 by the bit range its maximum needs (masks
    hold labels: 0/65535 and 0/4095 both mean "defect"); images are scaled by their container instead
    (:mod:`patchcore.data.decode`)."""
    arr = np.clip(arr.astype(np.float64), 0.0, None)
    vmax = float(arr.max()) if arr.size else 0.0
    if is_float and vmax <= 1.0:
        scale = 255.0  # float images conventionally hold [0, 1]
    else:
        bits = max(8, int(math.ceil(vmax)).bit_length())
        scale = 255.0 / (2**bits - 1)
    return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)


def mask_to_array(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """Raw channel-0 values of a mask as a (H, W) uint8 array.

    "1" masks become 0/255; palette masks are resolved through their palette (the visible red
    or gray value, not the palette index, because paint tools order palettes arbitrarily);
    wide masks keep their values when they fit in 8 bits and are otherwise scaled like images.
    """
    if isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 else image
        if arr.ndim != 2:
            raise ValueError(f"mask array must be (H, W) or (H, W, C), got shape {image.shape}")
        if arr.dtype == np.bool_:
            return arr.astype(np.uint8)
        if arr.dtype != np.uint8:
            if arr.size and (arr.max() > 255 or arr.min() < 0):
                return _to_uint8(arr, is_float=np.issubdtype(arr.dtype, np.floating))
            return arr.astype(np.uint8)
        return arr
    mode = image.mode
    if mode == "L":
        arr = np.asarray(image)
    elif mode == "1":
        arr = np.asarray(image.convert("L"))
    elif mode in ("P", "PA"):
        arr = np.asarray(image.convert("RGBA"))[..., 0]
    elif mode in ("RGB", "RGBA", "LA", "RGBX", "RGBa", "La", "YCbCr"):
        arr = np.asarray(image)[..., 0]
    elif mode in WIDE_MODES:
        return mask_to_array(np.asarray(image))
    else:
        arr = np.asarray(image.convert("L"))
    return np.ascontiguousarray(arr, dtype=np.uint8)


def load_image(path: str | Path) -> PIL.Image.Image:
    """Open an image file as 8-bit RGB, upright by its EXIF orientation, wide samples scaled by the
    container's bit depth (:func:`patchcore.data.decode.decode_image`, the one decoding path);
    unreadable file -> DataError naming it."""
    return decode_image(Path(path))


def load_mask(path: str | Path) -> np.ndarray:
    """Open a mask file as the (H, W) uint8 array of its channel-0 values; unreadable -> DataError."""
    image, _ = open_upright(Path(path))
    return mask_to_array(image)


def _check_size(value: Any, what: str) -> Size:
    """Normalise an int / (h, w) / None size (JSON gives lists) and validate it."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive int, (h, w) or None, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{what} must be positive, got {value}")
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        h, w = value
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
            return (h, w)
    raise ValueError(f"{what} must be a positive int, (h, w) or None, got {value!r}")


def _crop_offset(size: int, crop: int) -> int:
    """Top/left of torchvision's CenterCrop window in the resized image (negative when it pads)."""
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


@dataclass(frozen=True)
class ImageTransform:
    """torchvision ``Resize -> CenterCrop -> ToTensor -> Normalize`` plus the matching mask geometry.

    ``resize``: int resizes the shorter side (``Resize(int)``), ``(h, w)`` gives a fixed size, None
    keeps the size. ``imagesize``: centre crop size, or None for no crop (keeps the whole field of
    view, e.g. for non-square images).
    """

    resize: Size = 256
    imagesize: Size = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    _image_tf: T.Compose = field(init=False, repr=False, compare=False)
    _mask_tf: T.Compose = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        resize = _check_size(self.resize, "resize")
        imagesize = _check_size(self.imagesize, "imagesize")
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got {self.mean}, {self.std}")
        object.__setattr__(self, "resize", resize)
        object.__setattr__(self, "imagesize", imagesize)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

        geometry: list[Any] = []
        mask_geometry: list[Any] = []
        if resize is not None:
            geometry.append(T.Resize(resize))  # bilinear, antialias=True: matches the reference
            mask_geometry.append(T.Resize(resize, interpolation=T.InterpolationMode.NEAREST))
        if imagesize is not None:
            geometry.append(T.CenterCrop(imagesize))
            mask_geometry.append(T.CenterCrop(imagesize))
        image_tf = T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])
        object.__setattr__(self, "_image_tf", image_tf)
        object.__setattr__(self, "_mask_tf", T.Compose(mask_geometry))

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        """(3, H, W) float32 normalised tensor of ``image`` (converted to RGB first)."""
        return self._image_tf(to_rgb(image))

    def mask(self, mask: PIL.Image.Image | np.ndarray) -> torch.Tensor:
        """(H, W) uint8 tensor of the mask's raw channel-0 values with the image's geometry.

        Uses NEAREST resizing, so values stay in the mask's original set (AutoVI pixel values
        survive, binary stays binary). The reference resized masks bilinearly and then truncated,
        silently turning soft edge pixels into "good"; binarising is left to the caller.
        """
        pil = PIL.Image.fromarray(mask_to_array(mask), mode="L")
        return torch.from_numpy(np.array(self._mask_tf(pil), dtype=np.uint8))

    def resized_size(self, original_size_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) after the resize step only (torchvision's rule for ``Resize(int)``)."""
        h, w = (int(v) for v in original_size_hw)
        if self.resize is None:
            return (h, w)
        if isinstance(self.resize, tuple):
            return self.resize
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def output_size(self, original_size_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the transformed tensor for an image of ``original_size_hw``."""
        if self.imagesize is None:
            return self.resized_size(original_size_hw)
        if isinstance(self.imagesize, int):
            return (self.imagesize, self.imagesize)
        return self.imagesize

    def to_original(self, amap: np.ndarray, original_size_hw: tuple[int, int]) -> np.ndarray:
        """Map a (H, W) anomaly map in transformed coordinates back to the original resolution.

        A map of a different size than :meth:`output_size` (e.g. at feature resolution) is first
        resized bilinearly to it. The crop is undone by pasting into the resized frame, with
        pixels outside the crop set to the map's minimum, then the frame is bilinearly resized
        to ``original_size_hw``. Returns float32.
        """
        amap = np.asarray(amap)
        if amap.ndim != 2 or amap.size == 0:
            raise ValueError(f"anomaly map must be a non-empty (H, W) array, got shape {amap.shape}")
        oh, ow = (int(v) for v in original_size_hw)
        ch, cw = self.output_size((oh, ow))
        rh, rw = self.resized_size((oh, ow))
        t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
        if t.shape[-2:] != (ch, cw):
            t = F.interpolate(t, size=(ch, cw), mode="bilinear", align_corners=False)
        if self.imagesize is not None:
            frame = torch.full((1, 1, rh, rw), float(amap.min()), dtype=torch.float32)
            top, left = _crop_offset(rh, ch), _crop_offset(rw, cw)
            # Overlap of the crop window with the resized frame (the crop may pad past its border).
            sy, sx = max(0, -top), max(0, -left)
            dy, dx = max(0, top), max(0, left)
            ny, nx = min(ch - sy, rh - dy), min(cw - sx, rw - dx)
            frame[..., dy : dy + ny, dx : dx + nx] = t[..., sy : sy + ny, sx : sx + nx]
            t = frame
        if t.shape[-2:] != (oh, ow):
            # antialias only changes anything when shrinking, where it avoids aliasing.
            t = F.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)
        return t[0, 0].numpy()

    def to_dict(self) -> dict:
        """Plain JSON-able description (tuples become lists)."""

        def plain(v: Size) -> int | list[int] | None:
            return list(v) if isinstance(v, tuple) else v

        return {
            "resize": plain(self.resize),
            "imagesize": plain(self.imagesize),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ImageTransform:
        """Inverse of :meth:`to_dict`; missing keys take the defaults, unknown keys are an error."""
        known = {"resize", "imagesize", "mean", "std"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ImageTransform keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs = dict(d)
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

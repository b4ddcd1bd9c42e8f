"""Image/mask loading and the geometric + photometric transform shared by train and test."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

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


def _resized_pil_size(size_wh: tuple[int, int], resize: int | tuple[int, int]) -> tuple[int, int]:
    """(w, h) after torchvision's ``Resize(resize)``: an int sets the shorter side (the longer one scaled and
    truncated), a pair (h, w) is the size."""
    if isinstance(resize, tuple):
        return (resize[1], resize[0])
    w, h = size_wh
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _center_crop_pil(image: PIL.Image.Image, crop: int | tuple[int, int]) -> PIL.Image.Image:
    """torchvision's ``CenterCrop(crop)`` of a PIL image: pad with zeros where the crop is larger, then crop."""
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    w, h = image.size
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        image = PIL.ImageOps.expand(image, border=(left, top, right, bottom), fill=0)
        w, h = image.size
        if (crop_w, crop_h) == (w, h):
            return image
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


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
    _mean: torch.Tensor = field(init=False, repr=False, compare=False)
    _std: torch.Tensor = field(init=False, repr=False, compare=False)

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
        object.__setattr__(self, "_mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def _geometry(self, image: PIL.Image.Image, resample: int) -> PIL.Image.Image:
        # torchvision's Resize -> CenterCrop on a PIL image, op for op (tests/test_data.py compares them bit
        # for bit): written out so that no command pays for importing torchvision (about 1.3 s here).
        if self.resize is not None:
            size = _resized_pil_size(image.size, self.resize)
            if size != image.size:
                image = image.resize(size, resample)  # bilinear with antialias (PIL's), as the reference
        if self.imagesize is not None:
            image = _center_crop_pil(image, self.imagesize)
        return image

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        """(3, H, W) float32 normalised tensor of ``image`` (converted to RGB first)."""
        rgb = self._geometry(to_rgb(image), PIL.Image.Resampling.BILINEAR)
        # ToTensor: uint8 HWC -> float32 CHW / 255; then Normalize: (x - mean) / std, in place.
        pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).view(rgb.size[1], rgb.size[0], 3)
        tensor = pixels.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
        return tensor.sub_(self._mean).div_(self._std)

    def mask(self, mask: PIL.Image.Image | np.ndarray) -> torch.Tensor:
        """(H, W) uint8 tensor of the mask's raw channel-0 values with the image's geometry.

        Uses NEAREST resizing, so values stay in the mask's original set (AutoVI pixel values
        survive, binary stays binary). The reference resized masks bilinearly and then truncated,
        silently turning soft edge pixels into "good"; binarising is left to the caller.
        """
        pil = PIL.Image.fromarray(mask_to_array(mask), mode="L")
        return torch.from_numpy(np.array(self._geometry(pil, PIL.Image.Resampling.NEAREST), dtype=np.uint8))

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

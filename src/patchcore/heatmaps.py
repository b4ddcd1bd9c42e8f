"""PNG heatmaps a person can look at: the anomaly map in a colour scale, blended over the image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import atomic_write

__all__ = [
    "MAP_LEVELS",
    "colorize",
    "normalize_maps",
    "overlay",
    "quantize_unit_map",
    "save_heatmap",
    "save_map_png",
    "save_map_tiff",
]

# Levels of a saved official-format map (16-bit PNG): the native evaluation scores exactly these values.
MAP_LEVELS = 65536

# Anchor colours of a perceptual dark-blue -> green -> yellow scale (close to matplotlib's viridis),
# interpolated linearly: no matplotlib dependency for one colour map.
_ANCHORS = np.array(
    [
        [68, 1, 84],
        [59, 82, 139],
        [33, 145, 140],
        [94, 201, 98],
        [253, 231, 37],
    ],
    dtype=np.float32,
)


def normalize_maps(maps: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scale with ONE range for all maps (never each map by its own max) and clip to [0, 1]."""
    span = high - low if high > low else 1.0
    return np.clip((np.asarray(maps, dtype=np.float32) - low) / span, 0.0, 1.0)


def colorize(unit_map: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    position = np.clip(unit_map, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lower = np.floor(position).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    fraction = (position - lower)[..., None]
    colours = _ANCHORS[lower] * (1 - fraction) + _ANCHORS[lower + 1] * fraction
    return colours.round().astype(np.uint8)


def overlay(image: Image.Image, unit_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the coloured map over the image; the map is resized to the image if needed."""
    image = image.convert("RGB")
    heat = Image.fromarray(colorize(unit_map))
    if heat.size != image.size:
        heat = heat.resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image, heat, alpha)


def save_heatmap(
    path: str | os.PathLike, image: Image.Image, unit_map: np.ndarray, alpha: float = 0.5
) -> Path:
    """Write image | overlay side by side as a PNG (atomically)."""
    blended = overlay(image, unit_map, alpha)
    canvas = Image.new("RGB", (image.width * 2, image.height))
    canvas.paste(image.convert("RGB"), (0, 0))
    canvas.paste(blended, (image.width, 0))
    return _save_png(path, canvas)


def save_map_png(path: str | os.PathLike, unit_map: np.ndarray, sixteen_bit: bool = False) -> Path:
    """A single-channel PNG of a [0, 1] map (8- or 16-bit)."""
    if sixteen_bit:
        image = Image.fromarray(quantize_unit_map(unit_map))
    else:
        image = Image.fromarray((np.clip(unit_map, 0, 1) * 255).round().astype(np.uint8), mode="L")
    return _save_png(path, image)


def quantize_unit_map(unit_map: np.ndarray) -> np.ndarray:
    """A [0, 1] map as uint16 levels 0..65535: the values a 16-bit map PNG holds."""
    scaled = np.clip(np.asarray(unit_map, dtype=np.float32), 0.0, 1.0) * np.float32(MAP_LEVELS - 1)
    return np.rint(scaled).astype(np.uint16)


def save_map_tiff(path: str | os.PathLike, values: np.ndarray) -> Path:
    """A single-channel float32 TIFF (the MVTec LOCO evaluation reads these)."""
    path = Path(path)
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    atomic_write(path, lambda handle: image.save(handle, format="TIFF"))
    return path


def _save_png(path: str | os.PathLike, image: Image.Image) -> Path:
    path = Path(path)
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))
    return path

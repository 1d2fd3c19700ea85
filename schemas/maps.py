"""How an attribution map is stored and how it is read back: the one place that decodes stored maps.

A method's map [H, W] (H = W = the model's input size I) is stored as

- ``map``: [S, S] of ``float16`` | ``float32`` | ``int8`` | ``uint8``, S <= I (``--map-size``): the map averaged over
  (I/S)×(I/S) areas (adaptive average pooling when S does not divide I), divided by ``map_scale``;
- ``map_scale``: max |area-averaged map| (1 for an all-zero map);
- int8: round(127 · map / map_scale), value = q · map_scale / 127 (signed, symmetric); uint8 (non-negative maps only):
  round(255 · map / map_scale), value = q · map_scale / 255. Float dtypes: value = map · map_scale.

The input size I is recorded on the ``map`` field (metadata ``input_size``); files written before it existed store
maps at the input size. :func:`decode_maps` dequantises and upsamples bilinearly (align_corners=False, as
``torch.nn.functional.interpolate``) back to I×I, so every reader gets maps in the method's units at the input size.
Pure NumPy.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

MAP_DTYPES = {"float16": pa.float16(), "float32": pa.float32(), "int8": pa.int8(), "uint8": pa.uint8()}
LEVELS = {"int8": 127, "uint8": 255}  # quantisation levels of the integer dtypes (value = q · scale / levels)
INPUT_SIZE = b"input_size"  # map field metadata: the model's input size the map is read back at


@dataclass(frozen=True)
class MapLayout:
    """How one method's maps are stored: ``size`` S (pixels per side) and ``dtype``, for an ``input_size`` I."""

    size: int
    dtype: str
    input_size: int

    def __post_init__(self) -> None:
        if self.dtype not in MAP_DTYPES:
            raise ValueError(f"map dtype must be one of {', '.join(MAP_DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.size <= self.input_size:
            raise ValueError(f"map size must be in 1..{self.input_size} (the input size), got {self.size}")

    @property
    def levels(self) -> int | None:
        """127 (int8), 255 (uint8), None for float dtypes."""
        return LEVELS.get(self.dtype)

    def step(self) -> float:
        """Largest error of a stored value relative to ``map_scale`` from the dtype alone: half a quantisation
        level for integers, float16's half-ulp at 1 (2^-11) or float32's (2^-24)."""
        if self.levels:
            return 0.5 / self.levels
        return 2.0 ** -11 if self.dtype == "float16" else 2.0 ** -24


@functools.lru_cache(maxsize=64)
def bilinear_matrix(out: int, size: int) -> np.ndarray:
    """float32 [out, size]: ``U @ x`` upsamples a length-``size`` signal to ``out`` samples bilinearly with
    ``align_corners=False`` (torch's convention: source = (i + 0.5) · size/out − 0.5, clamped at the borders)."""
    src = np.clip((np.arange(out) + 0.5) * (size / out) - 0.5, 0, None)
    i0 = np.minimum(np.floor(src).astype(np.int64), size - 1)
    i1 = np.minimum(i0 + 1, size - 1)
    w1 = src - i0
    u = np.zeros((out, size), np.float64)
    np.add.at(u, (np.arange(out), i0), 1.0 - w1)
    np.add.at(u, (np.arange(out), i1), w1)
    return u.astype(np.float32)


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of float32 [N, S, S] maps to [N, size, size] (identity when S == size)."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    rows, cols = bilinear_matrix(size, maps.shape[-2]), bilinear_matrix(size, maps.shape[-1])
    return np.matmul(np.matmul(rows, maps), cols.T)


def decode_maps(stored: np.ndarray, scale: np.ndarray, dtype: str, input_size: int) -> np.ndarray:
    """Stored maps [N, S, S] (``dtype``) and their ``map_scale`` [N] -> float32 [N, I, I] in the method's units."""
    levels = LEVELS.get(dtype)
    factor = scale.astype(np.float32) / np.float32(levels if levels else 1.0)
    return upsample(stored.astype(np.float32) * factor[:, None, None], input_size)


def map_field_layout(field: pa.Field) -> MapLayout:
    """The MapLayout of a ``map`` field (fixed-shape tensor [S, S]; input size from its metadata, else S)."""
    shape = field.type.shape
    dtype = next(name for name, t in MAP_DTYPES.items() if t == field.type.value_type)
    metadata = field.metadata or {}
    return MapLayout(size=int(shape[-1]), dtype=dtype, input_size=int(metadata.get(INPUT_SIZE, shape[-1])))


__all__ = ["INPUT_SIZE", "LEVELS", "MAP_DTYPES", "MapLayout", "bilinear_matrix", "decode_maps", "map_field_layout",
           "upsample"]

"""Hard-edged raster primitives of the procedural benchmark: shapes and textures painted on the pixel grid (pixel
centres at (j + 0.5, i + 0.5), no anti-aliasing, so a shape's mask is exactly the set of pixels it paints), tight
boxes, and masks as COCO uncompressed RLE. Pure NumPy."""
from __future__ import annotations

import numpy as np


# ---------------------------------------------------------------------------------------------------------------
# Masks as COCO uncompressed RLE

def mask_to_rle(mask: np.ndarray) -> dict:
    """bool [H, W] -> ``{"size": [H, W], "counts": [...]}``: COCO's uncompressed RLE, i.e. the lengths of the
    alternating runs of 0s and 1s of the mask flattened in column-major (Fortran) order, starting with 0s (a
    leading 0 when the first pixel is set). ``pycocotools.mask.frPyObjects`` reads it as is."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle: mask must be [H, W], got shape {mask.shape}")
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`: ``{"size": [H, W], "counts": [...]}`` -> bool [H, W]."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"rle_to_mask: not an uncompressed RLE dict with 'size' and 'counts': {rle!r:.80}") from None
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(f"rle_to_mask: counts sum to {int(counts.sum())}, expected {height}x{width}={height * width}")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")


def tight_box(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] pixel edges of the set pixels of a bool [H, W] mask (x1/y1 exclusive)."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("tight_box: empty mask")
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ---------------------------------------------------------------------------------------------------------------
# Shapes and textures (pixel centres at (j + 0.5, i + 0.5); hard edges)

def _polygon_mask(xx: np.ndarray, yy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every pixel centre."""
    inside = np.zeros(xx.shape, dtype=bool)
    xs, ys = vertices[:, 0], vertices[:, 1]
    for k in range(len(vertices)):
        x0, y0, x1, y1 = xs[k], ys[k], xs[k - 1], ys[k - 1]
        crosses = (y0 > yy) != (y1 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xx < x_at)
    return inside


def _rotate(points: np.ndarray, angle: float, cx: float, cy: float, radius: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return points @ rot.T * radius + np.array([cx, cy])


def _star(points: int, inner: float) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)


_UNIT_POLYGONS = {
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.78,
    "triangle": np.array([[np.cos(a), np.sin(a)] for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]),
    "cross": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1],
                       [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]], dtype=np.float64),
    "star": _star(5, 0.45),
    "bar": np.array([[-1, -0.25], [1, -0.25], [1, 0.25], [-1, 0.25]], dtype=np.float64),
}


def shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """bool [size, size]: pixels whose centre lies in ``shape`` (disc, ring, ellipse, square, triangle, cross, star
    or bar) centred at (cx, cy), fitting in a circle of ``radius`` pixels, rotated by ``angle`` radians."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "disc":
        return dx * dx + dy * dy <= radius * radius
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= radius * radius) & (d2 >= (0.6 * radius) ** 2)
    if shape == "ellipse":
        c, s = np.cos(angle), np.sin(angle)
        u, v = (dx * c + dy * s) / radius, (-dx * s + dy * c) / (radius / 2.8)
        return u * u + v * v <= 1.0
    if shape in _UNIT_POLYGONS:
        return _polygon_mask(xx, yy, _rotate(_UNIT_POLYGONS[shape], angle, cx, cy, radius))
    raise ValueError(f"unknown shape {shape!r}")


def texture(kind: str, colours: np.ndarray, angle: float, period: float, phase: float, size: int) -> np.ndarray:
    """float32 [size, size, 3]: ``solid`` (colours[0]) or ``striped`` (stripes of colours[0]/colours[1], each
    ``period / 2`` px wide, at ``angle`` radians, shifted by ``phase`` in [0, 1) periods)."""
    if kind == "solid":
        return np.broadcast_to(colours[0], (size, size, 3)).astype(np.float32)
    if kind != "striped":
        raise ValueError(f"unknown texture {kind!r}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase
    stripe = (np.floor(2.0 * t) % 2).astype(bool)
    return np.where(stripe[..., None], colours[1], colours[0]).astype(np.float32)


__all__ = ["mask_to_rle", "rle_to_mask", "shape_mask", "texture", "tight_box"]

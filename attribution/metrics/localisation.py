"""Localisation metrics: energy-based pointing game (EBPG) and intensity of boundary dependencies (IBD).

**Pixel geometry** (used by every function here): pixel (i, j) (row i, column j) covers the square
[j, j+1) x [i, i+1) of continuous map coordinates, so its centre is (j + ½, i + ½). A box [x0, y0, x1, y1]
(continuous coordinates, x to the right, y down, x0 <= x1, y0 <= y1) contains the pixels whose centre lies in the
half-open rectangle [x0, x1) x [y0, y1). With integer coordinates that is exactly columns x0 … x1-1 and rows
y0 … y1-1, i.e. (x1 - x0)·(y1 - y0) pixels, and adjacent boxes never share a pixel. Boxes reaching outside the
map are clipped.

**EBPG** (Wang et al. 2020, Score-CAM; TR-GBP §5.3.1 eq. 11, App. C): share of the attribution energy inside
the ground-truth box(es), sum_{inside} R⁺ / sum R⁺, with R⁺ = max(R, 0) (``clamp=True``, the default: Score-CAM
evaluates non-negative maps, and a signed map's negative part is evidence *against* the class, not energy; the
ratio of signed sums is not a share).

**A map with no positive pixel** (all-zero after clamping: e.g. a TR-GBP map that is negative everywhere) has no
energy to share, so its EBPG and IBD are undefined: NaN, not 0. Decision: such maps are *left out* of the
dataset protocols and *counted* (jobs.reporting.aggregates' ``left_out``, named in the report table's notes),
rather than scored 0 as Quantus does (``AttributionLocalisation`` divides by sum + 1e-9). A 0 would read as "all
the energy is outside the box" for EBPG and as "no boundary dependency" for IBD — where IBD-AUC's protocol then
discards it as one of the smallest IBDs — i.e. a claim about energy that does not exist. ``has_energy`` tells
which maps these are.

**IBD** (TR-GBP §5.4 eq. 12): the same ratio for the ``border``-pixel frame of the map (rows < b or >= H - b,
columns < b or >= W - b; b = 16 on 224x224, so a uniform map gives 1 - (192/224)²). The paper writes the plain
sums of R; its maps are compared where positive attributions live (its figures show relu(R~)), and a ratio of
signed sums can leave [0, 1] or divide by ~0. Choice: negatives clamped to 0 by default, as EBPG
(``clamp=False`` uses the signed sums as written). NaN for a map with no positive pixel (see above).

**EBPG protocol filter** (TR-GBP App. C after Wang et al.): images with exactly one box that covers less than half
of the image (:func:`ebpg_eligible`, area in original pixels).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attribution.errors import AttributionError


def _boxes_tensor(boxes: Any, where: str) -> Tensor:
    """Boxes as float64 [B, 4] (B may be 0), validated."""
    if boxes is None or len(boxes) == 0:
        return torch.zeros(0, 4, dtype=torch.float64)
    t = torch.as_tensor(boxes, dtype=torch.float64)
    if t.ndim == 1 and t.numel() == 4:
        raise AttributionError(f"{where}: boxes must be a list of [x0, y0, x1, y1] boxes, got one flat box "
                               f"{t.tolist()} (wrap it in a list)")
    if t.ndim != 2 or t.shape[1] != 4:
        raise AttributionError(f"{where}: boxes must be [[x0, y0, x1, y1], ...], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise AttributionError(f"{where}: a box holds a non-finite coordinate: {t.tolist()}")
    bad = (t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])
    if bad.any():
        raise AttributionError(f"{where}: box {t[bad][0].tolist()} has x1 < x0 or y1 < y0")
    return t


def box_mask(boxes: Sequence[Sequence[float]], height: int, width: int, *,
             device: torch.device | str | None = None) -> Tensor:
    """Union of the boxes as a bool mask [height, width]: True where the pixel's centre (j + ½, i + ½) lies in
    some box's [x0, x1) x [y0, y1) (module docstring). ``boxes``: [[x0, y0, x1, y1], ...] in map pixels (float,
    any sequence, numpy array or tensor [B, 4]); no boxes -> all False."""
    if height < 0 or width < 0:
        raise AttributionError(f"box_mask: negative size {height}x{width}")
    b = _boxes_tensor(boxes, "box_mask").to(device)
    cy = torch.arange(height, dtype=torch.float64, device=b.device) + 0.5
    cx = torch.arange(width, dtype=torch.float64, device=b.device) + 0.5
    rows = (cy[None, :] >= b[:, 1:2]) & (cy[None, :] < b[:, 3:4])  # [B, H]
    cols = (cx[None, :] >= b[:, 0:1]) & (cx[None, :] < b[:, 2:3])  # [B, W]
    return (rows[:, :, None] & cols[:, None, :]).any(dim=0)


def _share(maps: Tensor, region: Tensor, clamp: bool) -> Tensor:
    m = maps.to(torch.float64)
    if clamp:
        m = m.clamp(min=0)
    total = m.sum(dim=(1, 2))
    inside = (m * region).sum(dim=(1, 2))
    return torch.where(total != 0, inside / torch.where(total != 0, total, torch.ones_like(total)),
                       torch.full_like(total, float("nan")))


def _check_maps(maps: Tensor, where: str) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 3:
        raise AttributionError(f"{where}: maps must be a tensor [N, H, W], got "
                               f"{tuple(getattr(maps, 'shape', ())) or type(maps).__name__}")


def has_energy(maps: Tensor, *, clamp: bool = True) -> Tensor:
    """bool [N]: True where map [N, H, W] has energy to share, i.e. its (clamped) sum is non-zero and finite;
    EBPG and IBD are NaN exactly where this is False (a map with no positive pixel, with ``clamp=True``)."""
    _check_maps(maps, "has_energy")
    m = maps.to(torch.float64)
    total = (m.clamp(min=0) if clamp else m).sum(dim=(1, 2))
    return (total != 0) & torch.isfinite(total)


def energy_pointing_game(maps: Tensor, masks: Tensor, *, clamp: bool = True) -> Tensor:
    """EBPG of each map: float64 [N] in [0, 1] from maps [N, H, W] (any real dtype) and bool masks [N, H, W] (or
    one mask [H, W] for all) of the ground-truth region (:func:`box_mask`). Share of max(map, 0) inside the mask
    (``clamp=False``: of the signed map). NaN where the (clamped) map sums to 0 (no positive pixel: undefined,
    left out of the protocols and counted; module docstring)."""
    _check_maps(maps, "energy_pointing_game")
    if not isinstance(masks, Tensor) or masks.shape[-2:] != maps.shape[-2:] or masks.ndim not in (2, 3) \
            or (masks.ndim == 3 and masks.shape[0] != maps.shape[0]):
        raise AttributionError(f"energy_pointing_game: masks {tuple(getattr(masks, 'shape', ()))} do not match "
                               f"maps {tuple(maps.shape)}")
    region = masks.to(device=maps.device, dtype=torch.bool)
    return _share(maps, region.expand_as(maps), clamp)


def border_frame(height: int, width: int, border: int, *, device: torch.device | str | None = None) -> Tensor:
    """bool [height, width]: True on the ``border``-pixel frame (rows < b or >= H - b, columns < b or >= W - b)."""
    if border < 0:
        raise AttributionError(f"border must be >= 0, got {border}")
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    r = (rows < border) | (rows >= height - border)
    c = (cols < border) | (cols >= width - border)
    return r[:, None] | c[None, :]


def border_intensity(maps: Tensor, *, border: int = 16, clamp: bool = True) -> Tensor:
    """IBD of each map: float64 [N] in [0, 1] from maps [N, H, W]: share of max(map, 0) (``clamp=False``: of the
    signed map) in the ``border``-pixel frame (TR-GBP §5.4). A uniform map gives 1 - ((H-2b)/H)·((W-2b)/W).
    NaN where the (clamped) map sums to 0."""
    _check_maps(maps, "border_intensity")
    frame = border_frame(maps.shape[1], maps.shape[2], border, device=maps.device)
    return _share(maps, frame.expand_as(maps), clamp)


def box_area_share(boxes: Sequence[Sequence[float]], width: int, height: int) -> float:
    """Area of the union of the boxes (clipped to the image) over width·height, in continuous coordinates
    (integer boxes: the pixel count of :func:`box_mask` over the image's pixel count)."""
    if width <= 0 or height <= 0:
        raise AttributionError(f"box_area_share: image size {width}x{height} must be positive")
    b = _boxes_tensor(boxes, "box_area_share")
    if b.shape[0] == 0:
        return 0.0
    b = torch.stack([b[:, 0].clamp(0, width), b[:, 1].clamp(0, height), b[:, 2].clamp(0, width),
                     b[:, 3].clamp(0, height)], dim=1)
    if b.shape[0] == 1:
        area = float((b[0, 2] - b[0, 0]) * (b[0, 3] - b[0, 1]))
    else:  # exact union area on the grid of the boxes' own coordinates
        xs, ys = torch.unique(b[:, [0, 2]]), torch.unique(b[:, [1, 3]])
        cx, cy = (xs[1:] + xs[:-1]) / 2, (ys[1:] + ys[:-1]) / 2
        inside = ((cx[None, None, :] >= b[:, 0, None, None]) & (cx[None, None, :] < b[:, 2, None, None])
                  & (cy[None, :, None] >= b[:, 1, None, None]) & (cy[None, :, None] < b[:, 3, None, None]))
        cell = (ys[1:] - ys[:-1])[:, None] * (xs[1:] - xs[:-1])[None, :]
        area = float((cell * inside.any(dim=0)).sum())
    return area / (width * height)


def ebpg_eligible(boxes: Sequence[Sequence[float]], width: int, height: int, *, max_share: float = 0.5) -> bool:
    """True when the image (``width`` x ``height`` original pixels) has exactly one box ([x0, y0, x1, y1] in
    original pixels) and that box covers less than ``max_share`` of the image (TR-GBP App. C)."""
    b = _boxes_tensor(boxes, "ebpg_eligible")
    return b.shape[0] == 1 and box_area_share(b, width, height) < max_share


__all__ = ["border_frame", "border_intensity", "box_area_share", "box_mask", "ebpg_eligible",
           "energy_pointing_game", "has_energy"]

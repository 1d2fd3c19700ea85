"""Similarity of two attribution maps, batched: rank correlation and SSIM (sanity checks, class discrimination).

Adebayo et al. (2018) compare the map of a randomised model with the original by the Spearman rank correlation
(of the map and of |map|) and by SSIM; TR-GBP §5.2.2 follows them. Everything here works row-wise on tensors of
any device and computes in float64, so the numbers match the reference libraries (scipy.stats.spearmanr,
skimage.metrics.structural_similarity) to ~1e-12.

Normalisation before SSIM (a choice; the papers do not fix it): SSIM depends on the scale of the maps, so each
map is min-max normalised to [0, 1] on its own (:func:`minmax`) and SSIM is taken with ``data_range=1``:

    ssim(minmax(a), minmax(b), data_range=1)

Rank correlations need no normalisation (they are invariant to any increasing transform of either map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attribution.errors import AttributionError


def _check_rows(x: Tensor, name: str, ndim: int = 2) -> None:
    if not isinstance(x, Tensor):
        raise AttributionError(f"{name}: expected a torch tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise AttributionError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")


def rank(x: Tensor) -> Tensor:
    """Mid-ranks of each row: float64 [N, P] from any real [N, P] (1-based; tied values get the mean of the ranks
    they span, as scipy.stats.rankdata(method="average")). A NaN gets rank NaN. Same device as ``x``."""
    _check_rows(x, "rank: x")
    n, p = x.shape
    if p == 0:
        return torch.empty(n, 0, dtype=torch.float64, device=x.device)
    values, order = torch.sort(x, dim=1, stable=True)
    idx = torch.arange(p, device=x.device).expand(n, p)
    differs = values[:, 1:] != values[:, :-1]  # NaN != NaN: each NaN is its own group (its rank is reset below)
    true = torch.ones(n, 1, dtype=torch.bool, device=x.device)
    starts = torch.cat([true, differs], dim=1)  # first element of a tie group
    ends = torch.cat([differs, true], dim=1)  # last element of a tie group
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    last = torch.where(ends, idx, torch.full_like(idx, p - 1)).flip(1).cummin(dim=1).values.flip(1)
    sorted_ranks = (first + last).to(torch.float64) / 2 + 1
    ranks = torch.empty(n, p, dtype=torch.float64, device=x.device).scatter_(1, order, sorted_ranks)
    if x.is_floating_point():
        ranks = ranks.masked_fill(torch.isnan(x), float("nan"))
    return ranks


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row pair: float64 [N] from [N, P] and [N, P]; NaN where a row is constant
    (zero variance) or holds a NaN."""
    _check_rows(a, "pearson: a")
    _check_rows(b, "pearson: b")
    if a.shape != b.shape:
        raise AttributionError(f"pearson: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.to(torch.float64), b.to(torch.float64)
    da = a - a.mean(dim=1, keepdim=True)
    db = b - b.mean(dim=1, keepdim=True)
    den = torch.sqrt((da * da).sum(dim=1) * (db * db).sum(dim=1))
    num = (da * db).sum(dim=1)
    out = num / den
    out = out.masked_fill(den == 0, float("nan"))
    return out.clamp(-1.0, 1.0)  # clamp keeps NaN


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row pair: float64 [N] from [N, P] and [N, P] (mid-ranks for ties, so equal
    to scipy.stats.spearmanr per row); NaN when a row is constant or holds a NaN (as scipy)."""
    _check_rows(a, "spearman: a")
    _check_rows(b, "spearman: b")
    if a.shape != b.shape:
        raise AttributionError(f"spearman: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return pearson(rank(a), rank(b))


def minmax(x: Tensor) -> Tensor:
    """Each map scaled to [0, 1]: (x - min) / (max - min), per map. [N, H, W] (or any [N, ...]) -> same shape,
    float (float64 input stays float64, anything else becomes float32). A constant map becomes all zeros."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise AttributionError(f"minmax: expected a tensor [N, ...], got {getattr(x, 'shape', type(x).__name__)}")
    x = x if x.dtype == torch.float64 else x.float()
    flat = x.reshape(x.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(flat))
    return out.reshape(x.shape)


def ssim(a: Tensor, b: Tensor, *, data_range: float | None = None, win_size: int = 7, k1: float = 0.01,
         k2: float = 0.03) -> Tensor:
    """Mean structural similarity of each map pair: float64 [N] from [N, H, W] and [N, H, W].

    Exactly skimage.metrics.structural_similarity's default for 2-D images: a ``win_size`` x ``win_size`` uniform
    window, K1 = 0.01, K2 = 0.03, sample (co)variances (normalised by n - 1, n = win_size²), C1 = (K1·L)²,
    C2 = (K2·L)², averaged over the positions where the window lies fully inside the map (skimage crops
    (win_size - 1) / 2 pixels on each side). ``L = data_range``; None: the range of the pair,
    max(a, b) - min(a, b) per pair (NaN for two equal constant maps, whose range is 0). Maps are compared as given; see the module docstring for the normalisation
    the sanity checks use (``ssim(minmax(a), minmax(b), data_range=1)``).
    """
    _check_rows(a, "ssim: a", ndim=3)
    _check_rows(b, "ssim: b", ndim=3)
    if a.shape != b.shape:
        raise AttributionError(f"ssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if win_size < 1 or win_size % 2 == 0:
        raise AttributionError(f"ssim: win_size must be odd and positive, got {win_size}")
    if min(a.shape[1:]) < win_size:
        raise AttributionError(f"ssim: maps {tuple(a.shape[1:])} are smaller than the {win_size}x{win_size} window")
    x = a.to(torch.float64)[:, None]
    y = b.to(torch.float64)[:, None]
    if data_range is None:
        hi = torch.maximum(x.amax(dim=(1, 2, 3)), y.amax(dim=(1, 2, 3)))
        lo = torch.minimum(x.amin(dim=(1, 2, 3)), y.amin(dim=(1, 2, 3)))
        r = (hi - lo).view(-1, 1, 1, 1)
    else:
        if not data_range > 0:
            raise AttributionError(f"ssim: data_range must be positive, got {data_range}")
        r = torch.tensor(float(data_range), dtype=torch.float64, device=x.device)
    n = win_size * win_size
    cov_norm = n / (n - 1)

    def mean(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, win_size, stride=1)

    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


__all__ = ["minmax", "pearson", "rank", "spearman", "ssim"]

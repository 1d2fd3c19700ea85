"""Class discrimination: how much the maps of different classes of one image differ.

Score of an image = mean over the T(T-1)/2 pairs of its T class maps (paper: the top-5 predicted classes) of the
Spearman rank correlation between the two maps (mid-ranks for ties, as :func:`similarity.spearman`). Lower =
more class-sensitive maps. Each map is ranked once (not once per pair): the pairwise correlations are the Gram
matrix of the centred, unit-norm rank vectors, which is exactly the Pearson correlation of the ranks, i.e.
``similarity.spearman`` of every pair.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.metrics.similarity import rank


def class_discrimination(maps: Tensor) -> Tensor:
    """Mean pairwise Spearman correlation of the T class maps of each image: float64 [N] from maps [N, T, H, W]
    (any real dtype, any device; T >= 2). NaN for an image where one of its maps is constant or holds a NaN."""
    if not isinstance(maps, Tensor) or maps.ndim != 4:
        raise AttributionError("class_discrimination: maps must be a tensor [N, T, H, W], got "
                               f"{tuple(getattr(maps, 'shape', ())) or type(maps).__name__}")
    n, t = maps.shape[:2]
    if t < 2:
        raise AttributionError(f"class_discrimination: need at least 2 class maps per image, got T={t}")
    ranks = rank(maps.reshape(n * t, -1)).view(n, t, -1)
    centred = ranks - ranks.mean(dim=2, keepdim=True)
    norm = centred.norm(dim=2, keepdim=True)
    unit = centred / norm  # a constant map: 0/0 = NaN, which propagates to the image's score
    corr = torch.bmm(unit, unit.transpose(1, 2)).clamp(-1.0, 1.0)  # [N, T, T]
    i, j = torch.triu_indices(t, t, offset=1, device=maps.device)
    return corr[:, i, j].mean(dim=1)


__all__ = ["class_discrimination"]

"""ROC-AUC without scikit-learn: the Mann-Whitney U statistic with mid-ranks for ties (IBD-AUC, TR-GBP §5.4).

AUC = P(score of a random positive > score of a random negative) + ½ P(equal)
    = (R₊ - n₊(n₊ + 1)/2) / (n₊ · n₋),
R₊ = sum of the positives' mid-ranks among all scores. Ties between a positive and a negative count ½, which is
exactly the area under the ROC curve drawn through tied thresholds (what sklearn.metrics.roc_auc_score returns).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from attribution.errors import AttributionError


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based mid-ranks of a 1-D array: float64 [N] (ties get the mean of the ranks they span)."""
    values = np.asarray(values)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts).astype(np.float64)  # 1-based rank of the last member of each tie group
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def roc_auc(scores: Any, positive: Any) -> float:
    """ROC-AUC of ``scores`` (array-like of real numbers [N], higher = more positive) for the binary labels
    ``positive`` (array-like [N] of bool or 0/1). Mann-Whitney U with mid-ranks for ties; float in [0, 1].
    NaN when one class is absent. A NaN score is an error (drop those samples first)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(positive).reshape(-1)
    if s.shape != y.shape:
        raise AttributionError(f"roc_auc: {s.size} scores but {y.size} labels")
    if y.dtype != np.bool_:
        if y.size and not np.isin(y, (0, 1)).all():
            raise AttributionError("roc_auc: labels must be boolean or 0/1")
        y = y.astype(bool)
    if np.isnan(s).any():
        raise AttributionError(f"roc_auc: {int(np.isnan(s).sum())} scores are NaN; drop them first")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r_pos = midranks(s)[y].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


__all__ = ["midranks", "roc_auc"]

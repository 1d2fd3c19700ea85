"""The papers' dataset-level protocols over per-image metric values (pure NumPy).

* :func:`ebpg_protocol` (TR-GBP App. C after Wang et al. 2020): on the eligible images (one box, < 50 % of the
  image: localisation.ebpg_eligible), draw ``sample`` = 500 images at random without replacement, average their
  EBPG; repeat 5 times; report mean ± std of the 5 averages. Decisions: NaN values (all-zero maps) are dropped
  before sampling; with fewer than ``sample`` images every repeat takes all of them (std 0); std is the
  population std of the repeat means (ddof = 0, numpy's default); each repeat draws from one
  numpy.random.default_rng(seed) in turn, so the result is reproducible.
* :func:`ibd_auc_protocol` (TR-GBP §5.4): discard the half of the images with the smallest IBD, then the ROC-AUC
  of IBD as a score for "the model's prediction is wrong" on the rest. Decisions: NaN IBDs are dropped first;
  n_keep = N - floor((1 - keep)·N) images are kept; ties at the cut are never split — every image whose IBD equals
  the n_keep-th largest value is kept (so the result does not depend on row order, and slightly more than
  n_keep may remain).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from attribution.errors import AttributionError
from attribution.metrics.roc import roc_auc


def ebpg_protocol(values: Any, *, sample: int = 500, repeats: int = 5, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over ``repeats`` random subsets of min(``sample``, N) values drawn without replacement, of
    each subset's mean. ``values``: array-like [N] of per-image EBPG (NaNs dropped). NaN, NaN when no value."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if sample < 1 or repeats < 1:
        raise AttributionError(f"ebpg_protocol: sample and repeats must be >= 1, got {sample}, {repeats}")
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    size = min(sample, v.size)
    means = np.array([v[rng.choice(v.size, size=size, replace=False)].mean() for _ in range(repeats)])
    return float(means.mean()), float(means.std())


def ibd_keep_mask(ibd: Any, *, keep: float = 0.5) -> np.ndarray:
    """bool [N]: the images kept by the IBD protocol (the largest ``keep`` share by IBD, ties at the cut kept,
    NaN never kept)."""
    v = np.asarray(ibd, dtype=np.float64).reshape(-1)
    if not 0.0 < keep <= 1.0:
        raise AttributionError(f"ibd protocol: keep must be in (0, 1], got {keep}")
    valid = ~np.isnan(v)
    n = int(valid.sum())
    if n == 0:
        return valid
    n_keep = n - math.floor((1.0 - keep) * n + 1e-9)
    threshold = np.sort(v[valid])[::-1][n_keep - 1]
    return valid & (v >= threshold)


def ibd_auc_protocol(ibd: Any, wrong: Any, *, keep: float = 0.5) -> float:
    """TR-GBP §5.4 IBD-AUC: ROC-AUC of IBD (array-like [N]) for ``wrong`` (array-like bool [N], True where the
    model's prediction is wrong) on the images kept by :func:`ibd_keep_mask`. NaN when the kept images are all
    right or all wrong."""
    v = np.asarray(ibd, dtype=np.float64).reshape(-1)
    w = np.asarray(wrong).reshape(-1)
    if v.shape != w.shape:
        raise AttributionError(f"ibd_auc_protocol: {v.size} IBD values but {w.size} wrong/right flags")
    kept = ibd_keep_mask(v, keep=keep)
    return roc_auc(v[kept], w[kept])


__all__ = ["ebpg_protocol", "ibd_auc_protocol", "ibd_keep_mask"]

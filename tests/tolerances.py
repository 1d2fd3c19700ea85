"""The test suite's tolerances, derived from dtype and reduction size (the rule is written in tests/README.md).

Two computations of the same mathematics that sum in different orders (another batch composition, chunking,
thread count, CPU kernel set, a twin network, a reference library) differ by rounding only. For a float sum of n
terms x_i with unit roundoff u (2^-24 for float32), each order is within γ_n·Σ|x_i| of the exact sum
(γ_n = n·u / (1 − n·u), Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2), so two orders are
within 2·γ_n·Σ|x_i| of each other. For a network pass, n is the sum of the layers' reduction lengths along the
pass (:func:`pass_length`): a worst-case bound, loose by design — a real bug (a wrong target, a dropped bias
term, a wrong reference) moves results by a large fraction of their scale, far beyond it.

Piecewise-linear rules (guided ReLU masks, max-pools, top-k, secant fall-backs) are not continuous in their
inputs: a pre-activation within rounding of 0 may switch its mask in the other summation order, and then a map
moves by a finite amount at a few pixels. Such comparisons either use the same batch composition and thread
count on both sides (then they are bitwise or within the rounding bound), or :func:`assert_maps_agree`, whose
criterion is shown in tests/test_tolerances.py to fail on real bugs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u = eps / 2 of a floating dtype (float32: 2^-24 ≈ 6e-8; float64: 2^-53; float16: 2^-11)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of a recursive sum of n terms (n·u < 1)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"n = {n} terms exceed the rounding bound of {dtype}")
    return nu / (1 - nu)


def sum_atol(n: int, magnitude: float, dtype: torch.dtype = torch.float32) -> float:
    """Bound of |a − b| for two summation orders of the same n terms whose absolute values sum to ``magnitude``
    (same units as the sum): 2·γ_n·magnitude."""
    return 2 * gamma(n, dtype) * float(magnitude)


def pass_length(module: nn.Module) -> int:
    """n of a forward or backward pass through ``module``: the sum over its conv and linear layers of their
    reduction length (C_in / groups · k_h · k_w, or in_features), i.e. the number of products accumulated along
    the longest chain of sums. Dimensionless."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n += (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            n += m.in_features
    return max(n, 1)


def network_atol(module: nn.Module, magnitude: float, passes: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Rounding bound of a result of ``passes`` network passes (forward = 1, forward + backward = 2) whose
    magnitude (max |value| of the compared quantity) is ``magnitude``: :func:`sum_atol` with n = passes ·
    :func:`pass_length`."""
    return sum_atol(passes * pass_length(module), magnitude, dtype)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (the same count as the side it is compared with)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    # mid-ranks for ties, so that a constant region does not decide the correlation
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two flattened maps (mid-ranks for ties); 1.0 for two constant maps."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return 1.0 if denom == 0 else float((ra * rb).sum() / denom)


def maps_agreement(actual: np.ndarray, expected: np.ndarray, atol: np.ndarray | float) -> tuple[float, float]:
    """(share of pixels with |actual − expected| ≤ atol, Spearman of the two) of the worst of the maps.

    ``actual``/``expected``: [..., H, W]; ``atol``: a scalar or one per map, in the maps' units."""
    a = np.asarray(actual, dtype=np.float64).reshape(-1, *np.shape(actual)[-2:])
    e = np.asarray(expected, dtype=np.float64).reshape(a.shape)
    tol = np.broadcast_to(np.asarray(atol, dtype=np.float64).reshape(-1), (len(a),))
    shares = [(np.abs(a[i] - e[i]) <= tol[i]).mean() for i in range(len(a))]
    ranks = [spearman(a[i], e[i]) for i in range(len(a))]
    return float(min(shares)), float(min(ranks))


def assert_maps_agree(actual: np.ndarray | torch.Tensor, expected: np.ndarray | torch.Tensor,
                      atol: np.ndarray | float, *, min_share: float = 0.999, min_spearman: float = 0.9999,
                      what: str = "maps") -> None:
    """The robust criterion for maps through piecewise-linear rules that were computed in another batch
    composition or thread count: in every map, ≥ ``min_share`` of the pixels within ``atol`` (a rounding bound,
    in the maps' units) **and** Spearman rank correlation ≥ ``min_spearman``. A mask flipped at a ReLU input
    within rounding of 0 moves a handful of pixels (measured: 3 of 50,176 on AMD EPYC); the real bugs of
    tests/test_tolerances.py move most of them."""
    as_np = (lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
    share, rank = maps_agreement(as_np(actual), as_np(expected), as_np(atol) if isinstance(atol, torch.Tensor)
                                 else atol)
    assert share >= min_share and rank >= min_spearman, (
        f"{what}: worst map has {share:.5f} of its pixels within the tolerance (need {min_share}) and "
        f"Spearman {rank:.6f} (need {min_spearman})")

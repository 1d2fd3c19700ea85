"""The linear system of ROAD's imputation and its solver (the equations are in :mod:`attribution.metrics.road`).

For the removed pixels of one image channel the system is A x = b with A = M (D - W) M: W sums the 8 neighbours
(1/6 sides, 1/12 diagonals; :func:`neighbour_sum`), D is each pixel's in-image neighbour weight (1 inside, 2/3 on
an edge, 5/12 in a corner) and M keeps the removed pixels. A is symmetric positive definite when one pixel is kept.

**Solver**: preconditioned conjugate gradients on all S = images × channels systems at once, each stopped by its
own max |residual| (see :func:`solve`). Two preconditioners (``PRECONDITIONERS``):

* ``"multigrid"`` (default): one geometric multigrid V-cycle. Level l+1 halves the grid (odd sides padded); a
  coarse pixel is unknown when all 4 of its fine pixels are (so a coarse domain never reaches past the fine
  one); the coarse operator is the same stencil with the coarse grid's own borders. Transfers: restriction =
  (1, 3, 3, 1)/4 per axis with stride 2 (4× the children's mean, matching the coarse stencil's (2h)² scale),
  prolongation = its exact adjoint (cell-centred bilinear interpolation, zero outside the grid); both masked to
  the unknowns. Smoother: Jacobi, ``SMOOTHING_SWEEPS`` sweeps before and after the coarse correction (the same
  count both sides, so the V-cycle is a symmetric positive definite operator, as CG needs; for this stencil
  D⁻¹A's spectrum lies in (0, 4/3], so undamped Jacobi divides the error's upper half of frequencies by ≥ 3).
  The hierarchy stops at ``MULTIGRID_COARSEST`` px (there: ``COARSEST_SWEEPS`` Jacobi sweeps) or where no coarse pixel
  is unknown (masks of scattered pixels; then the V-cycle is the smoothing alone). Why: a hole ~d px across has
  a smallest eigenvalue ~1/d², and Jacobi-preconditioned CG needs iterations ∝ d (~550-690 at 224 px); with the
  V-cycle the count hardly depends on d (8-24 measured). Each iteration costs 4 operator applications more on
  the full grid (and a third of that on the coarser ones).
* ``"jacobi"``: divide by D (the solver before the multigrid one; kept for comparison in bench.metrics).

Both start from the same problem solved on a 2× coarser grid (:func:`_coarse_guess`), which changes only the
number of iterations, not the solution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SIDE_WEIGHT = 1.0 / 6.0
DIAGONAL_WEIGHT = 1.0 / 12.0
PRECONDITIONERS = ("multigrid", "jacobi")
COARSEST = 16          # grids this small get the mean of the kept pixels as the coarse guess
COARSE_TOL = 1e-4      # the coarse-guess solves only give the starting point
SMOOTHING_SWEEPS = 2   # Jacobi sweeps before and after each coarse correction
MULTIGRID_COARSEST = 4  # the V-cycle's coarsest side in px
COARSEST_SWEEPS = 8    # Jacobi sweeps on that grid, in all


@dataclass
class ImputationInfo:
    """How the solve went: ``iterations`` of CG on the finest grid (the most any system needed, rounded up to a
    multiple of the check interval: every 2 iterations with the multigrid preconditioner, every 8 with Jacobi's,
    to spare a GPU a sync per iteration), ``max_residual`` = max |b - A x| over all equations of the returned
    solution (images' units; 0 if nothing was removed), ``converged`` = every system met ``tol``."""

    iterations: int
    max_residual: float
    converged: bool


def neighbour_sum(x: Tensor) -> Tensor:
    """sum_j w_j x_j over the 8 neighbours (1/6 sides, 1/12 diagonals) of every pixel of x [..., H, W]; pixels
    outside the image contribute nothing. Same shape, dtype and device as x. Computed as the separable [1, 2, 1]
    ⊗ [1, 2, 1] / 12 filter minus the centre's 4/12, with in-place shifted adds (no padding copy)."""
    rows = 2 * x
    rows[..., :, 1:] += x[..., :, :-1]
    rows[..., :, :-1] += x[..., :, 1:]
    out = 2 * rows
    out[..., 1:, :] += rows[..., :-1, :]
    out[..., :-1, :] += rows[..., 1:, :]
    return out.mul_(DIAGONAL_WEIGHT).sub_(x, alpha=4 * DIAGONAL_WEIGHT)


def _apply(v: Tensor, mask: Tensor, degree: Tensor) -> Tensor:
    """A v = M (D v - W v) for v [S, H, W] zero outside the mask; degree D [H, W]."""
    return neighbour_sum(v).neg_().addcmul_(degree, v).mul_(mask)


def restrict(fine: Tensor) -> Tensor:
    """[S, H, W] with H, W even -> [S, H/2, W/2]: (1, 3, 3, 1)/4 along each axis at stride 2, i.e. each coarse
    pixel gets 4× the bilinear-weighted mean of the 4×4 fine pixels around its 2×2 children (weights sum to 4)."""
    even, odd = fine[..., :, 0::2], fine[..., :, 1::2]
    rows = (even + odd).mul_(3)
    rows[..., :, 1:] += odd[..., :, :-1]
    rows[..., :, :-1] += even[..., :, 1:]
    even, odd = rows[..., 0::2, :], rows[..., 1::2, :]
    out = (even + odd).mul_(3)
    out[..., 1:, :] += odd[..., :-1, :]
    out[..., :-1, :] += even[..., 1:, :]
    return out.mul_(1 / 16)


def prolong(coarse: Tensor) -> Tensor:
    """[S, h, w] -> [S, 2h, 2w], the exact adjoint of :func:`restrict`: cell-centred bilinear interpolation
    (weights 9/16, 3/16, 3/16, 1/16 of the 4 nearest coarse pixels), with zeros outside the coarse grid."""
    s, h, w = coarse.shape
    rows = coarse.new_empty(s, h, 2 * w)
    even, odd = rows[..., 0::2], rows[..., 1::2]
    torch.mul(coarse, 3, out=even)
    odd.copy_(even)
    even[..., 1:] += coarse[..., :-1]
    odd[..., :-1] += coarse[..., 1:]
    out = coarse.new_empty(s, 2 * h, 2 * w)
    even, odd = out[..., 0::2, :], out[..., 1::2, :]
    torch.mul(rows, 3, out=even)
    odd.copy_(even)
    even[..., 1:, :] += rows[..., :-1, :]
    odd[..., :-1, :] += rows[..., 1:, :]
    return out.mul_(1 / 16)


class _Jacobi:
    """z = D⁻¹ r."""

    check_every = 8

    def __init__(self, mask: Tensor, degree: Tensor) -> None:
        self.inverse = 1.0 / degree

    def select(self, keep: Tensor) -> None:
        """Keep only the systems where ``keep`` [S] is True."""

    def __call__(self, r: Tensor) -> Tensor:
        return r * self.inverse


class _Multigrid:
    """One symmetric V-cycle (see the module docstring) for the systems of ``mask`` [S, H, W] (1 = unknown)."""

    check_every = 2

    def __init__(self, mask: Tensor, degree: Tensor) -> None:
        self.masks, self.degrees = [mask], [degree]
        while min(mask.shape[1:]) > MULTIGRID_COARSEST:
            s, h, w = mask.shape
            padded = F.pad(mask[:, None], (0, w % 2, 0, h % 2), mode="replicate")[:, 0]
            children = padded.reshape(s, (h + 1) // 2, 2, (w + 1) // 2, 2).sum(dim=(2, 4))
            mask = (children >= 4).to(mask.dtype)
            if not bool(mask.any()):
                break
            self.masks.append(mask)
            self.degrees.append(neighbour_sum(torch.ones_like(mask[0])))
        self.inverses = [1.0 / d for d in self.degrees]

    def select(self, keep: Tensor) -> None:
        """Keep only the systems where ``keep`` [S] is True."""
        self.masks = [m[keep] for m in self.masks]

    def __call__(self, r: Tensor) -> Tensor:
        return self._cycle(r, 0)

    def _smooth(self, x: Tensor | None, r: Tensor, level: int, sweeps: int) -> Tensor:
        mask, degree, inverse = self.masks[level], self.degrees[level], self.inverses[level]
        for _ in range(sweeps):
            if x is None:
                x = r * inverse
            else:
                x.addcmul_(r - _apply(x, mask, degree), inverse)
        return x

    def _cycle(self, r: Tensor, level: int) -> Tensor:
        if level == len(self.masks) - 1:
            small = min(r.shape[1:]) <= MULTIGRID_COARSEST
            return self._smooth(None, r, level, COARSEST_SWEEPS if small else 2 * SMOOTHING_SWEEPS)
        mask = self.masks[level]
        x = self._smooth(None, r, level, SMOOTHING_SWEEPS)
        residual = r - _apply(x, mask, self.degrees[level])
        s, h, w = residual.shape
        if h % 2 or w % 2:
            residual = F.pad(residual, (0, w % 2, 0, h % 2))
        coarse = self._cycle(restrict(residual).mul_(self.masks[level + 1]), level + 1)
        x.add_(prolong(coarse)[:, :h, :w].mul_(mask))
        return self._smooth(x, r, level, SMOOTHING_SWEEPS)


def _coarse_guess(values: Tensor, removed: Tensor, tol: float, max_iter: int, preconditioner: str) -> Tensor:
    """Starting point for the removed pixels: the problem solved on a 2x coarser grid, upsampled. [B, C, H, W]."""
    b, c, h, w = values.shape
    kept = (~removed).to(values.dtype)
    if min(h, w) <= COARSEST:
        mean = (values * kept).sum(dim=(2, 3)) / kept.sum(dim=(2, 3)).clamp_min(1)
        return mean[:, :, None, None].expand(b, c, h, w)
    kept_share = F.avg_pool2d(kept, 2, ceil_mode=True)
    coarse = F.avg_pool2d(values * kept, 2, ceil_mode=True) / kept_share.clamp_min(1e-12)
    coarse_removed = kept_share <= 0
    solution, _ = solve(coarse, coarse_removed, tol, max_iter, preconditioner)
    return F.interpolate(solution, size=(h, w), mode="bilinear", align_corners=False)


def _cg(m: Tensor, degree: Tensor, rhs: Tensor, x: Tensor, tol: Tensor, max_iter: int,
        preconditioner: str) -> tuple[Tensor, int]:
    """Preconditioned CG on S independent systems A_s x_s = rhs_s, A_s = m_s (degree - neighbour_sum) m_s.
    m, rhs, x: [S, H, W] (x zero where m is 0; updated in place and returned); tol: [S], the max |residual| at
    which a system stops. Every ``check_every`` iterations (the preconditioner's) the systems that met ``tol``
    are frozen and, once fewer than 3/4 of the working set is left, dropped from it (their solution written
    back), so the rest does not pay for them. Returns (x, iterations)."""
    def dot(a: Tensor, b: Tensor) -> Tensor:
        return torch.linalg.vecdot(a.flatten(1), b.flatten(1))

    out = x
    idx = torch.arange(x.shape[0], device=x.device)
    r = rhs - _apply(x, m, degree)
    active = r.abs().amax(dim=(1, 2)) > tol
    x, m, tol = x[active], m[active], tol[active]
    idx, r = idx[active], r[active]
    if not len(idx):
        return out, 0
    precondition = (_Multigrid if preconditioner == "multigrid" else _Jacobi)(m, degree)
    every = precondition.check_every
    z = precondition(r)
    p = z.clone()
    rz = dot(r, z)
    active = torch.ones(len(idx), dtype=torch.bool, device=x.device)
    iterations = 0
    while len(idx) and iterations < max_iter:
        iterations += 1
        ap = _apply(p, m, degree)
        pap = dot(p, ap)
        alpha = torch.where(active & (pap > 0), rz / torch.where(pap > 0, pap, 1), 0)[:, None, None]
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        if iterations % every == 0:
            active &= r.abs().amax(dim=(1, 2)) > tol
        z = precondition(r)
        rz_new = dot(r, z)
        beta = torch.where(active & (rz > 0), rz_new / torch.where(rz > 0, rz, 1), 0)[:, None, None]
        p.mul_(beta).add_(z)
        rz = rz_new
        if iterations % every == 0 and int(active.sum()) < 0.75 * len(idx):
            out[idx] = x
            x, m, tol, r, z, p, rz = (t[active] for t in (x, m, tol, r, z, p, rz))
            precondition.select(active)
            idx, active = idx[active], active[active]
    out[idx] = x
    return out, iterations


def solve(values: Tensor, removed: Tensor, tol: float, max_iter: int,
          preconditioner: str = "multigrid") -> tuple[Tensor, ImputationInfo]:
    """Linear imputation without noise. ``values`` [B, C, H, W] in the solve's dtype, ``removed`` bool [B, 1, H, W]
    (at least one pixel of each image kept) -> (values with the removed pixels solved, same shape and dtype;
    :class:`ImputationInfo`): one CG system per (b, c) from the coarse-grid start, each stopped at max |residual|
    <= ``tol`` (the values' units) or after ``max_iter`` iterations; the reported residual is recomputed."""
    b, c, h, w = values.shape
    if not bool(removed.any()):
        return values, ImputationInfo(0, 0.0, True)
    m = removed.to(values.dtype).expand(b, c, h, w).reshape(b * c, h, w)
    degree = neighbour_sum(torch.ones(h, w, dtype=values.dtype, device=values.device))
    flat = values.reshape(b * c, h, w)
    rhs = m * neighbour_sum(flat * (1 - m))
    x = m * _coarse_guess(values, removed, max(tol, COARSE_TOL), max_iter, preconditioner).reshape(b * c, h, w)
    x, iterations = _cg(m, degree, rhs, x, torch.full((b * c,), tol, dtype=values.dtype, device=values.device),
                        max_iter, preconditioner)
    residual = float(_apply(x, m, degree).sub_(rhs).abs().max())
    solved = (flat * (1 - m) + x).reshape(b, c, h, w)
    return solved, ImputationInfo(iterations, residual, residual <= tol)


__all__ = ["DIAGONAL_WEIGHT", "ImputationInfo", "PRECONDITIONERS", "SIDE_WEIGHT", "neighbour_sum", "prolong",
           "restrict", "solve"]

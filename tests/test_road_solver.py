"""attribution.metrics.road_solver: the multigrid preconditioner's pieces (transfers, V-cycle) have the properties
conjugate gradients relies on, and it reaches the same pixels as the Jacobi one in far fewer iterations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.errors import AttributionError
from attribution.metrics.perturbation import pixel_order
from attribution.metrics.road import DEFAULT_TOL, PIXEL_NOISE, linear_imputation
from attribution.metrics.road_solver import _Multigrid, neighbour_sum, prolong, restrict
from tests.test_road import masks, scipy_imputation

KERNEL = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
KERNEL = (KERNEL[:, None] * KERNEL[None, :] / 16)[None, None]


def hole(h: int, w: int, fraction: float = 0.9) -> torch.Tensor:
    """MoRF at ``fraction`` of a smooth map: one hole most of the image wide (the case Jacobi-CG is slowest on)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    smooth = torch.exp(-((yy - 0.67 * h) ** 2 + (xx - 0.27 * w) ** 2) / (2 * (0.18 * h) ** 2))
    removed = torch.zeros(h * w, dtype=torch.bool)
    removed[pixel_order(smooth[None].double())[0][: int(fraction * h * w)]] = True
    return removed.view(1, h, w)


def test_restriction_and_prolongation_are_adjoint_stride_2_filters():
    g = torch.Generator().manual_seed(0)
    fine, coarse = torch.randn(3, 12, 10, generator=g, dtype=torch.float64), torch.randn(3, 6, 5, generator=g,
                                                                                         dtype=torch.float64)
    torch.testing.assert_close(restrict(fine.clone()), F.conv2d(fine[:, None], KERNEL, stride=2, padding=1)[:, 0],
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(prolong(coarse), F.conv_transpose2d(coarse[:, None], KERNEL, stride=2,
                                                                   padding=1)[:, 0], rtol=0, atol=1e-14)
    assert abs(float((restrict(fine.clone()) * coarse).sum() - (fine * prolong(coarse)).sum())) < 1e-12
    # bilinear: a linear function of the coarse pixel centres is reproduced at the fine centres (away from the
    # zero outside); and restriction of a constant is 4x it inside (the coarse stencil's (2h)^2 scale)
    ramp = torch.arange(6, dtype=torch.float64)[None, :, None].expand(1, 6, 5)
    centres = (torch.arange(12, dtype=torch.float64) + 0.5) / 2 - 0.5
    torch.testing.assert_close(prolong(ramp)[0, 1:-1, 1:-1], centres[1:-1, None].expand(10, 8), rtol=0, atol=1e-14)
    assert torch.allclose(restrict(torch.ones(1, 12, 10, dtype=torch.float64))[0, 1:-1, 1:-1],
                          torch.full((4, 3), 4.0, dtype=torch.float64))


@pytest.mark.parametrize("h,w", [(40, 40), (37, 29), (96, 96)])
def test_the_v_cycle_is_symmetric_and_positive_definite(h, w):
    """CG needs a fixed symmetric positive definite preconditioner: <B r, s> = <r, B s> and <B r, r> > 0 for the
    border masks (scattered ones truncate the hierarchy at once), odd sides (padding) and a hole (deep)."""
    removed = torch.cat([masks(h, w, seed=h), hole(h, w)]).double()
    s = removed.shape[0]
    degree = neighbour_sum(torch.ones(h, w, dtype=torch.float64))
    cycle = _Multigrid(removed, degree)
    g = torch.Generator().manual_seed(w)
    r, q = (torch.randn(s, h, w, generator=g, dtype=torch.float64) * removed for _ in range(2))
    br, bq = cycle(r.clone()), cycle(q.clone())
    assert torch.equal(br * (1 - removed), torch.zeros_like(br))  # nothing leaks to the kept pixels
    lhs, rhs = (br * q).sum(dim=(1, 2)), (r * bq).sum(dim=(1, 2))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    assert bool(((br * r).sum(dim=(1, 2)) > 0).all())
    assert len(cycle.masks) > 3                     # the hole has coarse levels, so the test covers the transfers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multigrid_reaches_jacobis_pixels_in_a_tenth_of_the_iterations(dtype):
    """The 224-px 90 % hole: both preconditioners stop on the same residual rule, and both equal scipy's spsolve
    of the same system within what that rule allows: float64 1e-6 (measured 3e-7 / 9e-7); float32, whose error
    comes from rounding (measured 9e-4 with either preconditioner), 20x below ROAD's noise in these units (the
    float32 option's promise, as test_road). Multigrid needs < 1/10 of Jacobi's iterations (measured: 14-18 vs
    550-700)."""
    removed = hole(224, 224)
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    images = ((pixels - 0.45) / 0.226).to(dtype)
    runs = {p: linear_imputation(images, removed, dtype=dtype, preconditioner=p, return_info=True)
            for p in ("multigrid", "jacobi")}
    (mg, mg_info), (jac, jac_info) = runs["multigrid"], runs["jacobi"]
    bound = 1e-6 if dtype == torch.float64 else PIXEL_NOISE / 0.226 / 20
    ref = scipy_imputation(images[0].double().numpy(), removed[0].numpy())
    assert np.abs(mg[0].double().numpy() - ref).max() < bound
    assert np.abs(jac[0].double().numpy() - ref).max() < bound
    if dtype == torch.float64:
        assert mg_info.converged and mg_info.max_residual <= DEFAULT_TOL and jac_info.converged
    assert mg_info.iterations * 10 < jac_info.iterations, (mg_info, jac_info)


def test_unknown_preconditioner():
    with pytest.raises(AttributionError, match="preconditioner must be one of"):
        linear_imputation(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), preconditioner="ilu")

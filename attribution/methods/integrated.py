"""Integrated Gradients (Sundararajan et al. 2017), batched over (image, target) pairs and over path steps.

IG_i = (x_i − x̄_i) · ∫_0^1 ∂f_k(x̄ + α(x − x̄)) / ∂x_i dα, the integral approximated by a quadrature rule.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.methods.a_fmi import reference_images
from attribution.methods.base import Attribution, Method, check_target_range

QUADRATURES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """(alphas, weights) of Captum's approximation methods, so that ∫_0^1 h ≈ Σ w_s h(α_s).

    ``gausslegendre``: Gauss–Legendre nodes/weights mapped to [0, 1]. ``riemann_*``: weights 1/steps
    (``trapezoid`` halves the first and last; its alphas are linspace(0, 1, steps) — Captum's exact scheme).
    """
    if not isinstance(steps, int) or steps < 1 or (method != "gausslegendre" and steps < 2):
        raise AttributionError(f"ig: steps must be an integer >= {1 if method == 'gausslegendre' else 2}, "
                               f"got {steps!r}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    if method not in QUADRATURES:
        raise AttributionError(f"ig: unknown method {method!r}; use one of {', '.join(QUADRATURES)}")
    n = steps
    weights = [1 / n] * n
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        alphas = torch.linspace(0, 1, n)
    elif method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n)
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    else:
        alphas = torch.linspace(1 / n, 1, n)
    return alphas.tolist(), weights


class IntegratedGradients(Method):
    """Integrated Gradients maps [B(, T), H, W]: signed, float32, the per-pixel attribution **summed over colour
    channels** (Captum's ``IntegratedGradients(...).attribute(...)`` summed over dim 1).

    Options: ``steps`` (32), ``method`` (``"gausslegendre"``, Captum's default; or ``riemann_trapezoid``,
    ``riemann_left``, ``riemann_right``, ``riemann_middle``, Captum's schemes), ``baseline`` (``"black"`` default,
    ``"white"``, ``"random"`` or a normalised tensor, see :func:`attribution.methods.a_fmi.reference_images`),
    ``seed`` (for ``"random"``), ``internal_batch_size`` (rows, i.e. (step, image) points, per forward pass;
    default 64; None = all steps × images in one pass), ``return_delta`` (extras ``delta`` [B(, T)] =
    Σ map − (f(x) − f(x̄)), the completeness error).

    Decisions: a black baseline is black in *pixel* space, then normalised (not a zero tensor in normalised
    space), as A-FMI's reference. The path points of all images and steps are flattened to rows and run in
    chunks of ``internal_batch_size``; each chunk has one forward pass and one backward pass per target column,
    so T targets cost T backward passes, not T forward passes. Weighted gradients are summed per image in step
    order, then multiplied by (x − x̄) and summed over channels.
    """

    name = "ig"

    def _attribute(self, images: Tensor, targets: Tensor, *, steps: int = 32, method: str = "gausslegendre",
                   baseline: str | Tensor = "black", seed: int = 0, internal_batch_size: int | None = 64,
                   return_delta: bool = False) -> Attribution:
        if internal_batch_size is not None and (not isinstance(internal_batch_size, int) or internal_batch_size < 1):
            raise AttributionError(f"ig: internal_batch_size must be a positive integer or None, "
                                   f"got {internal_batch_size!r}")
        alphas, weights = quadrature(method, steps)
        model = self.spec.module
        b, t = targets.shape
        base = reference_images(self.spec, baseline, images, seed).expand_as(images)
        diff = images - base
        alpha = torch.tensor(alphas, dtype=images.dtype, device=images.device)
        weight = torch.tensor(weights, dtype=images.dtype, device=images.device)
        rows = len(alphas) * b  # row r: step r // b, image r % b
        chunk = rows if internal_batch_size is None else internal_batch_size
        total = torch.zeros((b, t, *images.shape[1:]), dtype=images.dtype, device=images.device)
        for start in range(0, rows, chunk):
            r = torch.arange(start, min(start + chunk, rows), device=images.device)
            step, image = r // b, r % b
            a = alpha[step].view(-1, 1, 1, 1)
            points = (base[image] + a * diff[image]).detach().requires_grad_(True)
            logits = model(points)
            check_target_range(targets, logits.shape[1], self.name)
            for m in range(t):
                score = logits.gather(1, targets[image, m:m + 1]).sum()
                (grad,) = torch.autograd.grad(score, points, retain_graph=m < t - 1)
                total[:, m].index_add_(0, image, grad * weight[step].view(-1, 1, 1, 1))
        maps = (total * diff[:, None]).sum(dim=2).detach()
        extras = {}
        if return_delta:
            with torch.no_grad():
                f = model(images).gather(1, targets)
                f_ref = model(base).gather(1, targets)
            extras["delta"] = maps.sum(dim=(2, 3)) - (f - f_ref)
        return Attribution(maps, extras)

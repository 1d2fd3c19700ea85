"""Extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019), following TorchRay's ``extremal_perturbation``.

For each (image, target, area a) a smooth mask m is optimised so that the image blurred everywhere except where
m ≈ 1 ("preserve" variant) keeps the target logit high, while an area regulariser pushes the sorted mask values
towards a step vector with a share a of ones:

    energy = f_c(perturb(x, m)) − λ_t · mean((sort(m) − r_a)²),   λ_0 = 300, λ_{t+1} = 1.0035 λ_t.

Pieces, as in TorchRay 1.0.0.2 (verified against it in tests/test_extremal.py):

* Mask parameterisation ("smooth max"): parameters on a grid of stride ``step`` (7 px), initialised to 1;
  each output pixel takes the softmax-weighted (coldness 20) maximum of the parameters within the kernel's reach,
  each weighted by the radial kernel k(z) = exp(−2·max(z − ½, 0)²), z = distance / ``sigma`` (21 px); the mask
  is clamped to [0, 1] and has a margin of ``sigma`` pixels around the image (the area term sees the margin).
* Perturbation: a blur pyramid of ``num_levels`` (8) levels, σ_l = max_blur·(1 − l/(L−1)), max_blur = 20,
  separable Gaussian of half-width ⌈4σ⌉ with zero padding (of the normalised image); the perturbed image
  interpolates linearly between pyramid levels at level m·(L−1).
* Optimiser: SGD, lr 0.01, momentum 0.9, dampening 0.9 — what TorchRay, the reference implementation, uses
  (not Adam), parameters clamped to [0, 1] after each step.
  ``iterations`` default 800 (TorchRay). Jitter: the perturbed batch is flipped horizontally on even
  iterations (deterministic, as TorchRay). Reward: the target logit (TorchRay's ``simple_reward``);
  "delete" uses 1 − m and the negated logit.
* The returned mask is the one of the last iteration's forward pass (before its update), as TorchRay returns.
* Areas: default (0.1,) (TorchRay's default). The map is the sum of the masks over the areas (TorchRay's
  benchmark summarises several areas by summing); extras ``masks`` [B(, T), A, H, W] keeps them apart.

Decisions of this implementation:

* Batched: the (image, target, area) rows are optimised together, ``internal_batch_size`` rows (default 64) per
  optimisation loop; rows do not interact (eval-mode model, energy summed over rows, element-wise SGD), so each
  row follows its own TorchRay trajectory and the chunks run one after the other. The chunk bounds memory: a
  row costs about 120 MiB for a ResNet-18 at 224 px on CPU (the smooth-max mask generator's k²-channel maps and
  one backward through the model).
* The caller's model is untouched: TorchRay sets ``requires_grad=False`` on the model's parameters; here
  gradients are taken w.r.t. the mask parameters only (``torch.autograd.grad``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from attribution.errors import AttributionError
from attribution.methods.base import Attribution, Method, check_target_range

COLDNESS = 20.0
LEARNING_RATE = 0.01
MOMENTUM = 0.9
REGUL_WEIGHT = 300.0
REGUL_GROWTH = 1.0035
MAX_BLUR = 20.0
VARIANTS = ("preserve", "delete")
_SQRT_TWO = float(torch.tensor(math.sqrt(2.0), dtype=torch.float32))
_EPS32 = float(torch.finfo(torch.float32).eps)


def gaussian_blur(x: Tensor, sigma: Tensor | float) -> Tensor:
    """Separable Gaussian blur of [N, C, H, W], half-width ⌈4σ⌉, kernel normalised to 1, zero padding."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    width = math.ceil(float(4 * sigma))
    taps = torch.arange(-width, width + 1, dtype=torch.float32, device=x.device) / (_SQRT_TWO * sigma + _EPS32)
    taps = torch.exp(-taps * taps)
    taps = (taps / taps.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(c, -1, -1, -1), padding=(width, 0), groups=c)
    return F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, -1, -1, -1), padding=(0, width), groups=c)


def blur_pyramid(images: Tensor, levels: int, max_blur: float = MAX_BLUR) -> Tensor:
    """[B, L, C, H, W]: level l blurred with σ = max_blur·(1 − l/(L−1)); level L−1 is the image itself."""
    return torch.stack([gaussian_blur(images, (1 - s) * max_blur) for s in torch.linspace(0, 1, levels)], dim=1)


def perturb(pyramid: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
    """Perturbed images [R, C, H, W] from the pyramid of each row's image and masks [R, 1, H, W] in [0, 1]."""
    levels = pyramid.shape[1]
    level = mask * (levels - 1)
    lower = level.floor()
    frac = level - lower
    lower = lower.long()
    y = pyramid[rows]  # [R, L, C, H, W]
    index0 = lower[:, :, None].expand(-1, 1, y.shape[2], -1, -1)
    y0 = torch.gather(y, 1, index0)
    y1 = torch.gather(y, 1, (index0 + 1).clamp(max=levels - 1))
    return ((1 - frac[:, :, None]) * y0 + frac[:, :, None] * y1)[:, 0]


class SmoothMask:
    """TorchRay's smooth-max mask generator for images of ``shape`` (H, W), parameter stride ``step``."""

    def __init__(self, shape: tuple[int, int], step: int, sigma: float) -> None:
        self.shape, self.step, self.sigma = shape, int(step), float(sigma)
        self.margin = self.sigma
        self.padding = 1 + math.ceil((self.margin + self.sigma) / step)
        self.radius = 1 + math.ceil(self.sigma / step)
        self.shape_in = [math.ceil(z / step) for z in shape]
        self.shape_mid = [z + 2 * self.padding - 2 * self.radius for z in self.shape_in]
        self.shape_up = [step * z for z in self.shape_mid]
        self.shape_out = [z - step + 1 for z in self.shape_up]
        self.weight = _kernel_weights(tuple(self.shape_out), tuple(self.shape_mid), tuple(self.shape_up),
                                      self.radius, self.padding, self.margin, self.step, self.sigma)

    def __call__(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Parameters [R, 1, h, w] -> (mask cropped to the image [R, 1, H, W], full mask with margin)."""
        k = 2 * self.radius + 1
        m = F.unfold(params, (k, k), padding=(self.padding,) * 2).view(len(params), -1, *self.shape_mid)
        m = F.interpolate(m, size=self.shape_up, mode="nearest")[..., :self.shape_out[0], :self.shape_out[1]]
        m = self.weight.to(m) * m
        m = (m * F.softmax(COLDNESS * m, dim=1)).sum(dim=1, keepdim=True).clamp(0, 1)
        o = round(self.margin)
        return m[:, :, o:o + self.shape[0], o:o + self.shape[1]], m


@lru_cache(maxsize=8)
def _kernel_weights(shape_out, shape_mid, shape_up, radius, padding, margin, step, sigma) -> Tensor:
    k = 2 * radius + 1
    uy, ux = torch.meshgrid(torch.arange(shape_out[0], dtype=torch.float32),
                            torch.arange(shape_out[1], dtype=torch.float32), indexing="ij")
    ratio = [torch.tensor(m, dtype=torch.float32) / torch.tensor(u, dtype=torch.float32)
             for m, u in zip(shape_mid, shape_up)]
    weight = torch.zeros(1, k * k, *shape_out)
    for ky in range(k):
        for kx in range(k):
            iy = torch.floor(ratio[0] * uy) + ky - padding
            ix = torch.floor(ratio[1] * ux) + kx - padding
            dist = torch.sqrt((uy - (margin + step * iy)) ** 2 + (ux - (margin + step * ix)) ** 2)
            weight[0, ky * k + kx] = torch.exp(-2 * ((dist / sigma - 0.5).clamp(min=0) ** 2))
    return weight


class ExtremalPerturbation(Method):
    """Extremal-perturbation maps [B(, T), H, W] in [0, len(areas)]; see the module docstring.

    Options: ``areas`` ((0.1,)), ``iterations`` (800), ``step`` (7), ``sigma`` (21), ``num_levels`` (8),
    ``max_blur`` (20), ``jitter`` (True), ``variant`` ("preserve" or "delete"), ``return_masks`` (extras
    ``masks`` [B(, T), A, H, W] and ``area`` [B(, T), A], the mean of each full mask incl. margin),
    ``internal_batch_size`` ((image, target, area) rows optimised together, 64; None = all rows at once).
    """

    name = "extremal_perturbation"

    def _attribute(self, images: Tensor, targets: Tensor, *, areas: Sequence[float] = (0.1,),
                   iterations: int = 800, step: int = 7, sigma: float = 21.0, num_levels: int = 8,
                   max_blur: float = MAX_BLUR, jitter: bool = True, variant: str = "preserve",
                   return_masks: bool = False, internal_batch_size: int | None = 64) -> Attribution:
        areas = [float(areas)] if isinstance(areas, (int, float)) else [float(a) for a in areas]
        if variant not in VARIANTS:
            raise AttributionError(f"extremal_perturbation: unknown variant {variant!r}; use {', '.join(VARIANTS)}")
        if not areas or any(not 0 < a <= 1 for a in areas) or iterations < 0 or step < 1 or num_levels < 2:
            raise AttributionError("extremal_perturbation: need areas in (0, 1], iterations >= 0, step >= 1, "
                                   "num_levels >= 2")
        if internal_batch_size is not None and (not isinstance(internal_batch_size, int) or internal_batch_size < 1):
            raise AttributionError(f"extremal_perturbation: internal_batch_size must be a positive integer or None, "
                                   f"got {internal_batch_size!r}")
        b, t_count, a_count = images.shape[0], targets.shape[1], len(areas)
        h, w = images.shape[-2:]
        images = images.detach()
        with torch.no_grad():
            check_target_range(targets, self.spec.module(images[:1]).shape[1], self.name)
            pyramid = blur_pyramid(images, num_levels, max_blur)
        rows = torch.arange(b, device=images.device).repeat_interleave(t_count * a_count)  # [R] image index
        row_targets = targets.repeat_interleave(a_count, dim=1).reshape(-1, 1)  # [R, 1]
        generator = SmoothMask((h, w), step, sigma)
        full_size = generator.shape_out[0] * generator.shape_out[1]
        reference = images.new_ones(a_count, full_size)
        for i, a in enumerate(areas):
            reference[i, :int(full_size * (1 - a))] = 0
        reference = reference.repeat(b * t_count, 1)  # [R, full_size]
        chunk = len(rows) if internal_batch_size is None else internal_batch_size
        parts = [self._optimise(pyramid, rows[i:i + chunk], row_targets[i:i + chunk], reference[i:i + chunk],
                                generator, iterations, jitter, variant) for i in range(0, len(rows), chunk)]
        mask, full = torch.cat([m for m, _ in parts]), torch.cat([f for _, f in parts])
        masks = mask.view(b, t_count, a_count, h, w)
        extras = {}
        if return_masks:
            extras = {"masks": masks, "area": full.flatten(1).mean(dim=1).view(b, t_count, a_count)}
        return Attribution(masks.sum(dim=2), extras)

    def _optimise(self, pyramid: Tensor, rows: Tensor, row_targets: Tensor, reference: Tensor,
                  generator: SmoothMask, iterations: int, jitter: bool, variant: str) -> tuple[Tensor, Tensor]:
        """TorchRay's optimisation of the masks of R rows together (``rows`` [R]: image index into ``pyramid``,
        ``row_targets`` [R, 1], ``reference`` [R, full_size]: the sorted-mask target of each row's area).
        Returns the last iteration's masks [R, 1, H, W] and full masks with margin, both detached."""
        params = pyramid.new_ones(len(rows), 1, *generator.shape_in)
        optimizer = torch.optim.SGD([params], lr=LEARNING_RATE, momentum=MOMENTUM, dampening=MOMENTUM)
        regul_weight = REGUL_WEIGHT
        for it in range(iterations):
            params.requires_grad_(True)
            mask, full = generator(params)
            x = perturb(pyramid, rows, mask if variant == "preserve" else 1 - mask)
            if jitter and it % 2 == 0:
                x = torch.flip(x, dims=(3,))
            score = self.spec.module(x).gather(1, row_targets)[:, 0]
            reward = score if variant == "preserve" else -score
            regul = -((full.flatten(1).sort(dim=1).values - reference) ** 2).mean(dim=1) * regul_weight
            (grad,) = torch.autograd.grad(-(reward + regul).sum(), params)
            params.grad = grad
            optimizer.step()
            params.grad = None
            with torch.no_grad():
                params.clamp_(0, 1)
            regul_weight *= REGUL_GROWTH
            mask, full = mask.detach(), full.detach()
        if iterations == 0:
            with torch.no_grad():
                mask, full = generator(params)
        return mask, full

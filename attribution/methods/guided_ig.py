"""Guided Integrated Gradients (Kapishnikov et al., CVPR 2021), batched over (image, target) pairs.

The algorithm is ``saliency.core.guided_ig.guided_ig_impl`` (the `saliency` package 0.2.1) step for step: the
path starts at the baseline; at step s (of ``steps``) every feature that fell behind alpha_min = alpha − max_dist
is pulled up to the straight-line point at alpha_min, then, repeatedly, the ``fraction`` of the features with the
smallest |gradient| (features already at alpha_max = alpha + max_dist excluded; threshold = numpy's
``quantile(..., 'lower')``) are moved toward alpha_max until the L1 distance to the input has shrunk to
L1_total·(1 − s/steps); attribution += Δx · gradient (the gradient taken once per step, before moving).

Decisions:
- *Pixel space.* The path runs in pixel space ([0, 1] images: the caller's normalised images are denormalised
  with the model's preprocessing, in float64), the explained function being f(normalise(x)), so gradients are
  w.r.t. pixels (autograd through the normalisation). The black baseline is black in pixel space (made with
  :func:`attribution.methods.a_fmi.reference_images` and denormalised, i.e. 0 up to float32 rounding of the
  round trip). Reason: the L1 budget and the "smallest |gradient|" selection then treat all colour channels on the
  same scale and the path does not depend on how a model splits its preprocessing. Per step Δx·grad is the same
  number in either space; only the chosen path differs (ImageNet's stds are close, so the difference is small).
- Path state (x, bounds, attribution) in float64 like the reference; the model runs in the images' dtype.
- Batched: every (image, target) pair is its own path (B·T rows); one forward and one backward per step for all
  rows of a chunk (each row's own target logit). The inner "move the selected features" loop runs for all rows
  of the chunk together, rows that have reached their L1 target simply stop changing. Rows never interact, so
  the B·T rows are processed in chunks of ``internal_batch_size`` (default 64), each chunk running all steps:
  memory is bounded by the chunk (about 45 MiB per row for a ResNet-18 at 224 px on CPU: activations for one
  backward plus ~15 float64 path tensors), not by B·T.
- Map = attribution summed over colour channels (signed), so a map sums to ≈ f(x) − f(baseline) (completeness).
- Numerics: the feature selection ranks |gradient|, so a rounding change that swaps two features at the
  threshold changes the rest of the path. Maps are bit-identical for identical inputs (same batch, same device),
  but in float32 a pair's map can change with the batch it is computed in (convolution rounding depends on the
  batch size) or with the conv kernels chosen (e.g. channels-last input); the bulk of the map and its sum are
  stable, single pixels may not be. For exact reproducibility run the model and images in float64.
- The model is never modified (no hooks, no copies needed: plain autograd w.r.t. the input).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.methods.a_fmi import reference_images
from attribution.methods.base import Attribution, Method, check_target_range

EPSILON = 1e-9  # the reference's tolerance for "L1 target reached" (math.isclose rel_tol = abs_tol)


def quantile_lower_index(n: int, fraction: float) -> int:
    """0-based index numpy's ``quantile(a, fraction, method='lower')`` picks from the sorted ``a`` of size n."""
    return int(min(max(math.floor((n - 1) * fraction), 0), n - 1))  # numpy's get_virtual_index for 'lower'


class GuidedIG(Method):
    """Guided IG maps [B(, T), H, W], float32, signed, summed over colour channels.

    Options: ``steps`` (200, the `saliency` package's ``x_steps`` default), ``fraction`` (0.25), ``max_dist``
    (0.02), ``baseline`` ("black" (default), "white", "random" or a normalised tensor; see
    :func:`~attribution.methods.a_fmi.reference_images`), ``seed`` (for the random baseline),
    ``internal_batch_size`` ((image, target) paths computed together, 64; None = all B·T at once).
    """

    name = "gig"

    def _attribute(self, images: Tensor, targets: Tensor, *, steps: int = 200, fraction: float = 0.25,
                   max_dist: float = 0.02, baseline: str | Tensor = "black", seed: int = 0,
                   internal_batch_size: int | None = 64) -> Attribution:
        if int(steps) != steps or steps < 1:
            raise AttributionError(f"{self.name}: steps must be a positive integer, got {steps!r}")
        if internal_batch_size is not None and (not isinstance(internal_batch_size, int) or internal_batch_size < 1):
            raise AttributionError(f"{self.name}: internal_batch_size must be a positive integer or None, "
                                   f"got {internal_batch_size!r}")
        if not 0.0 <= fraction <= 1.0 or not 0.0 <= max_dist <= 1.0:
            raise AttributionError(f"{self.name}: fraction and max_dist must lie in [0, 1], "
                                   f"got {fraction!r}, {max_dist!r}")
        steps = int(steps)
        spec, prep = self.spec, self.spec.preprocessing
        b, t = targets.shape
        n = b * t
        dtype = images.dtype
        refs = reference_images(spec, baseline, images, seed).expand_as(images)
        # one row per (image, target) pair, features flattened (the algorithm is permutation-invariant)
        x_input = prep.denormalise(images.detach().to(torch.float64)).repeat_interleave(t, dim=0).reshape(n, -1)
        x_base = prep.denormalise(refs.detach().to(torch.float64)).repeat_interleave(t, dim=0).reshape(n, -1)
        classes = targets.reshape(n, 1)
        chunk = n if internal_batch_size is None else internal_batch_size
        attr = torch.cat([self._paths(x_input[i:i + chunk], x_base[i:i + chunk], classes[i:i + chunk],
                                      images.shape[1:], dtype, steps, fraction, max_dist)
                          for i in range(0, n, chunk)])
        maps = attr.reshape(n, *images.shape[1:]).sum(dim=1).reshape(b, t, *images.shape[-2:])
        return Attribution(maps.to(torch.float32))

    def _paths(self, x_input: Tensor, x_base: Tensor, classes: Tensor, image_shape: torch.Size, dtype: torch.dtype,
               steps: int, fraction: float, max_dist: float) -> Tensor:
        """Guided IG attributions float64 [n, F] of n paths (rows: flattened pixels [n, F] of inputs and baselines,
        float64; ``classes`` [n, 1]) that are computed together; the model runs in ``dtype``."""
        n = x_input.shape[0]
        shape = (n, *image_shape)
        x = x_base.clone()
        diff = x_input - x_base
        l1_total = diff.abs().sum(dim=1)
        attr = torch.zeros_like(x_input)
        live = l1_total != 0  # a pair whose input equals its baseline gets zero attribution (as in the reference)
        k = quantile_lower_index(x.shape[1], fraction)
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)

        for step in range(steps):
            grad_actual = self._gradients(x.reshape(shape).to(dtype), classes).reshape(n, -1).to(torch.float64)
            grad = grad_actual.clone()
            alpha = (step + 1.0) / steps
            alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
            x_min = x_base + diff * alpha_min
            x_max = x_base + diff * alpha_max
            l1_target = l1_total * (1 - (step + 1) / steps)
            active = live.clone()
            while bool(active.any()):
                rows = active[:, None]
                x_old = x.clone()
                x_alpha = torch.where(diff != 0, (x - x_base) / diff, torch.full_like(x, alpha_max))
                behind = (x_alpha < alpha_min) & rows
                x = torch.where(behind, x_min, x)
                l1_current = (x - x_input).abs().sum(dim=1)
                close = (l1_target - l1_current).abs() <= torch.clamp(
                    EPSILON * torch.maximum(l1_target.abs(), l1_current.abs()), min=EPSILON)
                moving = active & ~close
                grad = torch.where((x == x_max) & moving[:, None], inf, grad)
                magnitude = grad.abs()
                threshold = magnitude.kthvalue(k + 1, dim=1, keepdim=True).values
                selected = (magnitude <= threshold) & (grad != inf) & moving[:, None]
                l1_s = ((x - x_max).abs() * selected).sum(dim=1)
                gamma = torch.where(l1_s > 0, (l1_current - l1_target) / l1_s, inf)
                partial = (gamma <= 1.0) & moving
                if bool((partial & ~(gamma > 0)).any()):
                    raise AttributionError(f"{self.name}: non-positive step ratio (internal error)")
                moved = torch.where((gamma > 1.0)[:, None], x_max, x + (x_max - x) * gamma[:, None])
                x = torch.where(selected, moved, x)
                attr = attr + torch.where(active[:, None], (x - x_old) * grad_actual, 0.0)
                active = moving & (gamma > 1.0)
        return attr

    def _gradients(self, pixels: Tensor, classes: Tensor) -> Tensor:
        """d logit[n, classes[n]] / d pixels[n] for every row n, through the model's normalisation."""
        leaf = pixels.detach().requires_grad_(True)
        logits = self.spec.module(self.spec.preprocessing.normalise(leaf))
        if logits.dim() != 2:
            raise AttributionError(f"{self.name}: model output must be logits [B, K], got {tuple(logits.shape)}")
        check_target_range(classes, logits.shape[1], self.name)
        (grad,) = torch.autograd.grad(logits.gather(1, classes).sum(), leaf)
        return grad

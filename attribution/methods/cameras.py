"""CAMERAS (Jalwana, Akhtar, Bennamoun & Mian, CVPR 2021): multi-scale activation × gradient maps.

For scales s = 1..S the image is resized to ``resolutions[s]`` (bicubic, align_corners=False; the first
resolution that equals the input size uses the image as is), the target layer's activations A_s and the
gradients G_s = d f_c / d A_s (f_c the class *logit*, as in the authors' code) are recorded, both are upsampled
bilinearly (align_corners=False) to the input resolution, averaged over the scales, and

    map = relu( Σ_k  mean_s(up(G_s))_k · mean_s(up(A_s))_k ).

Decisions (checked against the authors' code, VisMIL/CAMERAS ``CAMERAS.py``):

* Default resolutions: ``range(H, 1000, 100)`` for an input of height H — for 224 px the authors' default
  224, 324, …, 924 (8 scales, largest < 1000 px). Non-square inputs keep their aspect ratio (the width is
  scaled by the same factor); the authors only use square inputs.
* ``consistent_only=True`` (authors' rule): a scale takes part in the average for (image, target) only if the
  model's top class at that scale equals its top class at the first resolution, or equals the target. The first
  resolution always takes part. ``False`` averages over all scales.
* No final min-max normalisation (the authors' code divides by the max for display); maps are raw, like the
  project's Grad-CAM.
* One forward pass per scale for the whole batch, one backward pass per target column and scale; the
  full-resolution products are summed over channels in chunks of ``CHANNEL_CHUNK`` channels to bound memory.
* Relation to Grad-CAM (tested): with a single scale equal to the input size and a head in which the gradient
  is constant over space (global average pooling + linear, e.g. ResNets), up(G) = G = Grad-CAM's weights, so
  CAMERAS = relu(up(Σ_k w_k A_k)), while Grad-CAM = up(relu(Σ_k w_k A_k)); they are equal wherever the
  pre-ReLU map is non-negative. With a target layer at the input resolution, CAMERAS = relu(Σ_k G_k ⊙ A_k).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attribution.errors import AttributionError
from attribution.hooks import capture_outputs
from attribution.maps import upsample
from attribution.methods.base import Attribution, Method, check_target_range

MAX_RESOLUTION = 1000  # exclusive upper bound of the default resolutions (authors: range(224, 1000, 100))
RESOLUTION_STEP = 100
CHANNEL_CHUNK = 64


def default_resolutions(height: int) -> list[int]:
    """The authors' scales for an input of ``height`` pixels: range(height, 1000, 100) (at least [height])."""
    return list(range(height, MAX_RESOLUTION, RESOLUTION_STEP)) or [height]


class CAMERAS(Method):
    """CAMERAS maps [B(, T), H, W] (non-negative, unnormalised). Options: ``resolutions`` (heights in pixels;
    default :func:`default_resolutions`), ``consistent_only`` (the authors' scale filter), ``return_scales``
    (extras ``scales_used`` [B(, T), S] bool: which scales entered the average)."""

    name = "cameras"

    def _attribute(self, images: Tensor, targets: Tensor, *, resolutions: Sequence[int] | None = None,
                   consistent_only: bool = True, return_scales: bool = False) -> Attribution:
        layer = self.spec.target_layer
        if layer is None:
            raise AttributionError(f"cameras: model {self.spec.name} has no target layer")
        h, w = images.shape[-2:]
        resolutions = list(resolutions) if resolutions is not None else default_resolutions(h)
        if not resolutions or any(int(r) < 1 for r in resolutions):
            raise AttributionError(f"cameras: resolutions must be positive pixel heights, got {resolutions}")
        activations, gradients, predictions = [], [], []
        for r in resolutions:
            size = (int(r), max(1, round(int(r) * w / h)))
            x = images if size == (h, w) else F.interpolate(images, size=size, mode="bicubic",
                                                              align_corners=False)
            x = x.detach().requires_grad_(True)
            with capture_outputs([layer]) as captured:
                logits = self.spec.module(x)
            if len(captured[0]) != 1 or captured[0][0].dim() != 4:
                raise AttributionError(f"cameras: target layer of {self.spec.name} must run once and give "
                                       "[B, C, h, w] feature maps")
            check_target_range(targets, logits.shape[1], self.name)
            a = captured[0][0]
            grads = []
            for m in range(targets.shape[1]):
                score = logits.gather(1, targets[:, m:m + 1]).sum()
                (g,) = torch.autograd.grad(score, a, retain_graph=m < targets.shape[1] - 1)
                grads.append(g.detach())
            activations.append(a.detach())
            gradients.append(torch.stack(grads, dim=1))  # [B, T, C, h_s, w_s]
            predictions.append(logits.detach().argmax(dim=1))
        preds = torch.stack(predictions, dim=1)  # [B, S]
        if consistent_only:
            used = (preds == preds[:, :1])[:, None, :] | (preds[:, None, :] == targets[:, :, None])  # [B, T, S]
        else:
            used = torch.ones(*targets.shape, len(resolutions), dtype=torch.bool, device=images.device)
        used[:, :, 0] = True
        weights = used.to(images.dtype) / used.sum(dim=2, keepdim=True).to(images.dtype)  # [B, T, S]

        maps = []
        channels = activations[0].shape[1]
        for t in range(targets.shape[1]):
            total = images.new_zeros(images.shape[0], h, w)
            for c0 in range(0, channels, CHANNEL_CHUNK):
                c1 = min(c0 + CHANNEL_CHUNK, channels)
                mean_a = sum(weights[:, t, s, None, None, None] * upsample(a[:, c0:c1], (h, w))
                             for s, a in enumerate(activations))
                mean_g = sum(weights[:, t, s, None, None, None] * upsample(g[:, t, c0:c1], (h, w))
                             for s, g in enumerate(gradients))
                total += (mean_a * mean_g).sum(dim=1)
            maps.append(torch.relu(total))
        extras = {"scales_used": used} if return_scales else {}
        return Attribution(torch.stack(maps, dim=1), extras)

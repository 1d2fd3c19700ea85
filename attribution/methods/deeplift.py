"""DeepLIFT with the rescale rule (Shrikumar et al. 2017), batched over (image, target) pairs."""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.hooks import activation_rule
from attribution.methods.a_fmi import reference_images
from attribution.methods.base import Attribution, Method, check_target_range


class DeepLift(Method):
    """DeepLIFT-rescale maps [B(, T), H, W]: signed, float32, multipliers × (x − x̄) **summed over colour
    channels** (Captum ``DeepLift(model).attribute(x, baselines=x̄, target=k)`` summed over dim 1).

    Options: ``baseline`` (``"black"`` default, ``"white"``, ``"random"`` or a normalised tensor, see
    :func:`attribution.methods.a_fmi.reference_images`), ``seed`` (for ``"random"``), ``return_delta`` (extras
    ``delta`` [B(, T)] = Σ map − (f(x) − f(x̄)), zero up to rounding: DeepLIFT's summation-to-delta).

    Decisions: one forward pass of the paired batch [x; x̄] through the *whole* model under the shared "secant"
    rule of :mod:`attribution.hooks` — every element-wise activation call uses (σ(y) − σ(ȳ)) / (y − ȳ) (the
    ordinary derivative where |y − ȳ| < 1e-6; Captum switches at 1e-10), and every ``nn.MaxPool2d`` uses
    DeepLIFT's max-pool rule as Captum's ``deep_lift.maxpool`` writes it, with overlapping pooling windows summed
    (Captum's ``max_unpool2d`` keeps one, which breaks summation-to-delta on ResNet's 3×3/stride-2 stem pool) and
    the full-batch ordinary gradient where Δx ≈ 0 (Captum uses row 0's, captum#1276). Captum 0.9 itself loses
    its max-pool rule when a ReLU feeds the pool (its map is then the one with plain max-pool gradients, not
    summation-to-delta), so on ResNet/VGG our maps differ from Captum's output by design; they equal Captum's
    where its rule does act and satisfy Σ map = f(x) − f(x̄) (tests/test_ig_deeplift.py). Linear layers, BatchNorm, average
    pooling and residual additions keep their gradient (they are affine). One backward pass per target column.
    A black baseline is black in pixel space, then normalised. Unlike Captum, no distinct non-inplace ReLU
    modules are needed: the rule is applied per activation call.
    """

    name = "deeplift"

    def _attribute(self, images: Tensor, targets: Tensor, *, baseline: str | Tensor = "black", seed: int = 0,
                   return_delta: bool = False) -> Attribution:
        model = self.spec.module
        b, t = targets.shape
        base = reference_images(self.spec, baseline, images, seed).expand_as(images)
        leaf = images.detach().clone().requires_grad_(True)
        with activation_rule(model, "secant"):
            logits = model(torch.cat([leaf, base]))
        check_target_range(targets, logits.shape[1], self.name)
        scores, ref_scores = logits[:b], logits[b:]
        diff = images - base
        maps = []
        for m in range(t):
            (grad,) = torch.autograd.grad(scores.gather(1, targets[:, m:m + 1]).sum(), leaf,
                                          retain_graph=m < t - 1)
            maps.append((grad * diff).sum(dim=1))
        maps_t = torch.stack(maps, dim=1).detach()
        extras = {}
        if return_delta:
            extras["delta"] = (maps_t.sum(dim=(2, 3))
                               - (scores.gather(1, targets) - ref_scores.gather(1, targets))).detach()
        return Attribution(maps_t, extras)

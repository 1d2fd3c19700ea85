"""FullGrad (Srinivas & Fleuret, "Full-Gradient Representation for Neural Network Visualization", NeurIPS 2019).

Map for class c (the paper's FullGrad saliency map, as in the authors' code, idiap/fullgrad-saliency
``FullGrad.saliency``):

    S_c = ψ(∇_x f_c ⊙ x) + Σ_l Σ_channels ψ(∇_{z_l} f_c ⊙ b_l)

summed over colour channels / feature channels after ψ, with ψ = bilinear upsampling ∘ min-max rescaling ∘ |·|.

Decisions, where the paper and the two reference implementations leave room:

* Bias units come from :func:`attribution.hooks.bias_units` through :class:`Backprop` (plain gradients): every
  conv/BatchNorm with a bias, eval-mode BatchNorm *folded* into the conv that feeds it, so a conv+BN pair is one
  unit with effective bias b_eff = b_conv·s + t and gradient taken at the BN output. The reference code (and
  pytorch-grad-cam) hook conv and BN separately and take |b_conv·g_conv| and |t·g_bn| as two terms. For the
  usual conv-without-bias + BN (torchvision ResNets/VGG-BN, EfficientNet) both are the same unit; with a biased
  conv feeding a BN ours is |(b_conv·s + t)·g| (the sum before the absolute value) instead of the sum of two.
* Only spatial units (conv / BatchNorm2d, 4-D outputs) are used; linear-layer biases are left out, as in the
  reference code ("Select only Conv layers") — their bias-gradient has no spatial layout.
* ``scaling="layer"`` (default, the reference code's ``_postProcess``): |·| then min-max over *all* channels and
  positions of one image's layer tensor, ``(x − min) / (max + eps)`` with the min subtracted first, eps = 1e-6.
  ``scaling="channel"``: min-max of each channel map separately (pytorch-grad-cam's ``FullGrad``, which uses
  ``scale_accross_batch_and_channels``, eps 1e-7); the input term is then scaled per colour channel too.
  Because scaling comes before the (linear) upsampling and channel sum, channels are summed at the layer's
  resolution and each resolution is upsampled once.
* Upsampling is bilinear with align_corners=False (the project's :func:`upsample`, = OpenCV as used by
  pytorch-grad-cam); the authors' code uses align_corners=True (differences only near borders, < 1 px).
* No final normalisation (the authors' ``saliency`` returns the raw sum; pytorch-grad-cam min-max scales the sum
  per image at the end: apply that yourself for display).
* The input term uses the normalised image x that the model sees, as in both references.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.hooks import BiasUnit
from attribution.maps import upsample
from attribution.methods.backprop import Backprop
from attribution.methods.base import Attribution, Method

SCALINGS = ("layer", "channel")


def rescale(x: Tensor, scaling: str, eps: float) -> Tensor:
    """|x| min-max rescaled per image over [C, H, W] (``"layer"``) or per image and channel (``"channel"``)."""
    x = x.abs()
    dims = (1, 2, 3) if scaling == "layer" else (2, 3)
    x = x - x.amin(dim=dims, keepdim=True)
    return x / (x.amax(dim=dims, keepdim=True) + eps)


class FullGrad(Method):
    """FullGrad maps [B(, T), H, W] (non-negative); see the module docstring for the choices made.

    Options: ``scaling`` ("layer" as the paper's code, or "channel" as pytorch-grad-cam), ``eps`` (1e-6, the
    paper's code; pytorch-grad-cam uses 1e-7), ``return_layers`` (extras ``layers``: ``input`` [B(, T), H, W]
    and ``bias`` [B(, T), H, W], the two parts of the sum).
    """

    name = "fullgrad"
    predicts_targets = True

    def _attribute(self, images: Tensor, targets: Tensor, *, scaling: str = "layer", eps: float = 1e-6,
                   return_layers: bool = False) -> Attribution:
        if scaling not in SCALINGS:
            raise AttributionError(f"fullgrad: unknown scaling {scaling!r}; use one of {', '.join(SCALINGS)}")
        # resolution -> summed rescaled bias-gradient maps of the current backward pass, [B, h, w]
        current: dict[tuple[int, int], Tensor] = defaultdict(lambda: 0.0)

        def record(unit: BiasUnit, grad: Tensor) -> None:
            if grad.dim() != 4:  # linear units: left out (reference code)
                return
            term = rescale(grad * unit.bias.to(grad.dtype).view(1, -1, 1, 1), scaling, eps).sum(dim=1)
            current[tuple(term.shape[-2:])] = current[tuple(term.shape[-2:])] + term.detach()

        backprop = Backprop(self.spec.module, images, rule=None, on_unit=record)
        size = images.shape[-2:]
        x = images.detach()
        inputs, biases = [], []
        for grad in backprop.input_gradients(targets, self.name):
            inputs.append(rescale(grad * x, scaling, eps).sum(dim=1))
            biases.append(sum((upsample(m, size) for m in current.values()), torch.zeros_like(inputs[-1])))
            current.clear()
        input_part, bias_part = torch.stack(inputs, dim=1), torch.stack(biases, dim=1)
        extras = {"layers": {"input": input_part, "bias": bias_part}} if return_layers else {}
        return Attribution((input_part + bias_part).detach(), extras)

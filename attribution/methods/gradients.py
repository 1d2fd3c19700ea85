"""Plain input-gradient methods: Saliency (Simonyan et al. 2014) and Guided Backprop (Springenberg et al. 2015)."""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.methods.backprop import Backprop
from attribution.methods.base import Attribution, Method


class Saliency(Method):
    """|d f_k / d x|, max over colour channels (Captum ``Saliency(abs=True)`` reduced by max over dim 1)."""

    name = "saliency"
    predicts_targets = True

    def _attribute(self, images: Tensor, targets: Tensor) -> Attribution:
        backprop = Backprop(self.spec.module, images)
        maps = [g.abs().amax(dim=1) for g in backprop.input_gradients(targets, self.name)]
        return Attribution(torch.stack(maps, dim=1))


class GuidedBackprop(Method):
    """Guided backprop: at every ReLU (ReLU6) grad_in = relu(grad_out)·1[0 < x (< 6)]; the input gradient summed
    over colour channels (signed; Captum ``GuidedBackprop`` summed over dim 1). Also TR-GBP's R_0."""

    name = "gbp"
    predicts_targets = True

    def _attribute(self, images: Tensor, targets: Tensor) -> Attribution:
        backprop = Backprop(self.spec.module, images, rule="guided")
        maps = [g.sum(dim=1) for g in backprop.input_gradients(targets, self.name)]
        return Attribution(torch.stack(maps, dim=1))

"""Grad-CAM (Selvaraju et al. 2017)."""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.hooks import capture_outputs
from attribution.maps import upsample
from attribution.methods.base import Attribution, Method, check_target_range
from attribution.methods.targets import resolve_targets


class GradCAM(Method):
    """Grad-CAM at the spec's target layer: w_k = spatial mean of d f_c / d A_k, map = relu(Σ_k w_k A_k),
    bilinearly upsampled (align_corners=False) to the input size. Equals Captum ``LayerGradCam`` +
    ``LayerAttribution.interpolate(…, "bilinear")`` and pytorch-grad-cam's ``GradCAM`` before its min-max scaling.
    Extras: ``cam`` [B, T, h, w], the map at the layer's resolution."""

    name = "gradcam"
    predicts_targets = True

    def _attribute(self, images: Tensor, targets: Tensor) -> Attribution:
        layer = self.spec.target_layer
        if layer is None:
            raise AttributionError(f"gradcam: model {self.spec.name} has no conv layer to use as target layer")
        x = images.detach().requires_grad_(True)
        with capture_outputs([layer]) as captured:
            logits = self.spec.module(x)
        if len(captured[0]) != 1:
            raise AttributionError(f"gradcam: target layer of {self.spec.name} ran {len(captured[0])} times "
                                   "in one forward pass; choose a layer that runs once")
        activations = captured[0][0]
        if activations.dim() != 4:
            raise AttributionError(f"gradcam: target layer output must be [B, C, h, w] feature maps, "
                                   f"got {tuple(activations.shape)}")
        targets = resolve_targets(targets, logits)
        check_target_range(targets, logits.shape[1], self.name)
        cams = []
        for m in range(targets.shape[1]):
            score = logits.gather(1, targets[:, m:m + 1]).sum()
            (grad,) = torch.autograd.grad(score, activations, retain_graph=m < targets.shape[1] - 1)
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cams.append(torch.relu((weights * activations).sum(dim=1)).detach())
        cam = torch.stack(cams, dim=1)
        return Attribution(upsample(cam, images.shape[-2:]), {"cam": cam})

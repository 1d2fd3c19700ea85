"""The compute floor of each method: the passes a gradient method cannot avoid, in plain autograd.

One forward and one input-gradient backward per class column (saliency, gbp, gradcam and every baseline, for
which ours/floor is the cost in units of one gradient pass), one backward per top-5 class (+1 per target column
outside the top 5) for tr_gbp, and for a_fmi one no-grad forward of the features over the batch plus the
reference image, then the head forward (paired batch) and one backward to the feature maps per column.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attribution import models
from bench.inputs import TOP_K


def floor_passes(method: str, spec: models.ModelSpec, images: Tensor, targets: Tensor) -> tuple[Callable, str]:
    """The unavoidable passes of ``method`` on ``images`` [B, C, H, W] / ``targets`` [B] in plain autograd:
    (a call running them, returning None; a description such as ``"1 fwd + 5 input-grad bwd"``)."""
    columns = targets[:, None]
    if method == "tr_gbp":
        with torch.no_grad():
            top = spec.module(images).topk(TOP_K, dim=1).indices
        extra = [] if bool((top == targets[:, None]).any(1).all()) else [targets[:, None]]
        columns = torch.cat([top, *extra], dim=1)
    if method == "a_fmi":
        from attribution.methods.a_fmi import reference_images
        ref = reference_images(spec, "black", images)

        def head_floor() -> None:
            with torch.no_grad():
                both = spec.features(torch.cat([images, ref]))
            b = images.shape[0]
            leaf = both[:b].clone().requires_grad_(True)
            logits = spec.head(torch.cat([leaf, both[b:].expand_as(leaf)]))[:b]
            for m in range(columns.shape[1]):
                torch.autograd.grad(logits.gather(1, columns[:, m:m + 1]).sum(), leaf,
                                    retain_graph=m < columns.shape[1] - 1)

        return head_floor, "features fwd (B+1, no grad) + head fwd (2B) + 1 head bwd"

    def backprop_floor() -> None:
        x = images.detach().requires_grad_(True)
        logits = spec.module(x)
        for m in range(columns.shape[1]):
            torch.autograd.grad(logits.gather(1, columns[:, m:m + 1]).sum(), x, retain_graph=m < columns.shape[1] - 1)

    return backprop_floor, f"1 fwd + {columns.shape[1]} input-grad bwd"

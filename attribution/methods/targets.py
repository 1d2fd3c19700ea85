"""Targets decided by the model's own forward pass: the top-k classes, taken from the method's forward where the
method has one on the very images it explains, so a pipeline that needs the top-k does not run the model twice.

    top = TopKTargets(columns=5)                      # explain the top-5 classes of each image
    maps = attribute("tr_gbp", spec, images, top)     # [B, 5, H, W]
    top.classes, top.top5, top.top5_prob              # [B, 5] each, filled by the call

A method whose class sets ``predicts_targets = True`` resolves the object from the logits of its own forward
pass (same images, same precision; its rules change only the backward pass); for every other method
``Method.attribute`` runs one plain forward first. Either way the result is the same top-k.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.errors import AttributionError


class TopKTargets:
    """The model's top ``columns`` classes per image as targets [B, columns], and what its forward pass said.

    Before a call: unresolved. After :meth:`resolve` (done by the method, once): ``classes`` LongTensor [B, T]
    (T = min(columns, K)), ``top5`` LongTensor [B, k] and ``top5_prob`` float32 [B, k] (softmax probabilities,
    k = min(5, K); ``num_classes`` = K), all on the logits' device. Softmax and top-k run in float32 whatever
    the forward's precision.
    """

    def __init__(self, columns: int = 1) -> None:
        if columns < 1:
            raise AttributionError(f"top-k targets need at least one column, got {columns}")
        self.columns = columns
        self.classes: Tensor | None = None
        self.top5: Tensor | None = None
        self.top5_prob: Tensor | None = None
        self.num_classes: int | None = None

    @property
    def resolved(self) -> bool:
        """Whether a forward pass has decided the classes."""
        return self.classes is not None

    def resolve(self, logits: Tensor) -> Tensor:
        """Fill the fields from ``logits`` [B, K] (any float dtype; detached here) and return ``classes`` [B, T]."""
        probs = logits.detach().float().softmax(dim=1)
        self.num_classes = probs.shape[1]
        k = max(self.columns, min(5, probs.shape[1]))
        prob, top = probs.topk(min(k, probs.shape[1]), dim=1)
        self.top5, self.top5_prob = top[:, :5], prob[:, :5]
        self.classes = top[:, :self.columns]
        return self.classes


def resolve_targets(targets: Tensor | TopKTargets, logits: Tensor) -> Tensor:
    """``targets`` as class indices [B, T]: a tensor as it is, a :class:`TopKTargets` resolved from ``logits``
    [B, K] (the method's own forward pass on the images it explains)."""
    if isinstance(targets, TopKTargets):
        return targets.classes if targets.resolved else targets.resolve(logits)
    return targets


def plain_forward_targets(module: torch.nn.Module, images: Tensor, targets: TopKTargets) -> Tensor:
    """Resolve ``targets`` with one plain no-grad forward of ``module`` on ``images`` [B, C, H, W]."""
    with torch.no_grad():
        return targets.resolve(module(images))


__all__ = ["TopKTargets", "plain_forward_targets", "resolve_targets"]

"""One forward pass, one backward pass per class column: the engine of the gradient-based methods."""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from attribution.hooks import BiasUnit, activation_rule, bias_units
from attribution.methods.base import check_target_range
from attribution.methods.targets import TopKTargets, resolve_targets


class Backprop:
    """Run ``model`` once on ``images`` (rules applied), then backpropagate one class column at a time.

    ``rule``: None (plain gradients) or "guided". ``on_unit(unit, grad)``: when given, the biased affine units
    are recorded (``units``) and the callback gets the gradient at each unit's output during every backward
    pass (TR-GBP); ``fold_batchnorm`` is passed to :func:`attribution.hooks.bias_units`. After construction,
    ``logits`` [B, K] are available; :meth:`input_gradients` yields, per class column [B], the gradient w.r.t.
    the images [B, C, H, W].
    """

    def __init__(self, model: nn.Module, images: Tensor, rule: str | None = None,
                 on_unit: Callable[[BiasUnit, Tensor], None] | None = None, fold_batchnorm: bool = True) -> None:
        self.images = images.detach().requires_grad_(True)
        self.units: list[BiasUnit] = []
        with ExitStack() as stack:
            if rule is not None:
                stack.enter_context(activation_rule(model, rule))
            if on_unit is not None:
                self.units = stack.enter_context(bias_units(model, on_unit, fold_batchnorm=fold_batchnorm))
            self.logits = model(self.images)
        if self.logits.dim() != 2:
            raise ValueError(f"model output must be logits [B, K], got {tuple(self.logits.shape)}")

    def input_gradients(self, classes: Tensor | TopKTargets, method: str) -> Iterator[Tensor]:
        """Yield d logit[b, classes[b, m]] / d images for m = 0..M-1, each [B, C, H, W] (an unresolved
        TopKTargets is resolved from this forward pass's logits)."""
        classes = resolve_targets(classes, self.logits)
        check_target_range(classes, self.logits.shape[1], method)
        columns = classes.shape[1]
        for m in range(columns):
            score = self.logits.gather(1, classes[:, m:m + 1]).sum()
            (grad,) = torch.autograd.grad(score, self.images, retain_graph=m < columns - 1)
            yield grad

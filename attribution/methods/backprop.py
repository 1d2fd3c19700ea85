"""One forward pass, one backward pass per class column: the engine of the gradient-based methods."""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from attribution.hooks import BiasUnit, activation_rule, bias_units, on_gradient
from attribution.methods.base import check_target_range


class Backprop:
    """Run ``model`` once on ``images`` (rules applied), then backpropagate one class column at a time.

    ``rule``: None (plain gradients) or "guided". ``with_bias_units``: also record the biased affine units
    (TR-GBP). After construction, ``logits`` [B, K] are available; :meth:`input_gradients` yields, per class
    column [B], the gradient w.r.t. the images [B, C, H, W].
    """

    def __init__(self, model: nn.Module, images: Tensor, rule: str | None = None,
                 with_bias_units: bool = False) -> None:
        self.images = images.detach().requires_grad_(True)
        self.units: list[BiasUnit] = []
        with ExitStack() as stack:
            if rule is not None:
                stack.enter_context(activation_rule(model, rule))
            if with_bias_units:
                self.units = stack.enter_context(bias_units(model))
            self.logits = model(self.images)
        if self.logits.dim() != 2:
            raise ValueError(f"model output must be logits [B, K], got {tuple(self.logits.shape)}")

    def input_gradients(self, classes: Tensor, method: str,
                        on_unit: Callable[[int, Tensor], None] | None = None) -> Iterator[Tensor]:
        """Yield d logit[b, classes[b, m]] / d images for m = 0..M-1, each [B, C, H, W].

        ``on_unit(i, grad)`` is called during each backward pass with the gradient at ``self.units[i]``'s output.
        """
        check_target_range(classes, self.logits.shape[1], method)
        if on_unit is not None:
            for i, unit in enumerate(self.units):
                on_gradient(unit.output, lambda g, i=i: on_unit(i, g))
        columns = classes.shape[1]
        for m in range(columns):
            score = self.logits.gather(1, classes[:, m:m + 1]).sum()
            (grad,) = torch.autograd.grad(score, self.images, retain_graph=m < columns - 1)
            yield grad

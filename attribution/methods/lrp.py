"""LRP-ε (Bach et al. 2015) as zennit's ``Epsilon`` composite with a BatchNorm-merging canonizer."""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.hooks import lrp_epsilon
from attribution.methods.base import Attribution, Method, check_target_range


class LRPEpsilon(Method):
    """LRP-ε relevance maps [B(, T), H, W]: signed, float32, the input relevance **summed over colour channels**.

    Options: ``epsilon`` (1e-6, zennit's ``Epsilon`` default; also the stabiliser of the Norm rule at average
    pools and residual sums, zennit's default too).

    Decisions (matching zennit: ``LayerMapComposite(layer_map_base() + [(Convolution, Epsilon()), (Linear, Epsilon())])``
    ``Epsilon`` on Convolution/Linear, with ``ResNetCanonizer``/``VGGCanonizer``/``SequentialMergeBatchNorm``):
    every Conv2d/Linear gets the ε rule R_in = x · Wᵀ(R_out / (z + ε·sign z)), z = Wx + b including the bias
    (which absorbs its share), with a BatchNorm that consumes the layer's output folded in (z is then the
    BatchNorm output); activations pass relevance unchanged; average pools and residual sums use zennit's Norm
    rule; max-pooling passes relevance to the argmax (its gradient); dropout/flatten are identities. The top
    relevance is the target logit (R = f_k(x) at the output, i.e. zennit seeded with one-hot × logit), so with
    ε → 0 and zero biases the map sums to f_k(x). Implemented in gradient × input form by
    :func:`attribution.hooks.lrp_epsilon` (one forward pass, one backward pass per target column, no copy of
    the model and no parameter change: folding only moves the stabiliser to the BatchNorm output). The first
    layer uses the ε rule too (no z^B / flat rule), as zennit's plain Epsilon composite.
    """

    name = "lrp"

    def _attribute(self, images: Tensor, targets: Tensor, *, epsilon: float = 1e-6) -> Attribution:
        if not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise AttributionError(f"lrp: epsilon must be a positive number (LRP-0 divides by zero), got {epsilon!r}")
        model = self.spec.module
        leaf = images.detach().clone().requires_grad_(True)
        with lrp_epsilon(model, float(epsilon)):
            logits = model(leaf)
        check_target_range(targets, logits.shape[1], self.name)
        maps = []
        t = targets.shape[1]
        for m in range(t):
            (grad,) = torch.autograd.grad(logits.gather(1, targets[:, m:m + 1]).sum(), leaf,
                                          retain_graph=m < t - 1)
            maps.append((grad * leaf.detach()).sum(dim=1))
        return Attribution(torch.stack(maps, dim=1).detach())

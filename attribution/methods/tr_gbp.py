"""TR-GBP: Theoretical Refinements of Guided BackPropagation (TR-GBP paper §4.1, eqs. 8-10).

Decisions, where the paper's text is open:

* Bias terms (eq. 8): eval-mode BatchNorm is folded into the conv/linear that feeds it, giving the effective
  bias b. The bias is an extra input map of ones at the layer's *input* resolution, with b spread evenly over
  the kh·kw taps of each patch; so R_l = d^g f / d 1_l is the transposed convolution of the guided gradient at
  the unit's output with a one-channel kernel of taps b_i/(kh·kw) (groups = 1, also for depthwise layers).
  Border positions take part in fewer patches and come out weaker; this is kept (paper §4.2). A linear unit's
  ones-input is its whole input vector: R_l = Σ_i g_i b_i, a scalar that upsamples to a constant map. A
  BatchNorm not fed by a conv/linear is a 1x1 unit at its own resolution.
* Aggregation (eq. 9): R^k = R^k_0 + Σ_l bilinear_upsample(R^k_l), R_0 being the guided input gradient summed
  over colour channels (exactly the ``gbp`` map).
* Class-shared part (eq. 10): R~^k = R^k − mean over the top-``top_k`` predicted classes of R^i, also when k is
  not one of them. The top-k maps come from ``top_k`` backward passes over one forward pass; a target that is
  among its image's top-k classes reuses that pass. Applied to the per-layer maps too (the operation is linear).
* ``relu=True`` shows relu(R~^k), as in the paper's figures.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from attribution.hooks import BiasUnit
from attribution.maps import upsample
from attribution.methods.backprop import Backprop
from attribution.methods.base import Attribution, Method


def bias_reconstruction(unit: BiasUnit, grad: Tensor) -> Tensor:
    """R_l of one unit: d f / d 1_l summed over the ones-input's channels.

    ``grad``: the guided gradient at the unit's output, [B, C, H', W'] (conv/BatchNorm) or [B, C] (linear).
    Returns [B, H, W] at the unit's input resolution for conv units, [B, 1, 1] for linear ones.
    """
    if unit.input_size is None:  # linear: the ones-input is the whole input vector
        return (grad * unit.bias).sum(-1).view(-1, 1, 1)
    kh, kw = unit.kernel
    # Every tap of output channel i carries b_i / (kh·kw): sum the channels first (Σ_i g_i b_i / (kh·kw)), then
    # spread each output position back over its kh x kw input patch with a one-channel transposed convolution.
    per_position = torch.einsum("bchw,c->bhw", grad, (unit.bias / (kh * kw)).to(grad.dtype))
    if unit.kernel == (1, 1) and unit.stride == (1, 1) and unit.padding == (0, 0):
        return per_position
    ones = grad.new_ones(1, 1, kh, kw)
    size = (grad.shape[0], 1, *unit.input_size)
    ones_grad = torch.nn.grad.conv2d_input(size, ones, per_position.unsqueeze(1), stride=unit.stride,
                                           padding=unit.padding, dilation=unit.dilation)
    return ones_grad[:, 0]


class TRGBP(Method):
    """TR-GBP maps [B(, T), H, W]; see the module docstring for the definition and the choices made.

    Options: ``biases`` (add the bias reconstructions, eq. 9), ``remove_shared`` (subtract the top-k class mean,
    eq. 10), ``top_k`` (5), ``relu`` (display relu), ``return_layers`` (extras ``layers``: unit name ->
    [B(, T), h, w] at the unit's input resolution, and ``input`` the R_0 map).
    """

    name = "tr_gbp"

    def _attribute(self, images: Tensor, targets: Tensor, *, biases: bool = True, remove_shared: bool = True,
                   top_k: int = 5, relu: bool = False, return_layers: bool = False) -> Attribution:
        layer_maps: dict[int, list[Tensor]] = defaultdict(list)

        def record(unit: BiasUnit, grad: Tensor) -> None:
            layer_maps[unit.index].append(bias_reconstruction(unit, grad))

        backprop = Backprop(self.spec.module, images, rule="guided", on_unit=record if biases else None)
        names: dict[int, str] = {}
        for unit in backprop.units:  # a module called twice gives two units: "name", "name#2"
            taken = sum(1 for n in names.values() if n == unit.name or n.startswith(unit.name + "#"))
            names[unit.index] = unit.name if not taken else f"{unit.name}#{taken + 1}"
        top_k = min(top_k, backprop.logits.shape[1])
        classes, target_columns = self._classes(backprop.logits.detach(), targets, remove_shared, top_k)
        size = images.shape[-2:]
        inputs, totals = [], []
        for grad in backprop.input_gradients(classes, self.name):
            r0 = grad.sum(dim=1)
            inputs.append(r0)
            totals.append(r0 + _upsampled_sum([maps[-1] for maps in layer_maps.values()], size))
        total = torch.stack(totals, dim=1)  # [B, M, H, W] for the M class columns
        layers = {names[i]: torch.stack(maps, dim=1) for i, maps in layer_maps.items()}
        layers["input"] = torch.stack(inputs, dim=1)

        maps = self._select(total, target_columns, remove_shared, top_k)
        if relu:
            maps = maps.clamp(min=0)
        extras = {}
        if return_layers:
            extras["layers"] = {n: self._select(m, target_columns, remove_shared, top_k) for n, m in layers.items()}
        return Attribution(maps.detach(), _detach(extras))

    @staticmethod
    def _classes(logits: Tensor, targets: Tensor, remove_shared: bool, top_k: int) -> tuple[Tensor, Tensor]:
        """Class columns to backpropagate [B, M] and, per target column, its index among them [B, T]."""
        if not remove_shared:
            return targets, torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
        top = logits.topk(top_k, dim=1).indices  # [B, k]
        columns, where = [top], []
        for t in range(targets.shape[1]):
            match = top == targets[:, t:t + 1]
            if bool(match.any(dim=1).all()):
                where.append(match.float().argmax(dim=1))
            else:
                columns.append(targets[:, t:t + 1])
                where.append(torch.full_like(targets[:, 0], sum(c.shape[1] for c in columns) - 1))
        return torch.cat(columns, dim=1), torch.stack(where, dim=1)

    @staticmethod
    def _select(per_class: Tensor, target_columns: Tensor, remove_shared: bool, top_k: int) -> Tensor:
        """Maps of the target columns [B, T, …] from the per-class maps [B, M, …], minus the top-k mean."""
        index = target_columns.view(*target_columns.shape, *([1] * (per_class.dim() - 2)))
        chosen = per_class.gather(1, index.expand(-1, -1, *per_class.shape[2:]))
        if remove_shared:
            chosen = chosen - per_class[:, :top_k].mean(dim=1, keepdim=True)
        return chosen


def _upsampled_sum(maps: list[Tensor], size: torch.Size) -> Tensor | float:
    """Σ_l bilinear_upsample(maps[l]) to ``size``; maps of equal resolution are added before upsampling
    (upsampling is linear), so a ResNet-50's 50-odd layers cost one upsampling per resolution."""
    by_resolution: dict[tuple[int, int], Tensor] = {}
    for m in maps:
        key = tuple(m.shape[-2:])
        by_resolution[key] = by_resolution[key] + m if key in by_resolution else m
    return sum((upsample(m, size) for m in by_resolution.values()), 0.0)


def _detach(extras: dict) -> dict:
    return {k: _detach(v) if isinstance(v, dict) else v.detach() for k, v in extras.items()}

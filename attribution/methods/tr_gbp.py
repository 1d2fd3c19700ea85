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

Readings (issue 16), all batched and all available with ``return_layers``:

* ``bias_terms``: ``"effective"`` (default; BatchNorm folded as above) | ``"parameter"`` (only the modules' own
  ``.bias`` parameters are ones-inputs: a conv's/linear's bias at that layer's geometry, and BatchNorm's β as a
  1x1 unit at its own resolution; the −γμ/√(σ²+ε) shift is part of the layer's affine map, not a bias; equal to
  "effective" on a network without BatchNorm, such as the paper's VGG16) | ``"none"`` (= ``biases=False``: GBP
  plus the class-mean removal).
* ``layer_norm``: ``"none"`` (default; eq. 9 as written) | ``"max"`` (every term, R_0 included, divided by its
  max |R_l| over the image's top-k class maps and all positions — one divisor per image and term, so the top-k
  removal stays linear and the top-k maps still sum to 0; the top-k maps are computed for the divisor even with
  ``remove_shared=False``, so a target's map never depends on which other targets are asked for).
* ``input_term``: ``"gradient"`` (default; eq. 9's R_0 = ∂^g f/∂x summed over colours) | ``"gradient_x_input"``
  (R_0 = Σ_c x_c · ∂^g f/∂x_c, FullGrad's input term, x the normalised model input).

Choice of the default: ``effective`` / ``none`` / ``gradient`` — eq. 8-10 as written, with a deployed network's
biases (BatchNorm folded). Evidence (``python -m jobs.tr_gbp_readings``, README "TR-GBP readings": top-1 maps of
300 benchmark validation images per model, chance EBPG 0.18; the 7 photos for Lite0, chance 0.48):

- On the small benchmark models trained from scratch every reading with bias terms fails (EBPG 0.08-0.52 against
  GBP's 0.66-0.77, up to 163 of 300 maps without a positive pixel), with or without BatchNorm
  (``bench_vgg_plain``, where ``parameter`` = ``effective``) and with AdamW or the SGD/L2 ImageNet recipe: their
  learned biases make the terms that carry the map negative on the object (bench_vgg's 1/8 term excepted).
  Such models are no stand-in for an ImageNet CNN here.
- On ``bench_lite0`` (EfficientNet-Lite0 fine-tuned from its ImageNet weights; its bias statistics per resolution
  equal the real Lite0's) every term is positive on the object and no map is empty, yet the default scores 0.30
  against GBP's 0.44 (best reading with bias terms: ``parameter/max``, 0.36): smooth blobs wider than the object.
  On the photos the default's 0.705 vs GBP's 0.526 comes from large boxes (chance 0.48), not sharp maps.
- So no reading reproduces the paper's EBPG (Table 1); none is better on every model, and none is picked per
  model or metric. ``layer_norm="max"`` never helps the default; ``gradient_x_input`` (not eq. 9) helps only
  where the bias terms are negative on the object. The failure is reported as a finding, not tuned away.
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
from attribution.methods.targets import resolve_targets

BIAS_TERMS = ("effective", "parameter", "none")
LAYER_NORMS = ("none", "max")
INPUT_TERMS = ("gradient", "gradient_x_input")


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
    """TR-GBP maps [B(, T), H, W]; see the module docstring for the definition, the readings and the choices made.

    Options: ``bias_terms`` ("effective" | "parameter" | "none", see the module docstring), ``layer_norm``
    ("none" | "max"), ``input_term`` ("gradient" | "gradient_x_input"), ``biases`` (False is the older spelling
    of ``bias_terms="none"``), ``remove_shared`` (subtract the top-k class mean, eq. 10), ``top_k`` (5),
    ``relu`` (display relu), ``return_layers`` (extras ``layers``: unit name -> [B(, T), h, w] at the unit's
    input resolution, and ``input`` the R_0 map; each as it enters eq. 9, i.e. after ``layer_norm``).
    """

    name = "tr_gbp"
    predicts_targets = True

    def _attribute(self, images: Tensor, targets: Tensor, *, bias_terms: str = "effective",
                   layer_norm: str = "none", input_term: str = "gradient", biases: bool = True,
                   remove_shared: bool = True, top_k: int = 5, relu: bool = False,
                   return_layers: bool = False) -> Attribution:
        bias_terms = _reading(bias_terms, biases, layer_norm, input_term)
        layer_maps: dict[int, list[Tensor]] = defaultdict(list)

        def record(unit: BiasUnit, grad: Tensor) -> None:
            layer_maps[unit.index].append(bias_reconstruction(unit, grad))

        backprop = Backprop(self.spec.module, images, rule="guided",
                            on_unit=None if bias_terms == "none" else record,
                            fold_batchnorm=bias_terms == "effective")
        names: dict[int, str] = {}
        for unit in backprop.units:  # a module called twice gives two units: "name", "name#2"
            taken = sum(1 for n in names.values() if n == unit.name or n.startswith(unit.name + "#"))
            names[unit.index] = unit.name if not taken else f"{unit.name}#{taken + 1}"
        targets = resolve_targets(targets, backprop.logits)
        top_k = min(top_k, backprop.logits.shape[1])
        # layer_norm="max" needs the image's top-k maps for its divisor even when nothing is removed.
        with_top = remove_shared or layer_norm == "max"
        classes, target_columns = self._classes(backprop.logits.detach(), targets, with_top, top_k)
        inputs = []
        for grad in backprop.input_gradients(classes, self.name):
            inputs.append((grad * backprop.images.detach() if input_term == "gradient_x_input" else grad).sum(dim=1))
        layers = {names[i]: torch.stack(maps, dim=1) for i, maps in layer_maps.items()}  # [B, M, h, w]
        layers["input"] = torch.stack(inputs, dim=1)  # [B, M, H, W] for the M class columns
        if layer_norm == "max":
            layers = {n: _max_normalised(m, top_k) for n, m in layers.items()}
        total = layers["input"] + _upsampled_sum([m for n, m in layers.items() if n != "input"], images.shape[-2:])

        maps = self._select(total, target_columns, remove_shared, top_k)
        if relu:
            maps = maps.clamp(min=0)
        extras = {}
        if return_layers:
            extras["layers"] = {n: self._select(m, target_columns, remove_shared, top_k) for n, m in layers.items()}
        return Attribution(maps.detach(), _detach(extras))

    @staticmethod
    def _classes(logits: Tensor, targets: Tensor, with_top: bool, top_k: int) -> tuple[Tensor, Tensor]:
        """Class columns to backpropagate [B, M] (the top-k first when ``with_top``) and, per target column, its
        index among them [B, T]."""
        if not with_top:
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


def _reading(bias_terms: str, biases: bool, layer_norm: str, input_term: str) -> str:
    """Validate the reading options; returns ``bias_terms`` with ``biases=False`` mapped to "none"."""
    for option, value, allowed in (("bias_terms", bias_terms, BIAS_TERMS), ("layer_norm", layer_norm, LAYER_NORMS),
                                   ("input_term", input_term, INPUT_TERMS)):
        if value not in allowed:
            raise AttributionError(f"tr_gbp: unknown {option}={value!r}; expected one of {', '.join(allowed)}")
    if not biases:
        if bias_terms == "parameter":
            raise AttributionError("tr_gbp: biases=False contradicts bias_terms='parameter'")
        return "none"
    return bias_terms


def _max_normalised(per_class: Tensor, top_k: int) -> Tensor:
    """``per_class`` [B, M, h, w] divided, per image, by max |·| over its first ``top_k`` class columns (the top-k
    classes) and all positions; one divisor per image, so the top-k mean removal stays linear. An all-zero term
    stays zero."""
    scale = per_class[:, :top_k].abs().amax(dim=(1, 2, 3), keepdim=True)
    return per_class / torch.where(scale > 0, scale, torch.ones_like(scale))

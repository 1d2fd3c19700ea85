"""The one place where attribution code attaches itself to a model: every hook lives here, every hook is removed.

Four mechanisms, each a context manager that registers module hooks on entry and removes them in ``finally``
(so also when the forward or backward raises):

* :func:`activation_rule` swaps the backward rule of every activation *call*: ``"guided"`` (guided backprop,
  grad_in = relu(grad_out) · 1[lower < x < upper]) or ``"secant"`` (A-FMI / DeepLIFT-rescale: the derivative is
  replaced by (σ(y) − σ(ȳ)) / (y − ȳ) between the input half and the reference half of a paired batch).
  Rules are applied per call, so torchvision's ResNet blocks, which call one ``ReLU`` module up to three times,
  get the rule at each call site. "secant" also covers ``nn.MaxPool2d`` (DeepLIFT's max-pool rule, as in Captum's
  DeepLift: Δy is split into the part the input's own maximum explains and the part the reference's maximum
  explains; each goes to its argmax position and is divided by that position's Δx). In-place activations are
  handled by giving the module a private copy of its input (a forward pre-hook), so the caller's tensors and
  module flags are never touched.
* :func:`capture_outputs` records the outputs of chosen modules, as differentiable tensors that later in-place
  operations (``out += identity``, ``ReLU(inplace=True)``) cannot alter.
* :func:`lrp_epsilon` turns backpropagation into LRP-ε (zennit's Epsilon rule on every conv/linear, BatchNorm
  folded, pass rule at activations, Norm rule at average pools and residual sums), in gradient × input form.
* :func:`bias_units` records, in forward order, every affine unit with a bias — conv (+ the BatchNorm that
  consumes its output, folded), linear, or a BatchNorm on its own — with its effective bias and geometry;
  TR-GBP attributes to those biases.

Activations must be modules (``nn.ReLU``, ``nn.ReLU6`` …) for rules to apply: a functional ``F.relu`` inside a
``forward`` is invisible to hooks, as in Captum and zennit.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribution.errors import AttributionError

# Activations whose guided rule is defined: module type -> (lower, upper) of the pass-through interval.
GUIDED_INTERVALS: dict[type, tuple[float, float]] = {nn.ReLU: (0.0, math.inf), nn.ReLU6: (0.0, 6.0)}
# Element-wise activations the secant rule handles (any element-wise function works; these are the ones we see).
ELEMENTWISE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                           nn.Hardswish, nn.Hardtanh, nn.Softplus)
SECANT_MIN_STEP = 1e-6  # |y − ȳ| below this: use the ordinary derivative (the secant's limit)


class _GuidedActivation(torch.autograd.Function):
    """Forward: clamp(x, lower, upper). Backward: relu(grad) where lower < x < upper, else 0."""

    @staticmethod
    def forward(ctx, x: Tensor, lower: float, upper: float) -> Tensor:  # type: ignore[override]
        passing = x > lower
        if not math.isinf(upper):
            passing &= x < upper
        ctx.save_for_backward(passing)  # one byte per element
        return x.clamp(min=lower, max=None if math.isinf(upper) else upper)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (passing,) = ctx.saved_tensors
        return grad.clamp(min=0).mul_(passing), None, None


class _SecantActivation(torch.autograd.Function):
    """Paired batch [input half; reference half]. Backward of the input half: secant slope to the reference."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        y = fn(x)
        half = x.shape[0] // 2
        z, z_ref = x[:half], x[half:]
        derivative = _derivative(fn, x)
        step = z - z_ref
        secant = (y[:half] - y[half:]) / torch.where(step.abs() < SECANT_MIN_STEP, torch.ones_like(step), step)
        slope_in = torch.where(step.abs() < SECANT_MIN_STEP, derivative[:half], secant)
        ctx.save_for_backward(torch.cat([slope_in, derivative[half:]]))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, None


class _PassActivation(torch.autograd.Function):
    """LRP's pass rule (relevance crosses the activation unchanged) in gradient × input form: R = x·g, so the
    backward slope is σ(x)/x, or σ(x)/(x + ε·sign x) when the input is a residual sum (zennit's Norm rule for
    ``Sum``); the ordinary derivative where the denominator is tiny. For ReLU, σ(x)/x is the ordinary derivative."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor], epsilon: float) -> Tensor:  # type: ignore[override]
        y = fn(x)
        denom = _stabilise(x, epsilon) if epsilon > 0 else x
        tiny = denom.abs() < SECANT_MIN_STEP
        slope = torch.where(tiny, _derivative(fn, x), y / torch.where(tiny, torch.ones_like(denom), denom))
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


class _SecantMaxPool(torch.autograd.Function):
    """DeepLIFT's max-pool rule on a paired batch [inputs; references] (Captum ``deep_lift.maxpool``).

    With m = max(y, ȳ): the input half's multiplier at position i is
    (Σ_{windows whose input argmax is i} g·(m − ȳ) + Σ_{windows whose reference argmax is i} g·(y − m)) / Δx_i,
    the ordinary gradient where |Δx_i| < SECANT_MIN_STEP. Overlapping windows add up (Captum's ``max_unpool2d``
    keeps only one of them: a difference on overlapping pools such as ResNet's stem). The reference half gets
    its ordinary gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, pool: nn.MaxPool2d) -> Tensor:  # type: ignore[override]
        y, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                              return_indices=True)
        half = x.shape[0] // 2
        ctx.save_for_backward(x[:half] - x[half:], y, idx)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        step, y, idx = ctx.saved_tensors
        half = step.shape[0]
        ordinary = _unpool(grad, idx, ctx.input_shape)
        g = grad[:half]
        y_in, y_ref = y[:half], y[half:]
        top = torch.maximum(y_in, y_ref)
        contributions = (_unpool(g * (top - y_ref), idx[:half], step.shape)
                         + _unpool(g * (y_in - top), idx[half:], step.shape))
        tiny = step.abs() < SECANT_MIN_STEP
        slope_in = torch.where(tiny, ordinary[:half], contributions / torch.where(tiny, torch.ones_like(step), step))
        return torch.cat([slope_in, ordinary[half:]]), None


def _unpool(values: Tensor, indices: Tensor, shape: torch.Size) -> Tensor:
    """Scatter-add ``values`` [N, C, h, w] to the flat per-plane ``indices`` of max_pool2d: [N, C, *shape[2:]]."""
    out = values.new_zeros(values.shape[0], values.shape[1], shape[2] * shape[3])
    out.scatter_add_(2, indices.flatten(2), values.flatten(2))
    return out.view(values.shape[0], values.shape[1], shape[2], shape[3])


def _stabilise(z: Tensor, epsilon: float) -> Tensor:
    """z + ε·sign(z), with sign(0) = +1 (zennit's ``stabilize``)."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _derivative(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Element-wise derivative of an element-wise function at x (same shape as x)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return d


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name or type(model).__name__
    return type(target).__name__


@contextmanager
def activation_rule(model: nn.Module, rule: str) -> Iterator[None]:
    """Within the block, every activation call in ``model`` backpropagates by ``rule`` ("guided" or "secant").

    "secant" expects every activation (and every ``nn.MaxPool2d``, which gets DeepLIFT's max-pool rule) to see a
    paired batch of even size [2B, …]: rows :B the inputs, rows B: their references. Raises AttributionError for
    an activation the rule does not define.
    """
    if rule not in ("guided", "secant"):
        raise AttributionError(f"unknown activation rule {rule!r}: expected 'guided' or 'secant'")
    handles = []
    try:
        for module in model.modules():
            if rule == "guided" and isinstance(module, ELEMENTWISE_ACTIVATIONS):
                if type(module) not in GUIDED_INTERVALS:
                    raise AttributionError(f"guided backprop has no rule for {type(module).__name__} at "
                                           f"'{_module_path(model, module)}' (only ReLU and ReLU6)")
            if isinstance(module, ELEMENTWISE_ACTIVATIONS):
                handles += _attach_rule(module, rule)
            elif rule == "secant" and isinstance(module, nn.MaxPool2d):
                handles.append(module.register_forward_hook(_secant_maxpool))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _secant_maxpool(module: nn.MaxPool2d, args: tuple, out: Tensor) -> Tensor:
    if module.return_indices:
        raise AttributionError("the secant rule cannot handle MaxPool2d(return_indices=True)")
    if args[0].shape[0] % 2:
        raise AttributionError("the secant rule needs a paired batch [inputs; references] of even size")
    return _SecantMaxPool.apply(args[0], module)


def _attach_rule(module: nn.Module, rule: str, pass_epsilon: Callable[[Tensor], float] | None = None) -> list:
    stash: list[Tensor] = []

    def keep_input(_module: nn.Module, args: tuple) -> tuple:
        stash.append(args[0])
        # The module itself gets an empty tensor: it computes nothing and cannot write in place into the
        # caller's tensor; the rule below computes the real output from the stashed input.
        return (args[0].new_empty(0),) + tuple(args[1:])

    def apply_rule(_module: nn.Module, _args: tuple, _out: Tensor) -> Tensor:
        x = stash.pop()
        if rule == "guided":
            lower, upper = GUIDED_INTERVALS[type(module)]
            return _GuidedActivation.apply(x, lower, upper)
        if rule == "pass":
            return _PassActivation.apply(x, _non_inplace(module), pass_epsilon(x) if pass_epsilon else 0.0)
        if x.shape[0] % 2:
            raise AttributionError("the secant rule needs a paired batch [inputs; references] of even size")
        return _SecantActivation.apply(x, _non_inplace(module))

    return [module.register_forward_pre_hook(keep_input), module.register_forward_hook(apply_rule)]


def _non_inplace(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The module's function, bypassing its hooks (``forward``, not ``__call__``) and never in place."""
    if getattr(module, "inplace", False):
        return lambda t: module.forward(t.clone())
    return module.forward


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[list[Tensor]]]:
    """Record each module's output at every call: ``captured[i]`` lists the outputs of ``modules[i]`` in call order.

    The recorded tensor stays in the autograd graph (gradients w.r.t. it can be taken) and is protected from
    later in-place operations: the module hands a copy to the rest of the network.
    """
    captured: list[list[Tensor]] = [[] for _ in modules]
    handles = []

    def recorder(slot: list[Tensor]):
        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
            slot.append(out)
            return out.clone()
        return hook

    try:
        for module, slot in zip(modules, captured):
            handles.append(module.register_forward_hook(recorder(slot)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def lrp_epsilon(model: nn.Module, epsilon: float = 1e-6) -> Iterator[None]:
    """Within the block, the gradient of an output w.r.t. the input, times the input, is LRP-ε relevance.

    zennit's ``Epsilon`` composite in gradient × input form (R = x·g at every tensor): each conv/linear unit —
    with the BatchNorm that consumes its output folded in, so the stabiliser sits on the BatchNorm's output —
    multiplies the gradient at its output z by z / (z + ε·sign z); average pools do the same with their output
    (zennit's Norm rule); activations pass relevance unchanged (slope σ(x)/x, the ordinary derivative for ReLU);
    an activation whose input is not an untouched unit output (a residual sum such as ``out += identity``) also
    stabilises that sum (zennit's canonizer ``Sum`` with the Norm rule). Max-pooling keeps its gradient (zennit
    gives it no rule). Folding needs no parameter copy: BatchNorm's own gradient is the folded layer's.
    Raises AttributionError for a BatchNorm that does not follow a conv/linear (nothing to fold it into).
    """
    stabilised: dict[int, tuple[Tensor, int, dict]] = {}  # id(output) -> (output, its version, factor switch)
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def stabilise_output(out: Tensor) -> dict:
        switch = {"on": True}
        if out.requires_grad:
            factor = out.detach() / _stabilise(out.detach(), epsilon)
            out.register_hook(lambda g: g * factor if switch["on"] else g)
        stabilised[id(out)] = (out, out._version, switch)
        return switch

    def on_affine(_module: nn.Module, _args: tuple, out: Tensor) -> None:
        stabilise_output(out)

    def on_batchnorm(module: nn.Module, args: tuple, out: Tensor) -> None:
        source, _, switch = stabilised.get(id(args[0]), (None, 0, None))
        if source is not args[0] or switch is None:
            raise AttributionError(f"lrp: BatchNorm '{names.get(module, module)}' does not follow a conv/linear "
                                   "layer, so it cannot be folded")
        switch["on"] = False  # the folded unit's stabiliser acts on the BatchNorm output instead
        stabilise_output(out)

    def residual_epsilon(x: Tensor) -> float:
        source, version, _ = stabilised.get(id(x), (None, 0, None))
        return 0.0 if source is x and x._version == version else epsilon

    try:
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                handles.append(module.register_forward_hook(on_affine))
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                handles.append(module.register_forward_hook(on_batchnorm))
            elif isinstance(module, ELEMENTWISE_ACTIVATIONS):
                handles += _attach_rule(module, "pass", residual_epsilon)
        yield
    finally:
        for handle in handles:
            handle.remove()
        stabilised.clear()


@dataclass
class BiasUnit:
    """An affine unit with a bias, seen in one forward call.

    ``output`` [B, C, H', W'] (or [B, C] for linear) is the unit's output (after the folded BatchNorm);
    ``bias`` [C] its effective bias; ``kernel``, ``stride``, ``padding``, ``dilation`` the geometry of the
    producing layer (1x1 for a lone BatchNorm); ``input_size`` the (H, W) of the unit's input (None for linear
    units); ``index`` its position among the units of the forward pass.
    """

    name: str
    output: Tensor
    bias: Tensor
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    input_size: tuple[int, int] | None = None
    index: int = -1


def _batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as y = scale·x + shift: returns (scale [C], shift [C])."""
    if bn.running_mean is None or bn.running_var is None:
        raise AttributionError(f"BatchNorm {bn} keeps no running statistics: it cannot be folded in eval mode")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@contextmanager
def bias_units(model: nn.Module, on_gradient: Callable[[BiasUnit, Tensor], None], *,
               fold_batchnorm: bool = True) -> Iterator[list[BiasUnit]]:
    """Record every biased affine unit of the forward passes run inside the block, in call order, and call
    ``on_gradient(unit, grad)`` whenever a later backward pass reaches a unit's output.

    ``fold_batchnorm=True``: a BatchNorm whose input is exactly a conv/linear output is folded into that unit:
    effective bias b_eff = (b − μ)·γ/√(σ² + ε) + β. ``fold_batchnorm=False`` (the modules' own bias parameters
    only): a conv/linear unit carries its ``.bias`` at its own output, and every BatchNorm is a 1x1 unit at its
    own resolution carrying its β (``.bias``; the shift −γμ/√(σ² + ε) is no bias parameter and is not
    recorded). Units whose bias is all zero are dropped at the end (and get no callbacks). Outputs are not
    copied: the gradient hook is registered when the output is made, so an in-place change later in the forward
    pass (``out += identity``) does not change what the hook reports.
    """
    units: list[BiasUnit] = []
    # id(output) -> (that tensor, its unit), to pair conv -> BatchNorm. Holding the tensor keeps its id from
    # being reused by another tensor within the block.
    by_output: dict[int, tuple[Tensor, BiasUnit]] = {}
    live: set[int] = set()  # indices of units with a non-zero bias, known when the block ends
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def on_conv(module: nn.Conv2d, args: tuple, out: Tensor) -> None:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise AttributionError(f"conv '{names[module]}': TR-GBP needs integer zero padding, "
                                   f"got padding={module.padding!r}, padding_mode={module.padding_mode!r}")
        bias = module.bias.detach() if module.bias is not None else out.new_zeros(out.shape[1])
        _register(BiasUnit(names[module], out, bias, _pair(module.kernel_size), _pair(module.stride),
                           _pair(module.padding), _pair(module.dilation), tuple(args[0].shape[-2:])))

    def on_linear(module: nn.Linear, _args: tuple, out: Tensor) -> None:
        bias = module.bias.detach() if module.bias is not None else out.new_zeros(out.shape[-1])
        _register(BiasUnit(names[module], out, bias))

    def on_batchnorm(module: nn.modules.batchnorm._BatchNorm, args: tuple, out: Tensor) -> None:
        size = tuple(args[0].shape[-2:]) if out.dim() == 4 else None
        if not fold_batchnorm:
            beta = module.bias.detach() if module.bias is not None else out.new_zeros(out.shape[1])
            _register(BiasUnit(names[module], out, beta, input_size=size))
            return
        scale, shift = _batchnorm_affine(module)
        source, producer = by_output.get(id(args[0]), (None, None))
        if source is args[0] and producer is not None:  # fold: the conv's bias goes through the BatchNorm too
            producer.bias = producer.bias * scale + shift
            producer.name = f"{producer.name}+{names[module]}"
            producer.output = out
            _watch(producer, out)
            return
        _register(BiasUnit(names[module], out, shift, input_size=size))

    def _register(unit: BiasUnit) -> None:
        unit.index = len(units)
        units.append(unit)
        _watch(unit, unit.output)

    def _watch(unit: BiasUnit, tensor: Tensor) -> None:
        by_output[id(tensor)] = (tensor, unit)
        if tensor.requires_grad:
            # Weak references only: the hook lives in the autograd graph (C++), so a strong reference from it to
            # the tensor or to the unit (which holds the tensor) is a cycle Python's GC cannot see, and every
            # forward pass's graph would stay in memory for ever. The caller keeps the units alive while it
            # runs its backward passes (Backprop.units).
            unit_ref, tensor_ref = weakref.ref(unit), weakref.ref(tensor)

            def hook(grad: Tensor) -> None:
                watched = unit_ref()
                # a folded conv's own output stays silent: its unit's output is now the BatchNorm's
                if watched is not None and watched.output is tensor_ref() and watched.index in live:
                    on_gradient(watched, grad)
            tensor.register_hook(hook)

    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(on_conv))
            elif isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(on_linear))
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                handles.append(module.register_forward_hook(on_batchnorm))
        yield units
    finally:
        for handle in handles:
            handle.remove()
        by_output.clear()
        units[:] = [u for u in units if bool(u.bias.abs().max() > 0)]
        live.update(u.index for u in units)

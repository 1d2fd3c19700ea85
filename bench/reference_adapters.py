"""Adapters that let a reference library run on our models and inputs: a model copy with one non-in-place ReLU
per call site (Captum's guided backprop and DeepLift), the submodule of a copy, a softmax model behind TorchRay's
sigmoid, a zennit-ready copy and zennit's BatchNorm merge with a positive eps, and the ``saliency`` package's model
function, pixel layout and numpy shim."""
from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribution import models


class GuidedReLU6(nn.ReLU):
    """relu6 as an ``nn.ReLU`` subclass, so that Captum's guided-backprop hook (grad_in <- relu(grad_in), attached to
    every ``nn.ReLU``) applies: relu(grad_out · 1[0 < x < 6]) is exactly the guided ReLU6 rule."""

    def __init__(self) -> None:
        super().__init__(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x)


def _basic_block_forward(self, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu_a(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_b(out + identity)


def _bottleneck_forward(self, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu_a(self.bn1(self.conv1(x)))
    out = self.relu_b(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu_c(out + identity)


def distinct_relu_copy(module: nn.Module) -> nn.Module:
    """A deep copy in which every ReLU call site has its own non-in-place ``nn.ReLU`` (ReLU6: :class:`GuidedReLU6`)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    clone = copy.deepcopy(module)
    for m in list(clone.modules()):
        if isinstance(m, BasicBlock):
            m.relu_a, m.relu_b = nn.ReLU(), nn.ReLU()
            m.forward = types.MethodType(_basic_block_forward, m)
            del m.relu
        elif isinstance(m, Bottleneck):
            m.relu_a, m.relu_b, m.relu_c = nn.ReLU(), nn.ReLU(), nn.ReLU()
            m.forward = types.MethodType(_bottleneck_forward, m)
            del m.relu
    for parent in list(clone.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, child_name, nn.ReLU())
            elif type(child) is nn.ReLU6:
                setattr(parent, child_name, GuidedReLU6())
    return clone.eval()


# BatchNorm eps in a zennit-ready copy and in a BatchNorm zennit has merged: positive, as torch 2.11's batch_norm
# requires, and so small that var + eps == var and x / sqrt(1 + eps) == x in float32 and float64 (it is above
# float32's smallest normal).
ZENNIT_BN_EPS = 1e-30


def zennit_ready_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for zennit's canonizers: activations not in place (zennit's rules hook their outputs), and
    each BatchNorm's eps folded into its running variance (eps -> ZENNIT_BN_EPS), so that it computes the same
    function. zennit 0.5's BatchNorm merge resets the statistics but keeps ``eps``, leaving x / sqrt(1 + eps) (~5e-6
    per layer, ~1e-2 relative in the maps); with the eps folded in, that identity is exact. ``model`` is not
    touched."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var += m.eps - ZENNIT_BN_EPS
                m.eps = ZENNIT_BN_EPS
    return ref


@contextlib.contextmanager
def zennit_positive_bn_eps() -> Iterator[None]:
    """While active, a BatchNorm that zennit's merge (``MergeBatchNorm.merge_batch_norm``, run when a composite with
    a canonizer is registered) leaves with eps <= 0 gets eps = ZENNIT_BN_EPS: zennit 1.0 sets 0, which torch 2.11's
    batch_norm rejects. The merge itself is zennit's; the patch is removed on exit."""
    from zennit.canonizers import MergeBatchNorm

    original = MergeBatchNorm.__dict__["merge_batch_norm"]

    def merge(modules, batch_norm) -> None:
        original.__func__(modules, batch_norm)
        if batch_norm.eps <= 0:
            object.__setattr__(batch_norm, "eps", ZENNIT_BN_EPS)

    MergeBatchNorm.merge_batch_norm = staticmethod(merge)
    try:
        yield
    finally:
        MergeBatchNorm.merge_batch_norm = original


def same_submodule(original: nn.Module, sub: nn.Module, clone: nn.Module) -> nn.Module:
    """The submodule of ``clone`` (a deep copy of ``original``) at the place ``sub`` has in ``original``."""
    name = next(n for n, m in original.named_modules() if m is sub)
    return clone.get_submodule(name)


class SoftmaxBehindSigmoid(nn.Module):
    """y -> logit of softmax(model(y + reference)): TorchRay's RISE multiplies its input by each mask and applies
    a sigmoid, so given (x − reference) it computes Σ p_c(M·x + (1 − M)·reference)·M / N, our RISE times p."""

    def __init__(self, model: nn.Module, reference: Tensor) -> None:
        super().__init__()
        self.model, self.reference = model, reference

    def forward(self, y: Tensor) -> Tensor:
        log_p = self.model(y + self.reference).log_softmax(dim=1)
        return log_p - torch.log1p(-log_p.exp())


@contextlib.contextmanager
def saliency_numpy_shim() -> Iterator[None]:
    """saliency 0.2.1's GuidedIG calls np.quantile(..., interpolation=...), which numpy >= 2.4 removed; map it to
    method=... for the duration (as tests/test_guided_ig.py does)."""
    import saliency.core.guided_ig as module
    try:
        np.quantile(np.zeros(2), 0.5, interpolation="lower")
        yield
        return
    except TypeError:
        pass

    class Shim:
        def __getattr__(self, name: str) -> Any:
            return getattr(np, name)

        @staticmethod
        def quantile(a, q, interpolation="linear", **kwargs):
            return np.quantile(a, q, method=interpolation, **kwargs)

    original = module.np
    module.np = Shim()
    try:
        yield
    finally:
        module.np = original


def pixel_gradient_fn(spec: models.ModelSpec, dtype: torch.dtype) -> Callable:
    """A `saliency`-package call_model_function: pixels [n, H, W, C] (numpy) -> d logit[target] / d pixels,
    through the model's normalisation (as our Guided IG and tests/test_guided_ig.py)."""
    from saliency.core.base import INPUT_OUTPUT_GRADIENTS
    prep = spec.preprocessing

    def call_model(x_batch, call_model_args=None, expected_keys=None):
        leaf = torch.tensor(np.ascontiguousarray(np.moveaxis(x_batch, -1, 1)), dtype=dtype,
                            device=spec.device).requires_grad_(True)
        logits = spec.module(prep.normalise(leaf))
        (grad,) = torch.autograd.grad(logits[:, call_model_args].sum(), leaf)
        return {INPUT_OUTPUT_GRADIENTS: np.moveaxis(grad.detach().cpu().numpy(), 1, -1)}

    return call_model


def pixels_hwc(spec: models.ModelSpec, images: Tensor) -> np.ndarray:
    """Normalised ``images`` [n, C, H, W] as float64 pixels in [0, 1], channels last [n, H, W, C] (numpy)."""
    return spec.preprocessing.denormalise(images.detach().double()).permute(0, 2, 3, 1).cpu().numpy()

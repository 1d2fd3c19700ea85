"""Time per image of every attribution method, next to its reference library and the compute floor.

    python -m bench.methods [--model resnet18] [--batch 8] [--repeats 3] [--device cpu|cuda] [--methods all]
                            [--full] [--out bench/results/methods.json]

The A-FMI paper's Table 1 (seconds per image per method), measured here: for each method (default: the five core
methods; ``--methods all``: every method in ``attribution.methods.REGISTRY``) the same model, images and (mixed)
targets are timed three ways, interleaved round by round so that a busy machine slows all of them alike:

* **ours**: ``attribution.methods.attribute(method, spec, images, targets, **options)`` with the method's options
  from :data:`FAST_SETTINGS` (default: settings that keep a 2-core CPU run short and still meaningful) or
  :data:`FULL_SETTINGS` (``--full``: the papers' settings: IG 100 steps, Guided IG 200, RISE 4000 masks,
  extremal perturbation 800 iterations, XRAI on a 100-step IG, SmoothGrad/VarGrad 50 samples);
* **reference**: the reference library computing the same maps on the same model, images and targets, with the
  same steps / samples / iterations (see :func:`reference_fns`; one note per reference is printed and stored):
  Captum (``Saliency``, ``GuidedBackprop``, ``LayerGradCam``, ``IntegratedGradients``, ``DeepLift``,
  ``NoiseTunnel``), pytorch-grad-cam (``GradCAM``, ``FullGrad``), zennit (``Epsilon`` composite + canonizer),
  the ``saliency`` package (``GuidedIG``, ``XRAI``: numpy, one image at a time, which is how it runs) and
  TorchRay (``extremal_perturbation``, ``rise``); none for TR-GBP, A-FMI and CAMERAS. Where a reference is slow
  a setting times it (or both) on the first few images of the batch only (``images`` / ``ref_images``; the table
  says so): time *per image* is what is compared. Captum's guided backprop and DeepLift need one non-in-place
  ``nn.ReLU`` module per call site, so they run on a private deep copy whose ReLUs are distinct non-in-place
  modules (ResNet blocks get a patched ``forward``; ReLU6 becomes an ``nn.ReLU`` subclass computing relu6);
* **floor**: the passes a gradient method cannot avoid, in plain autograd: one forward and one input-gradient
  backward per class column (saliency, gbp, gradcam and every baseline, for which ours/floor is the cost in units
  of one gradient pass; Grad-CAM's own backward stops at the target layer, so it can and does come in well under
  this floor), one forward and one backward per top-5 class (+1 per target column outside the top 5) for
  tr_gbp, and for a_fmi one no-grad forward of the features over the batch plus the reference image, then the
  head forward (paired batch) and one backward to the feature maps per column.

Reported: median seconds per image over ``--repeats`` timed runs after one warm-up run (settings may skip the
warm-up of very slow methods; min and all runs go into the JSON), ours/reference and the speed-up
reference/ours, ours/floor (goal <= 1.15 for the core methods) and tr_gbp/gbp (goal <= 3). Each reference map is
compared with ours (max |ours - ref| / max |ref| over the images both computed) so a fast-but-wrong method shows
up; "n/a (random)" where the reference draws its own random numbers (SmoothGrad/VarGrad noise).

Random-weight torchvision models have all-zero effective biases (fresh BatchNorm is the identity, VGG's biases
are initialised to 0), which would let TR-GBP skip every bias unit. Unless ``--init-stats keep`` is given (or
real weights are loaded), BatchNorm statistics/affine parameters and conv/linear biases are given random
non-zero values, as in a trained network; the timing of the other methods does not depend on it. Images are
real photographs from scikit-image (offline) unless ``--images random``: XRAI's segmentation depends on them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribution import models
from attribution.methods import REGISTRY, attribute
from attribution.methods.a_fmi import reference_images

DEFAULT_OUT = Path("bench/results/methods.json")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera")
TOP_K = 5  # TR-GBP's default top_k: its floor is one backward per top-k class
# The methods this benchmark is about (the registry also holds slower baselines such as RISE: use --methods all).
CORE_METHODS = ("saliency", "gbp", "gradcam", "tr_gbp", "a_fmi")
# Methods with many inner model passes (path steps, masks, optimiser iterations): the speed-up over the reference
# is what the issue asks for.
ITERATIVE_METHODS = ("ig", "gig", "rise", "extremal_perturbation", "xrai")
GOAL_FLOOR = 1.15
GOAL_TR_GBP = 3.0

# ---------------------------------------------------------------------------------------------------- settings
# Per method: ``options`` for attribute() (the reference gets the same steps/samples/iterations), ``images``: time
# ours and the references on the first N images of the batch only, ``ref_images``: the references only on the
# first N (they run one image at a time, so their time per image does not depend on N), ``warmup``: False skips
# the warm-up call (the first timed call's maps are compared instead). Unlisted keys take DEFAULT_SETTING.
DEFAULT_SETTING: dict[str, Any] = {"options": {}, "images": None, "ref_images": None, "warmup": True}
FAST_SETTINGS: dict[str, dict[str, Any]] = {
    "fullgrad": {"options": {"scaling": "channel", "eps": 1e-7}},  # pytorch-grad-cam's per-channel scaling
    "ig": {"options": {"steps": 32, "internal_batch_size": 64}},
    "lrp": {"options": {"epsilon": 1e-6}},
    "smoothgrad": {"options": {"samples": 16, "noise": 0.15, "internal_batch_size": 64}},
    "vargrad": {"options": {"samples": 16, "noise": 0.15, "internal_batch_size": 64}},
    "gig": {"options": {"steps": 16}, "ref_images": 2},
    "xrai": {"options": {"base_options": {"steps": 8, "internal_batch_size": 64}}, "ref_images": 2},
    "rise": {"options": {"masks": 1000, "batch_size": 64}, "images": 1, "warmup": False},
    "extremal_perturbation": {"options": {"iterations": 100}, "images": 2, "warmup": False},
}
# --full: the papers' settings (A-FMI App. A.2: IG 100 path steps, XRAI / EP / RISE official implementations
# with their defaults; TR-GBP: Guided IG as the saliency package, 200 steps; SmoothGrad paper: 50 samples).
FULL_SETTINGS: dict[str, dict[str, Any]] = {
    **FAST_SETTINGS,
    "ig": {"options": {"steps": 100, "internal_batch_size": 64}},
    "smoothgrad": {"options": {"samples": 50, "noise": 0.15, "internal_batch_size": 64}},
    "vargrad": {"options": {"samples": 50, "noise": 0.15, "internal_batch_size": 64}},
    "gig": {"options": {"steps": 200}, "ref_images": 1, "warmup": False},
    "xrai": {"options": {"base_options": {"steps": 100, "internal_batch_size": 64}}, "ref_images": 2},
    "rise": {"options": {"masks": 4000, "batch_size": 64}, "images": 1, "warmup": False},
    "extremal_perturbation": {"options": {"iterations": 800}, "images": 1, "warmup": False},
}


def method_setting(method: str, full: bool = False) -> dict[str, Any]:
    """The benchmark setting of ``method``: {"options": dict, "images": int | None, "ref_images": int | None,
    "warmup": bool} (FAST_SETTINGS, or FULL_SETTINGS with ``full``; defaults from DEFAULT_SETTING)."""
    table = FULL_SETTINGS if full else FAST_SETTINGS
    return {**copy.deepcopy(DEFAULT_SETTING), **copy.deepcopy(table.get(method, {}))}


def option(method: str, options: dict[str, Any], name: str) -> Any:
    """``options[name]``, else the default of keyword ``name`` of the registry method's ``_attribute``."""
    if name in options:
        return options[name]
    return inspect.signature(REGISTRY[method]._attribute).parameters[name].default


# ---------------------------------------------------------------------------------------------------- inputs
def build_spec(name: str, weights: str | None, init_stats: str, device: torch.device, seed: int) -> models.ModelSpec:
    """The model under test, in eval mode on ``device``."""
    spec = models.load(name, weights=weights, seed=seed)
    if weights is None and init_stats == "random":
        randomise_biases(spec.module, seed + 1)
    return spec.to(device)


def randomise_biases(module: nn.Module, seed: int) -> None:
    """Give every BatchNorm random running statistics and affine parameters and every conv/linear bias random
    values (a trained network's effective biases are non-zero; a freshly initialised one's are all zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)


def photo_batch(spec: models.ModelSpec, batch: int) -> Tensor:
    """``batch`` real photographs from scikit-image (cycled), normalised [B, 3, S, S]."""
    from PIL import Image
    from skimage import data
    tensors = [spec.preprocessing(Image.fromarray(np.asarray(getattr(data, n)()))) for n in PHOTOS]
    return torch.stack([tensors[i % len(tensors)] for i in range(batch)])


def build_images(spec: models.ModelSpec, kind: str, batch: int, seed: int) -> Tensor:
    size = spec.preprocessing.input_size
    if kind == "photos":
        images = photo_batch(spec, batch)
    else:
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images.to(spec.device)


def mixed_targets(spec: models.ModelSpec, images: Tensor) -> Tensor:
    """Image i gets its own rank-(i mod 5) predicted class: different classes and ranks within one batch, all
    inside the top 5 (so TR-GBP needs exactly 5 backward passes)."""
    with torch.no_grad():
        top = spec.module(images).topk(TOP_K, dim=1).indices
    rank = torch.arange(images.shape[0], device=images.device) % TOP_K
    return top.gather(1, rank[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------- references
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


@dataclass
class Reference:
    """One reference implementation of a method: ``fn()`` returns maps [n, H, W] for the first ``images`` images
    of the method's batch, comparable with ours; ``compare``: "same" (the same maps: max rel. diff printed),
    "random" (its own random numbers: "n/a (random)"), "approx" (a related computation: diff printed with ~)."""

    label: str
    fn: Callable[[], Tensor]
    images: int
    note: str
    compare: str = "same"


def reference_fns(method: str, spec: models.ModelSpec, images: Tensor, targets: Tensor, options: dict[str, Any],
                  ref_images: int | None = None) -> list[Reference]:
    """Reference implementations of ``method`` run with ``options``' steps/samples/iterations on ``images``
    [B, C, H, W] / ``targets`` [B] (the per-image ones on the first ``ref_images`` only). Empty: no reference."""
    n = images.shape[0] if ref_images is None else min(ref_images, images.shape[0])
    builder = _REFERENCE_BUILDERS.get(method)
    return builder(spec, images, targets, options, n) if builder else []


def _ref_saliency(spec, images, targets, options, n) -> list[Reference]:
    from captum.attr import Saliency
    saliency = Saliency(spec.module)
    return [Reference("captum.Saliency", lambda: saliency.attribute(images, target=targets, abs=True).amax(dim=1),
                      len(images), "abs=True, max over colour channels")]


def _ref_gbp(spec, images, targets, options, n) -> list[Reference]:
    from captum.attr import GuidedBackprop
    guided = GuidedBackprop(distinct_relu_copy(spec.module))
    return [Reference("captum.GuidedBackprop", lambda: guided.attribute(images, target=targets).sum(dim=1),
                      len(images), "on a copy with distinct non-in-place ReLUs; channel sum")]


def _ref_gradcam(spec, images, targets, options, n) -> list[Reference]:
    from captum.attr import LayerAttribution, LayerGradCam
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    size = tuple(images.shape[-2:])
    layer_cam = LayerGradCam(spec.module, spec.target_layer)

    def captum_gradcam() -> Tensor:
        cam = layer_cam.attribute(images, target=targets, relu_attributions=True)
        return LayerAttribution.interpolate(cam, size, "bilinear")[:, 0]

    # pytorch-grad-cam calls loss.backward() (fills parameters' .grad): give it a private copy of the model.
    pgc_model = copy.deepcopy(spec.module)
    pgc_layer = _same_submodule(spec.module, spec.target_layer, pgc_model)
    pgc_targets = [ClassifierOutputTarget(int(t)) for t in targets]

    def pgc_gradcam() -> Tensor:
        with PGCGradCAM(model=pgc_model, target_layers=[pgc_layer]) as cam:
            out = cam(input_tensor=images, targets=pgc_targets)  # numpy [B, H, W], min-max scaled per image
        pgc_model.zero_grad(set_to_none=True)
        return torch.from_numpy(out)

    return [Reference("captum.LayerGradCam+interpolate", captum_gradcam, len(images), "bilinear upsampling"),
            Reference("pytorch_grad_cam.GradCAM", pgc_gradcam, len(images), "min-max scaled: ours scaled alike")]


def _ref_ig(spec, images, targets, options, n) -> list[Reference]:
    from captum.attr import IntegratedGradients as CaptumIG
    ig = CaptumIG(copy.deepcopy(spec.module))
    steps, rule = option("ig", options, "steps"), option("ig", options, "method")
    chunk = option("ig", options, "internal_batch_size")
    base = reference_images(spec, option("ig", options, "baseline"), images,
                            option("ig", options, "seed")).expand_as(images)
    return [Reference("captum.IntegratedGradients",
                      lambda: ig.attribute(images, baselines=base, target=targets, n_steps=steps, method=rule,
                                           internal_batch_size=chunk).sum(dim=1),
                      len(images), f"n_steps={steps}, method={rule}, internal_batch_size={chunk}; channel sum")]


def _ref_deeplift(spec, images, targets, options, n) -> list[Reference]:
    from captum.attr import DeepLift as CaptumDeepLift
    deeplift = CaptumDeepLift(distinct_relu_copy(spec.module))
    base = reference_images(spec, option("deeplift", options, "baseline"), images,
                            option("deeplift", options, "seed")).expand_as(images)
    return [Reference("captum.DeepLift", lambda: deeplift.attribute(images, baselines=base, target=targets).sum(dim=1),
                      len(images), "on a copy with distinct non-in-place ReLUs; Captum 0.9 loses its max-pool rule "
                      "after a ReLU (every max-pool of ResNet/VGG), so the maps differ by design there "
                      "(tests/test_ig_deeplift.py: equal on max-pool-free copies)")]


def _ref_lrp(spec, images, targets, options, n) -> list[Reference]:
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import Convolution, Linear

    epsilon = float(option("lrp", options, "epsilon"))
    canonizer = (ResNetCanonizer if spec.name.startswith("resnet") else
                 VGGCanonizer if spec.name.startswith("vgg") else SequentialMergeBatchNorm)
    model = copy.deepcopy(spec.module)
    with torch.no_grad():  # as tests/test_lrp.py: non-in-place, and BatchNorm eps folded into running_var so that
        for m in model.modules():  # zennit's merge (which keeps eps) is exact
            if hasattr(m, "inplace"):
                m.inplace = False
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var += m.eps
                m.eps = 0.0
    composite = LayerMapComposite(
        layer_map=layer_map_base(epsilon) + [(Convolution, Epsilon(epsilon)), (Linear, Epsilon(epsilon))],
        canonizers=[canonizer()])

    def seed(out: Tensor) -> Tensor:
        return torch.zeros_like(out).scatter(1, targets[:, None], out.gather(1, targets[:, None]))

    def zennit_lrp() -> Tensor:
        with Gradient(model, composite) as attributor:
            _, relevance = attributor(images.clone(), seed)
        return relevance.sum(dim=1)

    return [Reference("zennit.Epsilon", zennit_lrp, len(images),
                      f"LayerMapComposite(layer_map_base + Epsilon({epsilon:g}) on conv/linear) + "
                      f"{canonizer.__name__}; one-hot x logit seed; float32 maps of both drift ~1% from float64 "
                      f"on random networks (tests/test_lrp.py: equal in float64)")]


def _ref_noise_tunnel(method: str):
    def build(spec, images, targets, options, n) -> list[Reference]:
        from captum.attr import NoiseTunnel, Saliency
        base = option(method, options, "base")
        if base != "saliency" or option(method, options, "base_options"):
            return []
        samples, noise = option(method, options, "samples"), float(option(method, options, "noise"))
        chunk = option(method, options, "internal_batch_size")
        per_call = images.shape[0] * samples if chunk is None else chunk
        flat = images.flatten(1)
        stdev = noise * float((flat.amax(dim=1) - flat.amin(dim=1)).mean())  # Captum: one sigma for the batch
        tunnel = NoiseTunnel(Saliency(spec.module))
        batch = max(1, per_call // images.shape[0])
        return [Reference(
            f"captum.NoiseTunnel({method})",
            lambda: tunnel.attribute(images, nt_type=method, nt_samples=samples, nt_samples_batch_size=batch,
                                     stdevs=stdev, target=targets, abs=True).amax(dim=1),
            len(images), f"Saliency base, nt_samples={samples}, nt_samples_batch_size={batch}, stdevs={stdev:.3g} "
                         f"(ours: {noise:g} x each image's range); its own noise", compare="random")]
    return build


@contextlib.contextmanager
def _saliency_numpy_shim() -> Iterator[None]:
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


def _pixel_gradient_fn(spec: models.ModelSpec, dtype: torch.dtype) -> Callable:
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


def _pixels_hwc(spec: models.ModelSpec, images: Tensor) -> np.ndarray:
    return spec.preprocessing.denormalise(images.detach().double()).permute(0, 2, 3, 1).cpu().numpy()


def _ref_gig(spec, images, targets, options, n) -> list[Reference]:
    from saliency.core import GuidedIG as SaliencyGuidedIG
    steps, fraction = option("gig", options, "steps"), option("gig", options, "fraction")
    max_dist = option("gig", options, "max_dist")
    call_model = _pixel_gradient_fn(spec, images.dtype)
    pixels = _pixels_hwc(spec, images[:n])
    refs = reference_images(spec, option("gig", options, "baseline"), images[:n], option("gig", options, "seed"))
    baselines = _pixels_hwc(spec, refs.expand(n, -1, -1, -1))

    def saliency_gig() -> Tensor:
        with _saliency_numpy_shim():
            maps = [SaliencyGuidedIG().GetMask(pixels[i], call_model, int(targets[i]), x_baseline=baselines[i],
                                               x_steps=steps, fraction=fraction, max_dist=max_dist).sum(axis=-1)
                    for i in range(n)]
        return torch.from_numpy(np.stack(maps))

    return [Reference("saliency.GuidedIG", saliency_gig, n,
                      f"numpy, one image at a time, x_steps={steps}, fraction={fraction}, max_dist={max_dist}, in "
                      f"pixel space; float32 model: a rounding swap at the selection threshold changes the rest of "
                      f"a path (tests/test_guided_ig.py: equal in float64)")]


def _ref_xrai(spec, images, targets, options, n) -> list[Reference]:
    from captum.attr import IntegratedGradients as CaptumIG
    from saliency.core import XRAI as SaliencyXRAI
    from saliency.core import XRAIParameters

    if option("xrai", options, "base") != "ig" or option("xrai", options, "attributions") is not None:
        return []
    base_options = option("xrai", options, "base_options") or {}
    steps, rule = option("ig", base_options, "steps"), option("ig", base_options, "method")
    chunk = option("ig", base_options, "internal_batch_size")
    x, t = images[:n], targets[:n]
    black = reference_images(spec, option("ig", base_options, "baseline"), x,
                             option("ig", base_options, "seed")).expand_as(x)
    ig = CaptumIG(copy.deepcopy(spec.module))
    pixels = _pixels_hwc(spec, x)
    min_pixel_diff = option("xrai", options, "min_pixel_diff")
    if min_pixel_diff != 50 or option("xrai", options, "dilation_radius") != 5:
        return []  # the saliency package hard-codes both

    def captum_ig_saliency_xrai() -> Tensor:
        base = ig.attribute(x, baselines=black, target=t, n_steps=steps, method=rule,
                            internal_batch_size=chunk).sum(dim=1).detach().double().cpu().numpy()
        maps = [SaliencyXRAI().GetMask(pixels[i], None, base_attribution=np.repeat(base[i][..., None], 3, -1))
                for i in range(n)]
        return torch.from_numpy(np.stack(maps))

    call_model = _pixel_gradient_fn(spec, images.dtype)
    black_hwc = _pixels_hwc(spec, black)

    def saliency_xrai() -> Tensor:
        maps = [SaliencyXRAI().GetMask(pixels[i], call_model, int(t[i]), baselines=[black_hwc[i]],
                                       batch_size=chunk or steps, extra_parameters=XRAIParameters(steps=steps))
                for i in range(n)]
        return torch.from_numpy(np.stack(maps))

    return [Reference("captum.IG+saliency.XRAI", captum_ig_saliency_xrai, n,
                      f"base map: Captum IG (n_steps={steps}, {rule}, channel sum) on the batch; then the saliency "
                      f"package's XRAI (full) one image at a time with that base_attribution"),
            Reference("saliency.XRAI", saliency_xrai, n,
                      f"the saliency package end to end, one image at a time: its own IG ({steps} steps, Riemann "
                      f"alphas linspace(0, 1), batch_size={chunk or steps}, max over colour channels) from the same "
                      f"black baseline, then XRAI: a related, not the same, base map", compare="approx")]


def _ref_fullgrad(spec, images, targets, options, n) -> list[Reference]:
    from pytorch_grad_cam import FullGrad as PGCFullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    same = option("fullgrad", options, "scaling") == "channel" and float(option("fullgrad", options, "eps")) == 1e-7
    model = copy.deepcopy(spec.module)
    pgc_targets = [ClassifierOutputTarget(int(c)) for c in targets]

    def pgc_fullgrad() -> Tensor:
        with PGCFullGrad(model, []) as cam:
            out = cam(input_tensor=images.clone(), targets=pgc_targets)  # numpy [B, H, W], min-max scaled
        model.zero_grad(set_to_none=True)
        return torch.from_numpy(out)

    return [Reference("pytorch_grad_cam.FullGrad", pgc_fullgrad, len(images),
                      "per-channel min-max scaling, eps 1e-7, final min-max (ours scaled alike)",
                      compare="same" if same else "approx")]


class _SoftmaxBehindSigmoid(nn.Module):
    """y -> logit of softmax(model(y + reference)): TorchRay's RISE multiplies its input by each mask and applies
    a sigmoid, so given (x − reference) it computes Σ p_c(M·x + (1 − M)·reference)·M / N, our RISE times p."""

    def __init__(self, model: nn.Module, reference: Tensor) -> None:
        super().__init__()
        self.model, self.reference = model, reference

    def forward(self, y: Tensor) -> Tensor:
        log_p = self.model(y + self.reference).log_softmax(dim=1)
        return log_p - torch.log1p(-log_p.exp())


def _ref_rise(spec, images, targets, options, n) -> list[Reference]:
    from torchray.attribution.rise import rise_class

    from attribution.methods.rise import rise_masks
    if not option("rise", options, "probabilities"):
        return []
    count, cells = option("rise", options, "masks"), option("rise", options, "cells")
    p, seed, batch = option("rise", options, "p"), option("rise", options, "seed"), option("rise", options, "batch_size")
    ref = reference_images(spec, option("rise", options, "reference"), images, seed)
    x, t = images[:n] - ref, targets[:n]
    model = _SoftmaxBehindSigmoid(spec.module, ref)
    masks = rise_masks(count, tuple(images.shape[-2:]), cells=cells, p=p, seed=seed)[:, None].to(images.device)

    def torchray_rise() -> Tensor:
        return rise_class(model, x, target=t, num_masks=count, batch_size=batch, filter_masks=masks)[:, 0] / p

    return [Reference("torchray.rise", torchray_rise, n,
                      f"num_masks={count}, batch_size={batch} masks per pass (one image at a time, scores of all "
                      f"classes), given our masks (filter_masks, drawn outside the timing) and a model wrapper so "
                      f"that its sigmoid(model(x·M)) is our softmax with the black reference")]


def _ref_extremal(spec, images, targets, options, n) -> list[Reference]:
    from torchray.attribution import extremal_perturbation as ep
    name = "extremal_perturbation"
    areas = option(name, options, "areas")
    areas = [float(areas)] if isinstance(areas, (int, float)) else [float(a) for a in areas]
    kwargs = {"areas": areas, "max_iter": option(name, options, "iterations"), "step": option(name, options, "step"),
              "sigma": option(name, options, "sigma"), "num_levels": option(name, options, "num_levels"),
              "jitter": option(name, options, "jitter"), "variant": option(name, options, "variant")}
    if option(name, options, "max_blur") != 20:
        return []
    model = copy.deepcopy(spec.module)  # TorchRay sets requires_grad=False on the model's parameters

    def torchray_extremal() -> Tensor:
        return torch.stack([ep.extremal_perturbation(model, images[i:i + 1], int(targets[i]), **kwargs)[0].sum(dim=0)[0]
                            for i in range(n)])

    return [Reference("torchray.extremal_perturbation", torchray_extremal, n,
                      f"one image at a time (areas batched), max_iter={kwargs['max_iter']}, areas={areas}")]


_REFERENCE_BUILDERS: dict[str, Callable[..., list[Reference]]] = {
    "saliency": _ref_saliency, "gbp": _ref_gbp, "gradcam": _ref_gradcam, "ig": _ref_ig, "deeplift": _ref_deeplift,
    "lrp": _ref_lrp, "smoothgrad": _ref_noise_tunnel("smoothgrad"), "vargrad": _ref_noise_tunnel("vargrad"),
    "gig": _ref_gig, "xrai": _ref_xrai, "fullgrad": _ref_fullgrad, "rise": _ref_rise,
    "extremal_perturbation": _ref_extremal,
}


def _same_submodule(original: nn.Module, sub: nn.Module, clone: nn.Module) -> nn.Module:
    name = next(n for n, m in original.named_modules() if m is sub)
    return clone.get_submodule(name)


def _minmax(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + 1e-7)).view_as(maps)


def agreement(method: str, label: str, ours: Tensor, ref: Tensor) -> float:
    """max |ours − ref| / max |ref| over the images both computed (ours [B, H, W], ref [n, H, W], n <= B);
    pytorch-grad-cam min-max scales its maps: ours is scaled alike first."""
    ours, ref = ours.detach().float().cpu()[:ref.shape[0]], ref.detach().float().cpu()
    if label.startswith("pytorch_grad_cam"):
        ours = _minmax(ours)
    if ours.shape != ref.shape:
        return float("nan")
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


# ---------------------------------------------------------------------------------------------------- floors
def floor_passes(method: str, spec: models.ModelSpec, images: Tensor, targets: Tensor) -> tuple[Callable, str]:
    """The unavoidable passes of ``method`` in plain autograd, and a description of them."""
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


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForeignLoad:
    """CPU time other processes used while a timed call ran, in cores (Linux /proc/stat; None elsewhere).

    Timings on a shared machine are only comparable when nobody else computes meanwhile: with 2 cores and a
    second busy process, OpenMP threads wait on each other and a run can be 10x slower."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy_s(self) -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / self.tick

    def start(self) -> None:
        self._busy0, self._own0, self._wall0 = self._busy_s(), _own_cpu_s(), time.perf_counter()

    def stop(self) -> float | None:
        busy = self._busy_s()
        wall = time.perf_counter() - self._wall0
        if busy is None or self._busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self._busy0) - (_own_cpu_s() - self._own0)) / wall


def wait_until_quiet(meter: ForeignLoad, max_foreign: float, budget_s: float) -> None:
    """Sleep in 0.3 s probes until other processes use at most ``max_foreign`` cores (or ``budget_s`` is spent)."""
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        meter.start()
        time.sleep(0.3)
        load = meter.stop()
        if load is None or load <= max_foreign:
            return


def retain_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory instead of returning it to the OS (mallopt: mmap threshold 1 GiB,
    no trimming). PyTorch's CPU allocator does not cache, so by default every large tensor is a fresh mmap whose
    pages fault in one by one: on a small VM that page-fault (system) time is a large, noisy share of each
    backward pass. Returns False where this is not glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)
                    and libc.mallopt(m_top_pad, 1 << 28))
    except (OSError, AttributeError):
        return False


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def interleaved(fns: dict[str, Callable], repeats: int, device: torch.device, max_foreign: float,
                retries: int, wait_quiet_s: float = 0.0, warmup: bool = True
                ) -> tuple[dict, dict[str, list[float]], dict[str, list[float | None]]]:
    """One warm-up call of each fn (its result kept), then ``repeats`` rounds timing each fn once per round.

    A timed call during which other processes used more than ``max_foreign`` cores is retried (after a short
    pause) up to ``retries`` times; the foreign load of each kept run is returned too. With ``wait_quiet_s`` > 0,
    each timed call first waits up to that long for the other processes to go quiet. ``warmup=False`` (calls of
    many seconds, whose one-time costs are negligible): no warm-up call, the first timed call's result is kept."""
    results: dict[str, Any] = {}
    if warmup:
        for label, fn in fns.items():
            results[label] = fn()
            _sync(device)
    times: dict[str, list[float]] = {label: [] for label in fns}
    loads: dict[str, list[float | None]] = {label: [] for label in fns}
    meter = ForeignLoad()
    for _ in range(repeats):
        for label, fn in fns.items():
            for attempt in range(retries + 1):
                if wait_quiet_s > 0:
                    wait_until_quiet(meter, max_foreign, wait_quiet_s)
                gc.collect()
                _sync(device)
                meter.start()
                start = time.perf_counter()
                out = fn()
                _sync(device)
                elapsed = time.perf_counter() - start
                foreign = meter.stop()
                if foreign is None or foreign <= max_foreign or attempt == retries:
                    break
                time.sleep(0.5)
            results.setdefault(label, out)
            times[label].append(elapsed)
            loads[label].append(foreign)
    return results, times, loads


def _stats(times: list[float], loads: list[float | None], batch: int) -> dict[str, Any]:
    per_image = [t / batch for t in times]
    return {"s_per_image": statistics.median(per_image), "min_s_per_image": min(per_image),
            "runs_s_per_image": per_image,
            "foreign_cores": [None if v is None else round(v, 2) for v in loads]}


def bench_method(method: str, spec: models.ModelSpec, images: Tensor, targets: Tensor, repeats: int,
                 max_foreign: float = 0.3, retries: int = 1, wait_quiet_s: float = 0.0,
                 setting: dict[str, Any] | None = None) -> dict:
    """Time ``method`` (ours, its references, its floor; interleaved) on ``images`` [B, C, H, W] / ``targets`` [B]
    with ``setting`` (see :func:`method_setting`; default: the fast setting). Returns the JSON row: seconds per
    image (median, min, runs), foreign load per run, ours/reference, speed-up, max relative difference."""
    setting = method_setting(method) if setting is None else setting
    options = setting["options"]
    if setting["images"]:
        images, targets = images[:setting["images"]], targets[:setting["images"]]
    batch = images.shape[0]
    refs = reference_fns(method, spec, images, targets, options, setting["ref_images"])
    floor, floor_desc = floor_passes(method, spec, images, targets)
    fns = {"ours": lambda: attribute(method, spec, images, targets, **options),
           **{r.label: r.fn for r in refs}, "floor": floor}
    results, times, loads = interleaved(fns, repeats, spec.device, max_foreign, retries, wait_quiet_s,
                                        warmup=setting["warmup"])
    ours = _stats(times["ours"], loads["ours"], batch)
    floor_stats = _stats(times["floor"], loads["floor"], batch)
    row: dict[str, Any] = {"method": method, "options": options, "images": batch, "warmup": setting["warmup"],
                           "ours": ours, "floor": {**floor_stats, "passes": floor_desc},
                           "ours_over_floor": ours["s_per_image"] / floor_stats["s_per_image"], "references": []}
    for ref in refs:
        ref_stats = _stats(times[ref.label], loads[ref.label], ref.images)
        diff = agreement(method, ref.label, results["ours"], results[ref.label]) if ref.compare != "random" else None
        row["references"].append({"name": ref.label, "images": ref.images, **ref_stats,
                                  "ours_over_reference": ours["s_per_image"] / ref_stats["s_per_image"],
                                  "speedup": ref_stats["s_per_image"] / ours["s_per_image"],
                                  "compare": ref.compare, "max_rel_diff": diff, "note": ref.note})
    return row


# ---------------------------------------------------------------------------------------------------- report
def format_options(options: dict[str, Any]) -> str:
    """``{"steps": 32, "base_options": {"steps": 8}}`` -> ``steps=32 base_options={steps=8}``."""
    parts = []
    for k, v in options.items():
        parts.append(f"{k}={{{format_options(v)}}}" if isinstance(v, dict) else f"{k}={v}")
    return " ".join(parts)


def _diff_text(ref: dict) -> str:
    if ref["compare"] == "random":
        return "n/a (random)"
    return ("~" if ref["compare"] == "approx" else "") + f"{ref['max_rel_diff']:.1e}"


def table(rows: list[dict], batch: int | None = None) -> str:
    """The results as a text table, one line per (method, reference)."""
    head = ("method", "options", "ours s/img", "reference", "ref s/img", "ours/ref", "speed-up", "diff",
            "floor s/img", "ours/floor")
    lines = []
    for row in rows:
        refs = row["references"] or [None]
        opts = format_options(row["options"]) or "-"
        if batch is not None and row["images"] < batch:
            opts += f" [{row['images']} img]"
        for i, ref in enumerate(refs):
            first = i == 0
            name = "-"
            if ref:
                name = ref["name"] + (f" [{ref['images']} img]" if ref["images"] < row["images"] else "")
            lines.append((
                row["method"] if first else "",
                opts if first else "",
                f"{row['ours']['s_per_image']:.4f}" if first else "",
                name,
                f"{ref['s_per_image']:.4f}" if ref else "-",
                f"{ref['ours_over_reference']:.2f}" if ref else "-",
                f"{ref['speedup']:.2f}x" if ref else "-",
                _diff_text(ref) if ref else "-",
                f"{row['floor']['s_per_image']:.4f}" if first else "",
                f"{row['ours_over_floor']:.2f}" if first else "",
            ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def notes(rows: list[dict]) -> list[str]:
    """One line per reference: how it was configured (and why its maps may differ)."""
    return [f"  {row['method']} / {ref['name']}: {ref['note']}" for row in rows for ref in row["references"]]


def summary(rows: list[dict]) -> tuple[dict, list[str]]:
    """Goals of the core methods (ours/floor, tr_gbp/gbp) and the speed-up of the iterative methods over their
    references: (JSON dict, printable lines)."""
    by_name = {r["method"]: r for r in rows}
    goals: dict[str, Any] = {}
    lines = []
    if "tr_gbp" in by_name and "gbp" in by_name:
        ratio = by_name["tr_gbp"]["ours"]["s_per_image"] / by_name["gbp"]["ours"]["s_per_image"]
        floor_ratio = by_name["tr_gbp"]["floor"]["s_per_image"] / by_name["gbp"]["floor"]["s_per_image"]
        goals["tr_gbp_over_gbp"] = {"value": ratio, "goal": GOAL_TR_GBP, "met": ratio <= GOAL_TR_GBP,
                                    "floor_ratio": floor_ratio}
        lines.append(f"  tr_gbp / gbp = {ratio:.2f}  (goal <= {GOAL_TR_GBP:g}: {'met' if ratio <= GOAL_TR_GBP else 'NOT met'}; "
                     f"the same ratio of the floors: {floor_ratio:.2f})")
    for r in rows:
        if r["method"] not in CORE_METHODS:
            continue
        v = r["ours_over_floor"]
        goals[f"{r['method']}_over_floor"] = {"value": v, "goal": GOAL_FLOOR, "met": v <= GOAL_FLOOR}
        lines.append(f"{r['method']:>8} / floor = {v:.2f}  (goal <= {GOAL_FLOOR:g}: {'met' if v <= GOAL_FLOOR else 'NOT met'}; "
                     f"floor: {r['floor']['passes']})")
    speedups = {}
    for r in rows:
        if r["method"] in ITERATIVE_METHODS and r["references"]:
            speedups[r["method"]] = {ref["name"]: ref["speedup"] for ref in r["references"]}
            lines.append(f"  speed-up of {r['method']} over " + ", ".join(
                f"{ref['name']}: {ref['speedup']:.2f}x" for ref in r["references"]))
    goals["iterative_speedup_over_reference"] = speedups
    return goals, lines


def _disturbed_runs(row: dict, max_foreign: float) -> int:
    entries = [row["ours"], row["floor"], *row["references"]]
    return sum(1 for e in entries for v in e["foreign_cores"] if v is not None and v > max_foreign)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "numpy", "captum", "grad-cam", "zennit", "saliency", "torchray", "scikit-image"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _git_commit() -> str | None:
    """HEAD of the checkout the benchmark ran from (+ "-dirty" when attribution/ has uncommitted changes)."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "attribution"], check=False, cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=models.MODEL_NAMES)
    p.add_argument("--weights", default=None,
                   help="weights for models.load (default: 'imagenet' for efficientnet_lite0, else random)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--images", default="photos", choices=("random", "photos"),
                   help="real scikit-image photos (default; XRAI segments them) or random normal tensors")
    p.add_argument("--init-stats", default="random", choices=("random", "keep"),
                   help="random-weight models: give BatchNorm stats and biases random non-zero values (default)")
    p.add_argument("--methods", default=",".join(CORE_METHODS),
                   help=f"comma-separated registry names, or 'all' (default: {','.join(CORE_METHODS)})")
    p.add_argument("--malloc", default="system", choices=("system", "retain"),
                   help="CPU memory: glibc's default (system), or keep freed memory in the process (retain: "
                        "removes page-fault time, as jemalloc/tcmalloc would)")
    p.add_argument("--full", action="store_true",
                   help="the papers' settings (FULL_SETTINGS: IG 100 steps, GIG 200, RISE 4000 masks, extremal "
                        "perturbation 800 iterations, ...) instead of the short FAST_SETTINGS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-foreign", type=float, default=0.3,
                   help="retry a timed run during which other processes used more than this many cores")
    p.add_argument("--retries", type=int, default=1, help="retries of a run disturbed by other processes")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each timed run, wait up to this long for other processes to go quiet (shared "
                        "machines; default 0: do not wait)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    if args.methods == "all":
        args.methods = ",".join(REGISTRY)
    unknown = [m for m in args.methods.split(",") if m not in REGISTRY]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; known: {', '.join(REGISTRY)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if args.weights is None and args.model == models.EFFICIENTNET_LITE0:
        args.weights = "imagenet"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module=r"captum\..*")  # "Setting backward hooks on ReLU activations" etc.
    warnings.filterwarnings("ignore", message=".*backward hook.*")
    warnings.filterwarnings("ignore", message=".*torch.meshgrid.*")  # TorchRay's mask generator
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    malloc = args.malloc
    if malloc == "retain" and not retain_freed_memory():
        print("bench: --malloc retain: not glibc, keeping the system allocator's defaults", flush=True)
        malloc = "system"
    started = time.perf_counter()
    spec = build_spec(args.model, args.weights, args.init_stats, device, args.seed)
    images = build_images(spec, args.images, args.batch, args.seed)
    targets = mixed_targets(spec, images)
    load_before = os.getloadavg()
    mode = "full" if args.full else "fast"
    settings = {m: method_setting(m, args.full) for m in args.methods.split(",")}
    print(f"bench: {args.model} (weights={args.weights or 'random'}), batch {args.batch}, {args.images} images, "
          f"targets {targets.tolist()}, {args.repeats} repeats, {device} ({_device_name(device)}), "
          f"{torch.get_num_threads()} threads, malloc {malloc}, torch {torch.__version__}, commit {_git_commit()}",
          flush=True)
    print(f"settings ({mode}; options go to attribute(), the references get the same steps/samples/iterations; "
          f"images / ref_images: only the first N images of the batch are timed):")
    for m, s in settings.items():
        extra = {k: v for k, v in s.items() if k != "options" and v != DEFAULT_SETTING[k]}
        print(f"  {m}: {format_options(s['options']) or '(defaults)'}{'  ' + json.dumps(extra) if extra else ''}",
              flush=True)

    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        row = bench_method(method, spec, images, targets, args.repeats, args.max_foreign, args.retries,
                           args.wait_quiet, settings[method])
        rows.append(row)
        disturbed = _disturbed_runs(row, args.max_foreign)
        refs = ", ".join(f"{r['name']} {r['s_per_image']:.4f}" for r in row["references"])
        print(f"  {method}: ours {row['ours']['s_per_image']:.4f} s/img{f', {refs}' if refs else ''}, floor "
              f"{row['floor']['s_per_image']:.4f} s/img ({time.perf_counter() - t0:.1f} s"
              f"{f'; {disturbed} timed runs shared the CPU with other processes' if disturbed else ''})", flush=True)

    goals, goal_lines = summary(rows)
    disturbed = sum(_disturbed_runs(r, args.max_foreign) for r in rows)
    print()
    print(table(rows, args.batch))
    print()
    print("\n".join(goal_lines))
    if any(r["references"] for r in rows):
        print("\nreferences:")
        print("\n".join(notes(rows)))
    if disturbed:
        print(f"WARNING: {disturbed} timed runs overlapped other processes using > {args.max_foreign:g} cores "
              f"(after {args.retries} retries each): timings are noisy, rerun on a quiet machine")
    report = {
        "model": args.model, "weights": args.weights, "init_stats": args.init_stats if args.weights is None else None,
        "batch": args.batch, "repeats": args.repeats, "images": args.images, "targets": targets.tolist(),
        "settings_mode": mode, "settings": settings,
        "device": str(device), "device_name": _device_name(device), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "malloc": malloc, "versions": _versions(), "git_commit": _git_commit(), "torch": torch.__version__,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "timing": "median over repeats of wall seconds per image after one warm-up (none where a setting says "
                  "warmup false); ours, references and floor interleaved round by round",
        "max_foreign_cores": args.max_foreign, "retries": args.retries, "wait_quiet_s": args.wait_quiet,
        "disturbed_runs": disturbed,
        "methods": rows, "goals": goals, "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out.resolve()} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

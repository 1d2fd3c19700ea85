"""The reference libraries' implementations of each method, on the same model, images and targets as ours, and
how far their maps are from ours.

:func:`reference_fns` builds them (Captum, pytorch-grad-cam, zennit, the ``saliency`` package, TorchRay; none for
TR-GBP, A-FMI and CAMERAS) with the same steps / samples / iterations as ``options``; :func:`agreement` is the
max relative difference of two maps.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attribution import models
from attribution.methods.a_fmi import reference_images
from bench.method_settings import option
from bench.reference_adapters import (SoftmaxBehindSigmoid, distinct_relu_copy, pixel_gradient_fn, pixels_hwc,
                                      saliency_numpy_shim, same_submodule, zennit_positive_bn_eps,
                                      zennit_ready_copy)


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
    pgc_layer = same_submodule(spec.module, spec.target_layer, pgc_model)
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
    model = zennit_ready_copy(spec.module)
    composite = LayerMapComposite(
        layer_map=layer_map_base(epsilon) + [(Convolution, Epsilon(epsilon)), (Linear, Epsilon(epsilon))],
        canonizers=[canonizer()])

    def seed(out: Tensor) -> Tensor:
        return torch.zeros_like(out).scatter(1, targets[:, None], out.gather(1, targets[:, None]))

    def zennit_lrp() -> Tensor:
        with zennit_positive_bn_eps(), Gradient(model, composite) as attributor:
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


def _ref_gig(spec, images, targets, options, n) -> list[Reference]:
    from saliency.core import GuidedIG as SaliencyGuidedIG
    steps, fraction = option("gig", options, "steps"), option("gig", options, "fraction")
    max_dist = option("gig", options, "max_dist")
    call_model = pixel_gradient_fn(spec, images.dtype)
    pixels = pixels_hwc(spec, images[:n])
    refs = reference_images(spec, option("gig", options, "baseline"), images[:n], option("gig", options, "seed"))
    baselines = pixels_hwc(spec, refs.expand(n, -1, -1, -1))

    def saliency_gig() -> Tensor:
        with saliency_numpy_shim():
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
    pixels = pixels_hwc(spec, x)
    min_pixel_diff = option("xrai", options, "min_pixel_diff")
    if min_pixel_diff != 50 or option("xrai", options, "dilation_radius") != 5:
        return []  # the saliency package hard-codes both

    def captum_ig_saliency_xrai() -> Tensor:
        base = ig.attribute(x, baselines=black, target=t, n_steps=steps, method=rule,
                            internal_batch_size=chunk).sum(dim=1).detach().double().cpu().numpy()
        maps = [SaliencyXRAI().GetMask(pixels[i], None, base_attribution=np.repeat(base[i][..., None], 3, -1))
                for i in range(n)]
        return torch.from_numpy(np.stack(maps))

    call_model = pixel_gradient_fn(spec, images.dtype)
    black_hwc = pixels_hwc(spec, black)

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


def _ref_rise(spec, images, targets, options, n) -> list[Reference]:
    from torchray.attribution.rise import rise_class

    from attribution.methods.rise import rise_masks
    if not option("rise", options, "probabilities"):
        return []
    count, cells = option("rise", options, "masks"), option("rise", options, "cells")
    p, seed, batch = option("rise", options, "p"), option("rise", options, "seed"), option("rise", options, "batch_size")
    ref = reference_images(spec, option("rise", options, "reference"), images, seed)
    x, t = images[:n] - ref, targets[:n]
    model = SoftmaxBehindSigmoid(spec.module, ref)
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

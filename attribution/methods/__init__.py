"""Attribution methods: one class per method, one registry, one call.

    maps = attribute("tr_gbp", spec, images, targets)            # [B, H, W] float32, signed, unnormalised

``images``: normalised float tensor [B, C, H, W] on the model's device; ``targets``: LongTensor [B] (one class
per image) or [B, T] (T classes per image: one forward pass, T backward passes; maps [B, T, H, W]).
A new method is one file with a :class:`Method` subclass plus one line in ``REGISTRY``.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from attribution.errors import AttributionError
from attribution.methods.a_fmi import AFMI
from attribution.methods.base import Attribution, Method
from attribution.methods.cam import GradCAM
from attribution.methods.cameras import CAMERAS
from attribution.methods.deeplift import DeepLift
from attribution.methods.extremal import ExtremalPerturbation
from attribution.methods.fullgrad import FullGrad
from attribution.methods.gradients import GuidedBackprop, Saliency
from attribution.methods.guided_ig import GuidedIG
from attribution.methods.integrated import IntegratedGradients
from attribution.methods.lrp import LRPEpsilon
from attribution.methods.noise_tunnel import SmoothGrad, VarGrad
from attribution.methods.rise import RISE
from attribution.methods.tr_gbp import TRGBP
from attribution.methods.xrai import XRAI
from attribution.models import ModelSpec

REGISTRY: dict[str, type[Method]] = {
    "saliency": Saliency,
    "gbp": GuidedBackprop,
    "gradcam": GradCAM,
    "tr_gbp": TRGBP,
    "a_fmi": AFMI,
    "fullgrad": FullGrad,
    "cameras": CAMERAS,
    "rise": RISE,
    "extremal_perturbation": ExtremalPerturbation,
    "ig": IntegratedGradients,
    "deeplift": DeepLift,
    "lrp": LRPEpsilon,
    "smoothgrad": SmoothGrad,
    "vargrad": VarGrad,
    "gig": GuidedIG,
    "xrai": XRAI,
}


def get_method(name: str) -> type[Method]:
    """The Method class registered under ``name``."""
    if name not in REGISTRY:
        raise AttributionError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def attribute_with_extras(method: str, spec: ModelSpec, images: Tensor, targets: Tensor | int | list[int], /,
                          **options: Any) -> Attribution:
    """Maps and method-specific extras (A-FMI's FMI vectors, TR-GBP's per-layer maps) as an Attribution.

    The four leading parameters are positional-only, so every option name of every method (IG's ``method``,
    say) reaches the method: ``attribute_with_extras("ig", spec, x, t, method="riemann_trapezoid")``.
    """
    return get_method(method)(spec).attribute(images, targets, **options)


def attribute(method: str, spec: ModelSpec, images: Tensor, targets: Tensor | int | list[int], /,
              **options: Any) -> Tensor:
    """Attribution maps: float32 [B, H, W] for targets [B], [B, T, H, W] for targets [B, T].

    ``method``, ``spec``, ``images`` and ``targets`` are positional-only; every keyword is the method's option.
    """
    return attribute_with_extras(method, spec, images, targets, **options).maps


__all__ = ["REGISTRY", "Attribution", "Method", "attribute", "attribute_with_extras", "get_method"]

"""A-FMI: attribution by feature map importance (A-FMI paper §3).

A = the last conv layer's feature maps of the image, Ā those of a reference image. Through the classifier
head only (everything after A), each element-wise nonlinearity's derivative is replaced by the secant slope
(σ(y) − σ(ȳ)) / (y − ȳ), ȳ being the reference's pre-activation (the ordinary derivative where |y − ȳ| < 1e-6);
chain-ruled to A this gives the modified gradient d^σ y_c / d A, and FMI^c_k is its mean over positions (i, j).
The map is S^c = Σ_k FMI^c_k (A^k − Ā^k), bilinearly upsampled to the input size.

Decisions: the head is run once on the paired batch [A; Ā] so every activation call site (also a reused module)
sees its own reference value; for VGG, A is taken after the last max-pool (pool5, where the paper's "fully
connected layers" start), so the head is avgpool + FC/ReLU layers only and the secant rule is exact there (a
max-pool inside a user's head gets DeepLIFT's max-pool rule, the secant rule's counterpart for max-pooling);
the reference is an image in *pixel* space (black = 0, white = 1, random = uniform [0, 1) from ``seed``),
normalised with the model's preprocessing, unless a normalised tensor is given. With a linear head (ResNet:
avgpool + fc) FMI^c = fc.weight[c] / (h·w) and the native-resolution map sums to y_c − ȳ_c.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.hooks import activation_rule
from attribution.maps import upsample
from attribution.methods.base import Attribution, Method, check_target_range
from attribution.models import ModelSpec

REFERENCES = ("black", "white", "random")


def reference_images(spec: ModelSpec, reference: str | Tensor, like: Tensor, seed: int = 0) -> Tensor:
    """Normalised reference image(s), [1, C, H, W] or [B, C, H, W], on ``like``'s device and dtype.

    ``reference``: "black", "white", "random" (pixels uniform in [0, 1), generator seeded by ``seed``), or a
    normalised tensor [C, H, W] / [B, C, H, W] used as is.
    """
    shape = (1, *like.shape[1:])
    if isinstance(reference, Tensor):
        ref = reference.to(like.device, like.dtype)
        ref = ref.unsqueeze(0) if ref.dim() == 3 else ref
        if ref.dim() != 4 or ref.shape[1:] != like.shape[1:] or ref.shape[0] not in (1, like.shape[0]):
            raise AttributionError(f"a_fmi: reference tensor {tuple(reference.shape)} does not fit images "
                                   f"{tuple(like.shape)}")
        return ref
    if reference == "black":
        pixels = torch.zeros(shape)
    elif reference == "white":
        pixels = torch.ones(shape)
    elif reference == "random":
        pixels = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    else:
        raise AttributionError(f"a_fmi: unknown reference {reference!r}; use {', '.join(REFERENCES)} or a tensor")
    if like.shape[1] != len(spec.preprocessing.mean):
        raise AttributionError(f"a_fmi: images have {like.shape[1]} channels, preprocessing expects "
                               f"{len(spec.preprocessing.mean)}")
    return spec.preprocessing.normalise(pixels).to(like.device, like.dtype)


class AFMI(Method):
    """A-FMI maps [B(, T), H, W]. Options: ``reference`` (see :func:`reference_images`), ``seed``,
    ``return_fmi`` (extras ``fmi`` [B(, T), K]; also ``feature_map`` [B(, T), h, w], the map before upsampling,
    and ``score_delta`` [B(, T)] = y_c − ȳ_c)."""

    name = "a_fmi"

    def _attribute(self, images: Tensor, targets: Tensor, *, reference: str | Tensor = "black", seed: int = 0,
                   return_fmi: bool = False) -> Attribution:
        spec = self.spec
        if spec.features is None or spec.head is None:
            raise AttributionError(f"a_fmi: model {spec.name} has no features/head split; "
                                   "pass wrap(..., features=..., head=...)")
        refs = reference_images(spec, reference, images, seed)
        b = images.shape[0]
        with torch.no_grad():
            both = spec.features(torch.cat([images, refs]))
        if both.dim() != 4:
            raise AttributionError(f"a_fmi: features must give [B, K, h, w] maps, got {tuple(both.shape)}")
        feats, ref_feats = both[:b], both[b:].expand_as(both[:b])
        leaf = feats.clone().requires_grad_(True)
        with activation_rule(spec.head, "secant"):
            logits = spec.head(torch.cat([leaf, ref_feats]))
        check_target_range(targets, logits.shape[1], self.name)
        scores, ref_scores = logits[:b], logits[b:]
        delta = feats - ref_feats
        fmis, native = [], []
        for m in range(targets.shape[1]):
            column = targets[:, m:m + 1]
            (grad,) = torch.autograd.grad(scores.gather(1, column).sum(), leaf,
                                          retain_graph=m < targets.shape[1] - 1)
            fmi = grad.mean(dim=(2, 3))
            fmis.append(fmi)
            native.append((fmi[:, :, None, None] * delta).sum(dim=1))
        feature_map = torch.stack(native, dim=1).detach()
        extras = {}
        if return_fmi:
            extras = {"fmi": torch.stack(fmis, dim=1).detach(), "feature_map": feature_map,
                      "score_delta": (scores.gather(1, targets) - ref_scores.gather(1, targets)).detach()}
        return Attribution(upsample(feature_map, images.shape[-2:]), extras)

"""SmoothGrad (Smilkov et al. 2017) and VarGrad (Adebayo et al. 2018): any method's maps over noisy copies."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.methods.base import Attribution, Method


def _base_class(base: str | type[Method]) -> type[Method]:
    if isinstance(base, type) and issubclass(base, Method):
        return base
    # the registry imports this module: look the name up at call time
    from attribution.methods import get_method
    return get_method(base)


class NoiseTunnel(Method):
    """Shared engine of :class:`SmoothGrad` and :class:`VarGrad`; subclasses set ``name`` and ``_reduce``.

    Options: ``base`` (a registered method name or a Method class; default ``"saliency"``), ``samples`` (16),
    ``noise`` (0.15: σ as a fraction of each image's value range max(x) − min(x), taken over the normalised
    image, the SmoothGrad paper's noise level), ``seed`` (0), ``base_options`` (dict passed to the base method,
    e.g. ``{"steps": 8}`` for IG), ``internal_batch_size`` (noisy images per base call; default 64; None = all
    samples × images at once).

    Decisions: the noisy batch is x + N(0, σ²) for ``samples`` draws per image, drawn in one ``torch.randn`` of
    shape [samples, B, C, H, W] from a generator seeded with ``seed`` on the images' device (same seed, device and
    batch → bit-identical maps); noisy copies are flattened sample-major and passed to the base method in chunks,
    each chunk one base call with the targets repeated, so the base method's own batching (one forward, T
    backward passes) is kept. No clipping to the valid pixel range (as in the paper and Captum's NoiseTunnel).
    The output map inherits the base method's channel reduction (``saliency``: max |∂f/∂x| over colour channels;
    signed methods such as ``ig``/``gbp``: sum over channels) and sign.
    """

    def _reduce(self, maps: Tensor) -> Tensor:  # maps [S, B, T, H, W] -> [B, T, H, W]
        raise NotImplementedError

    def _attribute(self, images: Tensor, targets: Tensor, *, base: str | type[Method] = "saliency",
                   samples: int = 16, noise: float = 0.15, seed: int = 0, base_options: dict[str, Any] | None = None,
                   internal_batch_size: int | None = 64) -> Attribution:
        if not isinstance(samples, int) or samples < 1:
            raise AttributionError(f"{self.name}: samples must be a positive integer, got {samples!r}")
        if not isinstance(noise, (int, float)) or noise < 0:
            raise AttributionError(f"{self.name}: noise must be a non-negative number, got {noise!r}")
        if internal_batch_size is not None and (not isinstance(internal_batch_size, int) or internal_batch_size < 1):
            raise AttributionError(f"{self.name}: internal_batch_size must be a positive integer or None, "
                                   f"got {internal_batch_size!r}")
        method = _base_class(base)(self.spec)
        if isinstance(method, NoiseTunnel):
            raise AttributionError(f"{self.name}: the base method cannot itself be a noise tunnel")
        b = images.shape[0]
        span = (images.flatten(1).amax(dim=1) - images.flatten(1).amin(dim=1)).view(1, b, 1, 1, 1)
        generator = torch.Generator(device=images.device).manual_seed(seed)
        eps = torch.randn((samples, *images.shape), generator=generator, device=images.device, dtype=images.dtype)
        noisy = (images.unsqueeze(0) + eps * (noise * span)).flatten(0, 1)  # row s·B + b
        repeated = targets.repeat(samples, 1)
        chunk = noisy.shape[0] if internal_batch_size is None else internal_batch_size
        try:
            parts = [method.attribute(noisy[i:i + chunk], repeated[i:i + chunk], **(base_options or {})).maps
                     for i in range(0, noisy.shape[0], chunk)]
        except AttributionError as exc:  # name the method the caller asked for
            raise AttributionError(f"{self.name}: {str(exc).removeprefix(method.name + ': ')} "
                                   f"(base method {method.name})") from None
        maps = torch.cat(parts).view(samples, b, *parts[0].shape[1:])
        return Attribution(self._reduce(maps.to(torch.float32)))


class SmoothGrad(NoiseTunnel):
    """SmoothGrad: the mean of the base method's maps over noisy copies of each image. See :class:`NoiseTunnel`."""

    name = "smoothgrad"

    def _reduce(self, maps: Tensor) -> Tensor:
        return maps.mean(dim=0)


class VarGrad(NoiseTunnel):
    """VarGrad: the variance (population, 1/samples, as Captum's NoiseTunnel "vargrad") of the base method's maps
    over noisy copies of each image; non-negative. See :class:`NoiseTunnel`."""

    name = "vargrad"

    def _reduce(self, maps: Tensor) -> Tensor:
        return maps.var(dim=0, correction=0)

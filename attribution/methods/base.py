"""What every attribution method shares: the result type, input validation and the ``attribute`` contract."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from attribution.errors import AttributionError
from attribution.models import ModelSpec
from attribution.methods.precisions import allowed_precisions, refusal_reason
from attribution.methods.targets import TopKTargets, plain_forward_targets
from attribution.precision import check_precision, compute_precision, current_precision


@dataclass
class Attribution:
    """Maps and per-pair extras of one ``attribute`` call.

    ``maps``: float32 [B, H, W] (targets given as [B]) or [B, T, H, W] (targets given as [B, T]).
    ``extras``: method-specific tensors laid out the same way, with the pair dims first (e.g. A-FMI's ``fmi``
    [B, K] or [B, T, K]); a nested dict holds named per-layer maps (TR-GBP's ``layers``).
    """

    maps: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


class Method:
    """One attribution method bound to one model. Subclasses set ``name`` and implement ``_attribute``.

    ``_attribute(images [B,C,H,W], targets [B,T], **options)`` returns an Attribution whose maps are
    [B, T, H, W]; this base class validates inputs and squeezes T when the caller gave targets as [B].
    """

    name: ClassVar[str]
    # True: _attribute accepts an unresolved TopKTargets and resolves it (resolve_targets) from the logits of its own
    # first forward pass on ``images`` — one whose values equal the plain model's (rules act on the backward only).
    predicts_targets: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def attribute(self, images: Tensor, targets: Tensor | int | list[int] | TopKTargets, /, *,
                  precision: str | None = None, **options: Any) -> Attribution:
        """Maps for each (image, target) pair; see the class docstring for shapes. ``images`` and ``targets`` are
        positional-only, so a method may have an option of any name.

        ``precision``: ``fp32`` | ``tf32`` | ``bf16`` | ``fp16`` (:mod:`attribution.precision`) for the method's
        forward and backward passes; None = the enclosing call's (``fp32`` at top level). Maps are float32
        whatever the precision; a precision outside the method's :meth:`precisions` is refused in one line.

        ``targets`` may be an unresolved :class:`attribution.methods.targets.TopKTargets`: the model's top-k
        classes, decided by the method's own forward pass when the class sets ``predicts_targets`` (else by one
        plain forward first); the object then holds the classes and the top-5 probabilities. Maps are
        [B, T, H, W]."""
        precision = self.check_precision(precision or current_precision())
        self._check_options(options)
        if isinstance(targets, TopKTargets):  # the model's top-k, from the method's own forward where it has one
            images, per_pair = validate_images(self.spec, images, self.name), False
            if not self.predicts_targets and not targets.resolved:
                with compute_precision(precision, images.device):
                    plain_forward_targets(self.spec.module, images, targets)
            targets2d = targets.classes if targets.resolved else targets
        else:
            images, targets2d, per_pair = validate_inputs(self.spec, images, targets, self.name)
        with torch.enable_grad(), compute_precision(precision, images.device):
            result = self._attribute(images, targets2d, **options)
        if isinstance(targets, TopKTargets) and not targets.resolved:
            raise AttributionError(f"{self.name}: predicts_targets is set but the method did not resolve its targets")
        result.maps = result.maps.to(torch.float32)
        if per_pair:
            result.maps = result.maps[:, 0]
            result.extras = _squeeze_targets(result.extras)
        return result

    def _attribute(self, images: Tensor, targets: Tensor, **options: Any) -> Attribution:
        raise NotImplementedError

    @classmethod
    def precisions(cls) -> tuple[str, ...]:
        """The compute precisions the method may run in, from the measured deviation from fp32
        (:mod:`attribution.methods.precisions`)."""
        return allowed_precisions(cls.name)

    @classmethod
    def check_precision(cls, precision: str) -> str:
        """``precision`` if the method may run in it, else one AttributionError line saying why not."""
        check_precision(precision)
        if precision not in cls.precisions():
            raise AttributionError(f"{cls.name}: precision {precision!r} is refused: "
                                   f"{refusal_reason(cls.name, precision)}; use {', '.join(cls.precisions())}")
        return precision

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Every option of the method (the keyword-only parameters of ``_attribute``) with its default value."""
        params = inspect.signature(cls._attribute).parameters
        return {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}

    def _check_options(self, options: dict[str, Any]) -> None:
        allowed = list(self.option_defaults())
        unknown = [n for n in options if n not in allowed]
        if unknown:
            raise AttributionError(f"method {self.name!r} has no option {unknown[0]!r}; "
                                   f"options: {', '.join(allowed) or 'none'}")


def _squeeze_targets(extras: dict[str, Any]) -> dict[str, Any]:
    return {k: _squeeze_targets(v) if isinstance(v, dict) else v[:, 0] for k, v in extras.items()}


def validate_images(spec: ModelSpec, images: Tensor, method: str) -> Tensor:
    """Check the images' shape, dtype and device and the model's mode; return the images."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise AttributionError(f"{method}: images must be a float tensor [B, C, H, W], got {got}")
    if images.shape[0] == 0:
        raise AttributionError(f"{method}: empty batch of images")
    if spec.module.training:
        raise AttributionError(f"{method}: model {spec.name} is in training mode; call .eval() before attributing")
    if images.device != spec.device:
        raise AttributionError(f"{method}: images are on {images.device} but model {spec.name} is on {spec.device}")
    return images


def validate_inputs(spec: ModelSpec, images: Tensor, targets: Tensor | int | list[int],
                    method: str) -> tuple[Tensor, Tensor, bool]:
    """Check shapes, dtypes, devices and mode; return (images, targets as LongTensor [B, T], targets-were-[B])."""
    images = validate_images(spec, images, method)
    b = images.shape[0]
    targets = torch.as_tensor(targets, device=images.device)
    if targets.dim() == 0:
        targets = targets.expand(b)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise AttributionError(f"{method}: targets must be integer class indices, got {targets.dtype}")
    if targets.dim() not in (1, 2) or targets.shape[0] != b:
        raise AttributionError(f"{method}: targets must be [B] or [B, T] with B = {b}, got {tuple(targets.shape)}")
    if bool((targets < 0).any()):
        raise AttributionError(f"{method}: negative target class {int(targets.min())}")
    per_pair = targets.dim() == 1
    return images, (targets[:, None] if per_pair else targets).long(), per_pair


def check_target_range(targets: Tensor, num_classes: int, method: str) -> None:
    """Raise if any target is not a valid index into logits of width ``num_classes``."""
    if bool((targets >= num_classes).any()):
        raise AttributionError(f"{method}: target class {int(targets.max())} out of range: "
                               f"the model has {num_classes} classes")

"""How a model-pinning actor sets up its device and moves a batch onto it, in one place (all three workers).

On CUDA: ``cudnn.benchmark`` (a run has one input size, so the autotuned kernels are reused for every batch),
channels_last weights and images where it pays (bf16/fp16 autocast: tensor-core convolutions are NHWC; the
``channels_last`` setting forces it either way), and each batch's uint8 pixels copied from pinned host memory
with ``non_blocking`` (the normalisation runs on the device). On the CPU none of it applies unless forced.
"""
from __future__ import annotations

import numpy as np
import torch

from attribution import models

HALF_PRECISIONS = ("bf16", "fp16")


def load_model(model: str, weights: str | None, device: str | None, threads: int | None, precision: str = "fp32",
               channels_last: bool | None = None) -> tuple[models.ModelSpec, bool]:
    """The actor's own copy of ``model`` on ``device`` (None: CUDA when available), with ``threads`` torch CPU
    threads (None: leave as is). Returns (spec, whether images go in channels_last). ``channels_last`` None: on
    CUDA with a half ``precision``, else not."""
    if threads:
        torch.set_num_threads(threads)
    target = torch.device(device) if device else models.default_device()
    spec = models.load(model, weights, device=target)
    use_nhwc = channels_last if channels_last is not None else (target.type == "cuda"
                                                                and precision in HALF_PRECISIONS)
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if use_nhwc:
        spec.module.to(memory_format=torch.channels_last)  # the actor's own model, loaded above
    return spec, use_nhwc


def device_images(spec: models.ModelSpec, pixels: np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """uint8 pixels [N, 3, S, S] (host) -> normalised float32 images [N, 3, S, S] on the model's device: one
    copy of the uint8 batch (pinned and non-blocking on CUDA), then /255 and the model's normalisation there."""
    host = torch.from_numpy(np.ascontiguousarray(pixels))
    if spec.device.type == "cuda":
        host = host.pin_memory()
    images = spec.preprocessing.normalise(host.to(spec.device, non_blocking=True).float() / 255.0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


__all__ = ["HALF_PRECISIONS", "device_images", "load_model"]

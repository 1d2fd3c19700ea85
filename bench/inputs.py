"""The benchmarks' inputs: the model under test (random weights with trained-looking biases), real photographs,
and mixed top-5 targets."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from attribution import models

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera")
TOP_K = 5  # TR-GBP's default top_k: its floor is one backward per top-k class


def build_spec(name: str, weights: str | None, init_stats: str, device: torch.device, seed: int) -> models.ModelSpec:
    """The model under test, in eval mode on ``device``: ``weights`` for ``models.load`` (None: random, seeded
    with ``seed``); ``init_stats`` "random" gives a random-weight model's BatchNorm statistics and biases random
    non-zero values (:func:`randomise_biases`), "keep" leaves them as initialised."""
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
    """``batch`` normalised images [B, 3, S, S] on ``spec.device`` (S: the model's input size): ``kind`` "photos"
    (:func:`photo_batch`) or "random" (standard normal, seeded with ``seed``)."""
    size = spec.preprocessing.input_size
    if kind == "photos":
        images = photo_batch(spec, batch)
    else:
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images.to(spec.device)


def mixed_targets(spec: models.ModelSpec, images: Tensor) -> Tensor:
    """Class indices [B] (int64) for ``images`` [B, C, H, W]: image i gets its own rank-(i mod 5) predicted class,
    so different classes and ranks within one batch, all inside the top 5 (TR-GBP needs exactly 5 backward
    passes)."""
    with torch.no_grad():
        top = spec.module(images).topk(TOP_K, dim=1).indices
    rank = torch.arange(images.shape[0], device=images.device) % TOP_K
    return top.gather(1, rank[:, None])[:, 0]

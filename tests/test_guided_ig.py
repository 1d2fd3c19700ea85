"""Guided IG equals the `saliency` package's ``GuidedIG`` (0.2.1), pair by pair, on a ResNet-18 and a VGG-11-BN
(random weights, randomised BatchNorm), batch of 4 with mixed targets, at 32×32 and few steps to keep time down.

Like with like: our path runs in pixel space (see attribution/methods/guided_ig.py), so the reference gets the
denormalised image and the same black baseline (``reference_images(spec, "black")`` denormalised) as [H, W, C]
float64, and a call_model_function that normalises inside and returns d logit / d pixels (its input made
contiguous NCHW like ours: a channels-last copy selects other conv kernels, whose ~1e-7 different gradients already
change the path); our map is the channel sum of its attribution.
The comparison runs on float64 copies of the models: Guided IG ranks |gradient| to select features, so a rounding
difference that swaps two features at the selection threshold changes the path from then on (chaotically), and
float32 convolutions round differently for our batch than for the reference's one-image calls (~3e-8). In float32
the match holds when no swap happens (observed ≤ 5e-7 at 32×32, 8 steps), but that is luck, not a guarantee.
In float64: max|ours − ref| ≤ 1e-6·max|ref| per pair (observed ~4e-8: the float32 rounding of our output).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import saliency.core.guided_ig as reference_module
import torch
from saliency.core import GuidedIG as ReferenceGuidedIG

from attribution.methods.a_fmi import reference_images
from attribution.methods.guided_ig import GuidedIG, quantile_lower_index
from attribution.models import ModelSpec

RTOL = 1e-6
SIZE = 32
STEPS = 8


class _NumpyQuantileShim:
    """numpy 2.4 removed quantile(interpolation=…), which saliency 0.2.1 still passes; map it to method=…."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def quantile(a, q, interpolation="linear", **kwargs):
        return np.quantile(a, q, method=interpolation, **kwargs)


@pytest.fixture(autouse=True)
def _reference_numpy(monkeypatch):
    monkeypatch.setattr(reference_module, "np", _NumpyQuantileShim())


def float64_copy(spec: ModelSpec) -> ModelSpec:
    return ModelSpec(spec.name, copy.deepcopy(spec.module).double(), spec.preprocessing)


def inputs(spec: ModelSpec, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    pixels = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return spec.preprocessing.normalise(pixels)


def reference_maps(spec: ModelSpec, images: torch.Tensor, targets: torch.Tensor, **options) -> torch.Tensor:
    """The saliency package's Guided IG for every (image, target) pair, channel-summed: [B, T, H, W] float64."""
    prep, dtype = spec.preprocessing, images.dtype

    def call_model(x_batch, call_model_args=None, expected_keys=None):
        # contiguous NCHW, as our batch is (a channels-last copy would pick other conv kernels and rounding)
        leaf = torch.tensor(np.ascontiguousarray(np.moveaxis(x_batch, -1, 1)), dtype=dtype).requires_grad_(True)
        logits = spec.module(prep.normalise(leaf))
        (grad,) = torch.autograd.grad(logits[:, call_model_args].sum(), leaf)
        return {reference_module.INPUT_OUTPUT_GRADIENTS: np.moveaxis(grad.numpy(), 1, -1)}

    pixels = prep.denormalise(images.double()).permute(0, 2, 3, 1).numpy()
    baseline = prep.denormalise(reference_images(spec, "black", images).double())[0].permute(1, 2, 0).numpy()
    out = torch.zeros(targets.shape + images.shape[-2:], dtype=torch.float64)
    for i in range(targets.shape[0]):
        for j in range(targets.shape[1]):
            mask = ReferenceGuidedIG().GetMask(pixels[i], call_model, int(targets[i, j]), x_baseline=baseline,
                                               x_steps=options.get("steps", 200),
                                               fraction=options.get("fraction", 0.25),
                                               max_dist=options.get("max_dist", 0.02))
            out[i, j] = torch.from_numpy(mask.sum(axis=-1))
    return out


def assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = (ours.double() - ref).abs().amax(dim=(-2, -1)) / ref.abs().amax(dim=(-2, -1))
    assert float(err.max()) <= RTOL, f"max relative difference per pair {err.tolist()}"


@pytest.mark.parametrize("model", ["resnet18", "vgg11_bn"])
def test_equals_saliency_package(model, request):
    spec = float64_copy(request.getfixturevalue(model))
    images = inputs(spec)
    if model == "resnet18":   # [B, T]: two targets per image, one repeated
        targets = torch.tensor([[1, 5], [7, 7], [100, 3], [999, 0]])
        options = {"steps": STEPS}
    else:                     # [B]: one target per image, other fraction/max_dist
        targets = torch.tensor([[3], [250], [0], [998]])
        options = {"steps": STEPS, "fraction": 0.4, "max_dist": 0.05}
    ours = GuidedIG(spec).attribute(images, targets if model == "resnet18" else targets[:, 0], **options).maps
    ours = ours if model == "resnet18" else ours[:, None]
    assert_matches(ours, reference_maps(spec, images, targets, **options))


def test_deterministic_float32_and_model_untouched(resnet18):
    images = inputs(resnet18, torch.float32, seed=1)
    targets = torch.tensor([[2, 9], [4, 4], [8, 1], [16, 0]])
    before = {k: v.clone() for k, v in resnet18.module.state_dict().items()}
    first = GuidedIG(resnet18).attribute(images, targets, steps=4).maps
    second = GuidedIG(resnet18).attribute(images.clone(), targets.clone(), steps=4).maps
    assert first.dtype == torch.float32 and first.shape == (4, 2, SIZE, SIZE)
    assert torch.equal(first, second)
    assert torch.isfinite(first).all() and first.abs().amax() > 0
    after = resnet18.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in resnet18.module.parameters())
    assert not resnet18.module.training


def test_input_equal_to_baseline_gives_zero(resnet18):
    black = reference_images(resnet18, "black", inputs(resnet18, torch.float32)).expand(2, -1, -1, -1)
    maps = GuidedIG(resnet18).attribute(black.contiguous(), torch.tensor([1, 2]), steps=2).maps
    assert torch.equal(maps, torch.zeros_like(maps))


@pytest.mark.parametrize("n,fraction", [(10, 0.25), (150528, 0.25), (7, 0.0), (7, 1.0), (1001, 0.33)])
def test_quantile_index_matches_numpy(n, fraction):
    values = np.random.default_rng(0).permutation(n).astype(float)
    assert np.sort(values)[quantile_lower_index(n, fraction)] == np.quantile(values, fraction, method="lower")


def test_chunked_rows_equal_one_batch_in_float64(resnet18):
    """internal_batch_size splits the (image, target) rows into chunks that each run all steps: in float64 the
    maps equal the single-chunk run (rows do not interact)."""
    spec = float64_copy(resnet18)
    images = inputs(spec, torch.float64, seed=3)
    targets = torch.tensor([[2, 9], [4, 4], [8, 1], [16, 0]])
    whole = GuidedIG(spec).attribute(images, targets, steps=4, internal_batch_size=None).maps
    chunked = GuidedIG(spec).attribute(images, targets, steps=4, internal_batch_size=3).maps
    assert torch.allclose(chunked, whole, rtol=1e-9, atol=1e-12 * float(whole.abs().max()))

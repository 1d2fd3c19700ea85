"""Bad input to the methods: one AttributionError with a one-line message that names the problem."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import REGISTRY, attribute


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def tiny() -> models.ModelSpec:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    return models.wrap(model, features=model.features, head=model.head)


X = torch.randn(2, 3, 8, 8)


def raises_one_line(match: str):
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(AttributionError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert "\n" not in str(self.info.value)
            return handled
    return _Check()


@pytest.mark.parametrize("method", list(REGISTRY))
@pytest.mark.parametrize("images, targets, match", [
    (X[0], torch.tensor([0]), r"images must be a float tensor \[B, C, H, W\], got \(3, 8, 8\)"),
    (X.long(), torch.tensor([0, 1]), "images must be a float tensor"),
    (X, torch.tensor([0, 1, 2]), r"targets must be \[B\] or \[B, T\] with B = 2, got \(3,\)"),
    (X, torch.tensor([0.0, 1.0]), "targets must be integer class indices"),
    (X, torch.tensor([0, -1]), "negative target class -1"),
    (X, torch.tensor([0, 3]), "target class 3 out of range: the model has 3 classes"),
    (X, torch.tensor([[0, 1], [2, 7]]), "target class 7 out of range"),
])
def test_bad_shapes_and_targets(tiny, method, images, targets, match):
    with raises_one_line(f"{method}: {match}"):
        attribute(method, tiny, images, targets)


def test_unknown_method_and_option(tiny):
    with raises_one_line("unknown method 'lime'; known: saliency, gbp"):
        attribute("lime", tiny, X, torch.tensor([0, 1]))
    with raises_one_line("method 'gbp' has no option 'steps'; options: none"):
        attribute("gbp", tiny, X, torch.tensor([0, 1]), steps=3)
    with raises_one_line(r"method 'tr_gbp' has no option 'topk'; options: (\w+, )*top_k, "):
        attribute("tr_gbp", tiny, X, torch.tensor([0, 1]), topk=3)
    with raises_one_line("a_fmi: unknown reference 'grey'"):
        attribute("a_fmi", tiny, X, torch.tensor([0, 1]), reference="grey")


def test_training_mode_is_refused(tiny):
    tiny.module.train()
    try:
        with raises_one_line("model custom is in training mode"):
            attribute("saliency", tiny, X, torch.tensor([0, 1]))
    finally:
        tiny.module.eval()


def test_model_without_conv_for_cam():
    spec = models.wrap(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval())
    with raises_one_line("gradcam: model custom has no conv layer to use as target layer"):
        attribute("gradcam", spec, X, torch.tensor([0, 1]))


def test_unsupported_activation_for_guided_rules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    spec = models.wrap(model.eval())
    for method in ("gbp", "tr_gbp"):
        with raises_one_line("guided backprop has no rule for SiLU at '1'"):
            attribute(method, spec, X, torch.tensor([0, 1]))
    assert attribute("saliency", spec, X, torch.tensor([0, 1])).shape == (2, 8, 8)

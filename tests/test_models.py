"""Model zoo: names, weights sources, the features/head split, the real EfficientNet-Lite0, checkpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution import models
from attribution.errors import AttributionError


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "efficientnet_lite0"])
def test_head_of_features_is_the_model(name):
    spec = models.load(name)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(spec.head(spec.features(x)), spec.module(x))
    assert not spec.module.training
    assert spec.class_names is not None and len(spec.class_names) == 1000


def test_random_init_is_seeded():
    a, b, c = models.load("resnet18", seed=3), models.load("resnet18", seed=3), models.load("resnet18", seed=4)
    assert torch.equal(a.module.conv1.weight, b.module.conv1.weight)
    assert not torch.equal(a.module.conv1.weight, c.module.conv1.weight)


def test_real_lite0_recognises_the_photos(lite0, photos):
    with torch.no_grad():
        top = lite0.module(photos).topk(3, dim=1).indices
    assert set(top[0].tolist()) == {281, 282, 285}  # chelsea: tabby, tiger cat, Egyptian cat
    assert top[1, 0].item() == 967  # coffee: espresso
    assert lite0.class_name(967) == "espresso"


def test_checkpoint_round_trip(tmp_path):
    spec = models.load("resnet18", seed=5, num_classes=10)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in spec.module.state_dict().items()}}, path)
    loaded = models.load("resnet18", weights=path)
    assert loaded.module.fc.out_features == 10  # read from the checkpoint
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in spec.module.state_dict().items())
    assert loaded.class_names is None


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "vgg.pt"
    torch.save(models.load("vgg11").module.state_dict(), path)
    with pytest.raises(AttributionError, match=r"does not match architecture resnet18: .*missing") as err:
        models.load("resnet18", weights=path)
    assert "\n" not in str(err.value)


def test_unreadable_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AttributionError, match="cannot be read"):
        models.load("resnet18", weights=bad)
    with pytest.raises(AttributionError, match="does not exist"):
        models.load("resnet18", weights=tmp_path / "missing.pth")


def test_unknown_names():
    with pytest.raises(AttributionError, match="unknown model 'resnet19'"):
        models.load("resnet19")
    with pytest.raises(AttributionError, match="unknown torchvision weights"):
        models.load("resnet18", weights="NOT_A_WEIGHT")
    with pytest.raises(AttributionError, match="unknown weights"):
        models.load("efficientnet_lite0", weights="NOT_A_WEIGHT")


def test_wrap_defaults_and_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(5, 2))
    spec = models.wrap(model)
    assert spec.target_layer is model[2]
    assert models.wrap(model, target_layer="0").target_layer is model[0]
    with pytest.raises(AttributionError, match="not a submodule"):
        models.wrap(model, target_layer="7")
    with pytest.raises(AttributionError, match="both features= and head="):
        models.wrap(model, features=model[:3])
    assert models.wrap(nn.Sequential(nn.Flatten(), nn.Linear(3, 2))).target_layer is None


def test_preprocessing_round_trip():
    prep = models.Preprocessing()
    pixels = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(prep.denormalise(prep.normalise(pixels)), pixels)
    from PIL import Image
    image = Image.new("L", (300, 400), color=128)  # grayscale, portrait
    tensor = prep(image)
    assert tensor.shape == (3, 224, 224)

"""Small CNNs for the procedural benchmark (:mod:`attribution.data.benchmark`), trainable on a CPU in minutes.

``bench_resnet`` and ``bench_vgg`` are conv + BatchNorm + ReLU networks whose biases are the BatchNorm shifts
(convs feeding a BatchNorm have no bias of their own: it would be redundant, and TR-GBP folds the BatchNorm into
the conv anyway) plus the biases of the linear layers; ``bench_vgg_plain`` has no BatchNorm and plain conv biases
(the case of the TR-GBP paper's torchvision VGG16). Every activation is its own, non-in-place ``nn.ReLU`` module, called as a module,
so guided/secant/LRP rules attach per call site. ``module(x) == module.head(module.features(x))``.

- ``bench_resnet``: a 3x3 stride-2 stem (16 channels), then three residual basic blocks (widths 32, 64, 128,
  stride 2 each; projection shortcut = 1x1 conv + BN), global average pool + fc. Feature map at 1/16 of the
  input (7x7 at 112 px). Target layer: the last block (like torchvision's layer4).
- ``bench_vgg``: four VGG blocks of 3x3 convs (1, 1, 2, 2 convs; widths 8, 16, 32, 64), each followed by a
  2x2 max pool (the features end with the last pool at 1/16 of the input), then, as torchvision's VGG, an adaptive
  average pool to ``input_size // 16`` (the identity at the training size), flatten, and a 3-layer FC head
  Linear-ReLU-Linear-ReLU-Linear (256, 256 hidden units), so A-FMI's secant rule has ReLUs to act on. Target
  layer: the last max pool (as the zoo's VGG split).
- ``bench_vgg_plain``: ``bench_vgg`` with every conv + BatchNorm replaced by a conv with its own bias (zero at
  initialisation, as torchvision's VGG) + ReLU, no normalisation anywhere; same head, same target layer.
- ``bench_lite0``: EfficientNet-Lite0 itself (:mod:`attribution.architectures.efficientnet_lite`: ReLU6,
  depthwise convs, BatchNorm) with a ``num_classes`` classifier, for the benchmark's input size (feature map at
  1/32: 4x4 at 112 px). It is the benchmark's stand-in for an ImageNet-trained CNN: ``jobs.train_benchmark_model
  --init imagenet`` starts it from the real ImageNet weights (all but the classifier) and fine-tunes it, so its
  biases are an ImageNet model's. Target layer, split and randomisation blocks are Lite0's.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

from torch import Tensor, nn

from attribution.architectures.efficientnet_lite import EfficientNetLite0

ARCHITECTURES: tuple[str, ...] = ("bench_resnet", "bench_vgg", "bench_vgg_plain", "bench_lite0")
RESNET_WIDTHS = (16, 32, 64, 128)     # stem, layer1, layer2, layer3
VGG_WIDTHS = (8, 16, 32, 64)
VGG_CONVS = (1, 1, 2, 2)
VGG_HIDDEN = 256
FEATURE_STRIDE = 16


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[tuple[str, nn.Module]]:
    return [("conv", nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)), ("bn", nn.BatchNorm2d(c_out)),
            ("relu", nn.ReLU())]


class BasicBlock(nn.Module):
    """Residual block: relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x)); shortcut = 1x1 conv + BN when the
    width or the resolution changes, else the identity."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """[B, c_in, H, W] -> [B, c_out, H / stride, W / stride]."""
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class SmallCNN(nn.Module):
    """``features`` (conv part, ends at the target layer) then ``head`` (classifier): logits [B, num_classes]
    from normalised images [B, 3, input_size, input_size] float32. ``arch``, ``num_classes`` and
    ``input_size`` are kept as attributes."""

    def __init__(self, arch: str, features: nn.Sequential, head: nn.Sequential, num_classes: int,
                 input_size: int) -> None:
        super().__init__()
        self.arch, self.num_classes, self.input_size = arch, num_classes, input_size
        self.features = features
        self.head = head

    @property
    def target_layer(self) -> nn.Module:
        """The last conv feature layer (Grad-CAM's layer, A-FMI's feature maps): ``features``'s last module."""
        return self.features[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.head(self.features(x))


def bench_resnet(num_classes: int, input_size: int = 112) -> SmallCNN:
    """The ResNet-style benchmark model (see the module docstring) for ``num_classes`` classes."""
    w = RESNET_WIDTHS
    features = nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(OrderedDict(_conv_bn_relu(3, w[0], stride=2)))),
        ("layer1", BasicBlock(w[0], w[1], stride=2)),
        ("layer2", BasicBlock(w[1], w[2], stride=2)),
        ("layer3", BasicBlock(w[2], w[3], stride=2)),
    ]))
    head = nn.Sequential(OrderedDict([("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)),
                                      ("fc", nn.Linear(w[3], num_classes))]))
    model = SmallCNN("bench_resnet", features, head, num_classes, input_size)
    _init(model)
    return model


def bench_vgg(num_classes: int, input_size: int = 112, *, batchnorm: bool = True) -> SmallCNN:
    """The VGG-style benchmark model (see the module docstring) for ``num_classes`` classes; ``batchnorm=False``
    gives ``bench_vgg_plain`` (conv biases, no BatchNorm)."""
    layers: list[nn.Module] = []
    c_in = 3
    for width, convs in zip(VGG_WIDTHS, VGG_CONVS):
        for _ in range(convs):
            if batchnorm:
                layers += [nn.Conv2d(c_in, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            else:
                layers += [nn.Conv2d(c_in, width, 3, 1, 1, bias=True), nn.ReLU()]
            c_in = width
        layers.append(nn.MaxPool2d(2, 2))
    features = nn.Sequential(*layers)
    grid = max(1, input_size // FEATURE_STRIDE)
    head = nn.Sequential(OrderedDict([
        ("avgpool", nn.AdaptiveAvgPool2d(grid)), ("flatten", nn.Flatten(1)),
        ("fc1", nn.Linear(c_in * grid * grid, VGG_HIDDEN)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(VGG_HIDDEN, VGG_HIDDEN)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(VGG_HIDDEN, num_classes)),
    ]))
    model = SmallCNN("bench_vgg" if batchnorm else "bench_vgg_plain", features, head, num_classes, input_size)
    _init(model)
    return model


class BenchLite0(EfficientNetLite0):
    """EfficientNet-Lite0 with the benchmark models' interface: ``arch``, ``num_classes``, ``input_size``,
    ``features`` / ``head`` (views of Lite0's own modules, not copies) and ``target_layer`` (the head activation).
    Normalised images [B, 3, S, S] float32 -> logits [B, num_classes]; its state dict has Lite0's key names."""

    def __init__(self, num_classes: int, input_size: int = 112) -> None:
        super().__init__(num_classes=num_classes)
        self.arch, self.num_classes, self.input_size = "bench_lite0", num_classes, input_size

    @property
    def features(self) -> nn.Sequential:
        """Image -> last conv feature maps [B, 1280, ceil(S/32), ceil(S/32)]."""
        return nn.Sequential(*self.feature_modules())

    @property
    def head(self) -> nn.Sequential:
        """Feature maps -> logits."""
        return nn.Sequential(*self.head_modules())

    @property
    def target_layer(self) -> nn.Module:
        """The head activation after ``_conv_head`` + ``_bn1`` (as the zoo's efficientnet_lite0)."""
        return self._act_head


def build(arch: str, num_classes: int, input_size: int = 112) -> SmallCNN | BenchLite0:
    """``bench_resnet``, ``bench_vgg``, ``bench_vgg_plain`` or ``bench_lite0`` with random weights from torch's
    global generator."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown benchmark architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if num_classes < 2 or input_size < FEATURE_STRIDE:
        raise ValueError(f"{arch}: need num_classes >= 2 and input_size >= {FEATURE_STRIDE}, "
                         f"got {num_classes} and {input_size}")
    if arch == "bench_resnet":
        return bench_resnet(num_classes, input_size)
    if arch == "bench_lite0":
        model = BenchLite0(num_classes, input_size)
        _init(model)
        return model
    return bench_vgg(num_classes, input_size, batchnorm=arch == "bench_vgg")


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def checkpoint(model: SmallCNN | BenchLite0, *, mean: Sequence[float], std: Sequence[float], class_names: Sequence[str],
               **extra: Any) -> dict:
    """A benchmark checkpoint for ``torch.save``: ``arch``, ``num_classes``, ``input_size``, preprocessing
    ``mean``/``std`` (RGB, of [0, 1] pixels), ``class_names``, the ``state_dict`` (CPU tensors) and ``extra``
    plain values (training details). Loadable with ``torch.load(weights_only=True)``, and by
    ``attribution.models.load(path)``."""
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.num_classes}-class {model.arch}")
    return {"arch": model.arch, "num_classes": int(model.num_classes), "input_size": int(model.input_size),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "class_names": [str(n) for n in class_names],
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, **extra}

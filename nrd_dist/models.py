"""Model registry: ``build_model(arch, num_classes, in_channels)``.

* ``small_cnn``: a compact CNN for 28 px grey images (Fashion-MNIST demo, benchmarks).
* ``preact_resnet18`` / ``preact_resnet34``: pre-activation ResNets with the CIFAR stem
  (3x3 conv, no max-pool), as used by the GJS and NRD papers for 32 px data.
* ``resnet50``: torchvision's ResNet-50, randomly initialised (the paper trains
  WebVision from scratch), any class count.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn

    return wrap


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Return a freshly initialised model producing logits of shape [B, num_classes]."""
    if arch not in MODELS:
        raise ValueError(f"model.arch: unknown model {arch!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[arch](num_classes=num_classes, in_channels=in_channels)


# ----------------------------------------------------------------------------- small CNN


@register("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, width: int = 32) -> nn.Module:
    """Two conv blocks + two linear layers for 28-32 px inputs (~0.5M parameters).

    The classifier sees the whole 7x7 feature map (adaptive pooling makes 32 px inputs
    fit too): enough capacity to memorise noisy labels, which is what the noisy-label
    comparisons must show. BatchNorm after every conv and before the hidden ReLU (so
    the teacher's running statistics matter as in the ResNets, and the hidden units
    cannot all die); training therefore needs at least 2 samples per rank and batch.
    Checkpoints of the earlier layout (no hidden BatchNorm, before sweep v2) do not load.
    """

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(in_channels, width),
        block(width, 2 * width),
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(),
        # BatchNorm before the hidden ReLU: without it, high label noise at lr 0.1 drove
        # every one of these units below zero for good (dead ReLUs), and the network
        # collapsed to a constant prediction (docs/results/v1/README.md).
        nn.Linear(2 * width * 49, 128, bias=False),
        nn.BatchNorm1d(128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


@register("mlp")
def mlp(num_classes: int, in_channels: int = 1, image_size: int = 28, hidden: int = 64) -> nn.Module:
    """A two-layer perceptron without BatchNorm: its loss on a batch does not depend on
    how the batch is split over ranks, so the equivalence tests of the engines use it."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size**2, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


# ----------------------------------------------------------------------------- PreAct ResNet


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input (He et al. 2016, "identity mappings").
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        # CIFAR stem: 3x3 conv at full resolution, no max-pool.
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register("preact_resnet18")
def preact_resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels)


@register("preact_resnet34")
def preact_resnet34(num_classes: int, in_channels: int = 3) -> nn.Module:
    return PreActResNet([3, 4, 6, 3], num_classes, in_channels)


# ----------------------------------------------------------------------------- ResNet-50


@register("resnet50")
def resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model

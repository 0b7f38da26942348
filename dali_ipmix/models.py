"""Classification models by name: the project's own CIFAR-sized networks, then torchvision's.

torchvision has no CIFAR-style networks (3x3 stem, no max-pool), so these are defined here (the
first two are the ones adversarial training papers use):

* ``preactresnet18`` -- PreAct ResNet-18 (He et al., "Identity Mappings in Deep Residual
  Networks"), the model of Rice et al.'s robust-overfitting reference code (~11.2 M parameters);
* ``wrn34_10`` -- WideResNet-34-10 (Zagoruyko & Komodakis), the larger standard option (~46 M);
* ``tiny_cnn`` -- a 4-layer CNN for tests, benchmarks and smoke runs on a CPU;
* ``resnet9`` -- D. Page's fast CIFAR ResNet-9; ``resnet9_w16``, a quarter as wide, is the built-in
  demo's model.

``get_model(arch, num_classes)`` returns one of these, or else
``torchvision.models.get_model(arch, weights=None, num_classes=num_classes)``.  None of the models
normalises its input; wrap it in ``Normalized`` (defined here, used by the adversarial mode and
``dali-ipmix eval``) to feed pixels in [0, 1].
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for pixels ``x`` in [0, 1], NCHW: corruptions and the PGD
    budget stay in pixel space."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; the shortcut (1x1 conv when the shape changes) branches
    off after the first BN-ReLU, as in the pre-activation paper."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActNet(nn.Module):
    """3x3 stem, stages of :class:`PreActBlock` (stride 2 at the start of every stage but the
    first), BN-ReLU, global pool, linear: PreAct ResNet and WideResNet differ only in widths and
    depths."""

    def __init__(self, stem: int, widths, blocks, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        layers, in_planes = [], stem
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.layers(self.conv1(x))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)
        return self.fc(x)


def preact_resnet(blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64) -> PreActNet:
    return PreActNet(width, [width * 2 ** i for i in range(len(blocks))], blocks, num_classes)


def wide_resnet(depth: int = 34, widen: int = 10, num_classes: int = 10) -> PreActNet:
    """WRN-depth-widen with pre-activation basic blocks and no dropout."""
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    return PreActNet(16, [16 * widen, 32 * widen, 64 * widen], [n] * 3, num_classes)


def tiny_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """conv-BN-ReLU x 3 (two stride-2) + global pool + linear: trains in seconds on a CPU."""
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, width, 1), *block(width, 2 * width, 2),
                         *block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """The fast CIFAR ResNet-9 of D. Page's DAWNBench entry ("How to train your ResNet"): conv
    (w), then conv (2w) + max-pool + residual pair, conv (4w) + max-pool, conv (8w) + max-pool +
    residual pair, global max-pool, linear, logits scaled by 1/8.  Max-pooling and the scaled
    logits let it learn from few steps; ``width=64`` is the original, 16 trains on a CPU."""

    def __init__(self, num_classes: int = 10, width: int = 64, logit_scale: float = 0.125):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8 * w, num_classes)
        self.logit_scale = logit_scale

    def forward(self, x):
        return self.fc(self.features(x)) * self.logit_scale


ARCHS: Dict[str, Callable[[int], nn.Module]] = {
    "preactresnet18": lambda num_classes: preact_resnet((2, 2, 2, 2), num_classes),
    "wrn34_10": lambda num_classes: wide_resnet(34, 10, num_classes),
    "tiny_cnn": lambda num_classes: tiny_cnn(num_classes),
    "resnet9": lambda num_classes: ResNet9(num_classes),
    # the built-in demo's model (train.py without data flags): widths 16-128
    "resnet9_w16": lambda num_classes: ResNet9(num_classes, width=16),
}


def list_models() -> List[str]:
    """The project's names followed by torchvision's classification models."""
    import torchvision
    return sorted(ARCHS) + sorted(torchvision.models.list_models(module=torchvision.models))


def get_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised model (no pretrained weights are ever fetched)."""
    if arch in ARCHS:
        return ARCHS[arch](num_classes)
    import torchvision
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(sorted(ARCHS))} or a "
                         f"torchvision classification model name")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)

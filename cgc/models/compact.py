"""The compact CNN: a small classifier that trains on a CPU in minutes (``--arch compact``)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, UnknownName

COMPACT = "compact"
NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with 8 groups (no batch statistics: the same result for any
    split of a batch over processes, and stable with few images per device)."""
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(min(8, channels), channels)


def _conv_norm(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), _norm(norm, cout), nn.ReLU(inplace=True))


class CompactCNN(nn.Module):
    """Four 3x3 conv-norm-ReLU layers with 2x2 max-pooling after the first three (stride 8),
    global average pooling, a linear head. ``norm``: ``batch`` (BatchNorm) or ``group``
    (GroupNorm, for runs that must not depend on how a batch is split over processes).
    ``stride`` 4 drops the third pooling: 16x16 heatmaps at 64 px (four times the compute of the
    last stage).

    ``features`` is the last convolutional stage (the Grad-CAM layer): at 64 px input it is an
    8x8 map, so heatmaps have enough resolution to be right or wrong about a small object.
    Max-pooling (rather than strided convolutions) lets small objects win early in training:
    on the synthetic dataset it leaves the initial accuracy plateau several times sooner.
    Global pooling + linear head make pooled and element-wise Grad-CAM coincide, as for ResNet.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, norm: str = "batch", stride: int = 8):
        super().__init__()
        if norm not in NORMS:
            raise UnknownName("norm", norm, NORMS)
        if stride not in (4, 8):
            raise ConfigError(f"the compact model's stride is 4 or 8, got {stride}")
        w = width
        self.stem = nn.Sequential(_conv_norm(3, w, norm), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_norm(w, 2 * w, norm), nn.MaxPool2d(2))
        third = [nn.MaxPool2d(2)] if stride == 8 else []
        self.features = nn.Sequential(_conv_norm(2 * w, 4 * w, norm), *third, _conv_norm(4 * w, 4 * w, norm))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stage2(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

"""Shared fixtures. Models and photos are session-scoped: loading them once keeps the suite fast."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: no oversubscription

import matplotlib

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def lite0():
    """The bundled EfficientNet-Lite0 with real ImageNet weights (eval mode). Do not mutate it."""
    import camlens

    return camlens.load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def cat() -> np.ndarray:
    from camlens.base.io import sample_image

    return sample_image("chelsea")


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    from camlens.base.io import sample_image

    return sample_image("coffee")


class TinyCNN(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> global average pooling -> linear: a CAM-ready toy network."""

    def __init__(self, c_in: int = 3, c1: int = 6, c2: int = 5, classes: int = 4, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c1, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, classes, bias=bias)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyCNN().double().eval()


@pytest.fixture
def tiny_x():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 12, 12, generator=g, dtype=torch.float64)

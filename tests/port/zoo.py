"""Torch models to port: the zoo both port test files use.

Each entry builds a small torch model (seeded) and its example inputs; widths are small so a
fast-tier test stays cheap. ``ZOO`` maps a name to ``(build, inputs, slow)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    """Conv2d / ReLU / MaxPool2d / flatten / Linear: the port's first case."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc(x)


def _seeded(cls, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


def small_cnn():
    return _seeded(SmallCNN), (torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)),)


ZOO = {
    "small_cnn": small_cnn,
}

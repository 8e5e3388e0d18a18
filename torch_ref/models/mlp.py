"""The tutorial's network: 784 -> 256 -> ReLU -> 10 (``jaxlight.models.mlp``)."""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

__all__ = ["MLP"]


class MLP(nn.Module):
    """The tutorial's network: 784 -> 256 -> ReLU -> 10."""

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.input_shape = (28, 28)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

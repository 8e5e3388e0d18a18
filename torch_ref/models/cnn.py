"""The two-convolution CNN (``jaxlight.models.cnn``), NCHW."""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

__all__ = ["CNN"]


class CNN(nn.Module):
    """conv3x3(32) -> ReLU -> pool2 -> conv3x3(64) -> ReLU -> pool2 -> 256 -> 10, NCHW.
    The flatten before ``fc1`` orders features (C, H, W); jaxlight's orders them (H, W, C)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.input_shape = (28, 28)
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(7 * 7 * 64, 256)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

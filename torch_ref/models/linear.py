"""One linear layer, three tasks: linear, logistic and softmax regression (``jaxlight.models.linear``)."""

from __future__ import annotations

from torch import nn

__all__ = ["LinearRegression", "LogisticRegression", "SoftmaxRegression"]


class LinearRegression(nn.Module):
    """``y = x W^T + b``. Input ``(B, in_features)``; output ``(B, out_features)``."""

    def __init__(self, in_features: int = 8, out_features: int = 1):
        super().__init__()
        self.input_shape = (in_features,)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.linear(x)


class LogisticRegression(nn.Module):
    """Input ``(B, 28, 28)`` (or ``(B, 1, 28, 28)`` from ``ToTensor``); output ``(B, 1)``."""

    def __init__(self, in_features: int = 784):
        super().__init__()
        self.input_shape = (28, 28)
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x):
        return self.linear(x.flatten(1))


class SoftmaxRegression(nn.Module):
    """784 -> 10 logits."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.input_shape = (28, 28)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))

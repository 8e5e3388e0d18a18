"""The six models in ``torch.nn``: same names, attribute names and parameter shapes (up to
layout) as ``jaxlight.models``. PyTorch's default initialisation, which ``jaxlight`` copies."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LinearRegression", "LogisticRegression", "SoftmaxRegression", "MLP", "CNN",
           "LSTMClassifier", "MODELS", "build_model", "count_params"]


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


class MLP(nn.Module):
    """The tutorial's network: 784 -> 256 -> ReLU -> 10."""

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.input_shape = (28, 28)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


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


class LSTMClassifier(nn.Module):
    """The image read as 28 rows of 28 pixels by ``nn.LSTM(28, 128)``; logits from the last
    hidden state."""

    def __init__(self, in_features: int = 28, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.input_shape = (28, in_features)
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], 28, -1)
        _, (h, _) = self.lstm(x)
        return self.fc(h[-1])


MODELS = {
    "linear": LinearRegression,
    "logistic": LogisticRegression,
    "softmax": SoftmaxRegression,
    "mlp": MLP,
    "cnn": CNN,
    "lstm": LSTMClassifier,
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised model by its command-line name; ``seed`` fixes the weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""The built-in models in ``torch.nn``, one file per family as in ``jaxlight.models``: the same
names, attribute names and parameter shapes (up to layout). PyTorch's default initialisation,
which ``jaxlight`` copies.

A model is one class in its file plus one entry in :data:`MODELS` (its command-line name);
``jaxlight.bridge.layout_for`` derives the weight layout between the twins from the two models.

    >>> from torch_ref.models import build_model, count_params
    >>> count_params(build_model("mlp"))
    203530
"""

from __future__ import annotations

import torch
from torch import nn

from torch_ref.models.cnn import CNN
from torch_ref.models.linear import LinearRegression, LogisticRegression, SoftmaxRegression
from torch_ref.models.mlp import MLP
from torch_ref.models.rnn import LSTMClassifier

__all__ = ["LinearRegression", "LogisticRegression", "SoftmaxRegression", "MLP", "CNN",
           "LSTMClassifier", "MODELS", "build_model", "count_params"]

# Command-line name -> class: the same names as ``jaxlight.models.MODELS``.
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
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

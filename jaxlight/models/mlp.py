"""The tutorial's network: 784 -> 256 -> ReLU -> 10."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlight.hparams import save_hyperparameters
from jaxlight.models.linear import dense

__all__ = ["MLP"]


class MLP(nnx.Module):
    """Input ``(B, 28, 28) float32``; output ``(B, 10)`` logits."""

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10, *, rngs: nnx.Rngs):
        save_hyperparameters(self)  # (load_from_checkpoint rebuilds it from a checkpoint)
        self.input_shape = (28, 28)
        self.fc1 = dense(in_features, hidden, rngs)
        self.fc2 = dense(hidden, num_classes, rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(x)))

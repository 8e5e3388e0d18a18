"""One linear layer, three tasks: linear, logistic and softmax regression."""

from __future__ import annotations

from flax import nnx

from jaxlight.hparams import save_hyperparameters
from jaxlight.models.init import torch_bias_init, torch_kernel_init

__all__ = ["dense", "LinearRegression", "LogisticRegression", "SoftmaxRegression"]


def dense(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear`` with PyTorch's initialisation. Kernel ``(in, out)``: the transpose of
    ``torch.nn.Linear.weight``'s ``(out, in)``."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_features),
        rngs=rngs,
    )


class LinearRegression(nnx.Module):
    """``y = x @ W + b``. Input ``x: (B, in_features) float32``; output ``(B, out_features)``."""

    def __init__(self, in_features: int = 8, out_features: int = 1, *, rngs: nnx.Rngs):
        save_hyperparameters(self)  # (load_from_checkpoint rebuilds it from a checkpoint)
        self.input_shape = (in_features,)
        self.linear = dense(in_features, out_features, rngs)

    def __call__(self, x):
        return self.linear(x)


class LogisticRegression(nnx.Module):
    """One logit per image. Input ``(B, 28, 28) float32``; output ``(B, 1)`` logits."""

    def __init__(self, in_features: int = 784, *, rngs: nnx.Rngs):
        save_hyperparameters(self)  # (load_from_checkpoint rebuilds it from a checkpoint)
        self.input_shape = (28, 28)
        self.linear = dense(in_features, 1, rngs)

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


class SoftmaxRegression(nnx.Module):
    """784 -> 10 logits. Input ``(B, 28, 28) float32``; output ``(B, 10)``."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, *, rngs: nnx.Rngs):
        save_hyperparameters(self)  # (load_from_checkpoint rebuilds it from a checkpoint)
        self.input_shape = (28, 28)
        self.linear = dense(in_features, num_classes, rngs)

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1))

"""A small CNN: conv3x3(32) -> ReLU -> pool2 -> conv3x3(64) -> ReLU -> pool2 -> 256 -> 10."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlight.models.init import torch_bias_init, torch_kernel_init
from jaxlight.models.linear import dense

__all__ = ["CNN"]


def conv3x3(in_channels: int, out_channels: int, rngs: nnx.Rngs) -> nnx.Conv:
    """3x3, stride 1, padding 1 ('SAME'), PyTorch's initialisation. Kernel ``HWIO``; PyTorch's
    ``Conv2d.weight`` is ``OIHW``."""
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(3, 3),
        padding="SAME",
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_channels * 9),
        rngs=rngs,
    )


class CNN(nnx.Module):
    """Input ``(B, 28, 28) float32``; output ``(B, 10)`` logits.

    Activations are NHWC (Flax's layout; PyTorch's is NCHW). The flatten before ``fc1`` therefore
    orders the 7x7x64 features as (H, W, C), where PyTorch orders them (C, H, W):
    ``jaxlight.interop`` permutes ``fc1``'s rows when converting.
    """

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.input_shape = (28, 28)
        self.conv1 = conv3x3(1, 32, rngs)
        self.conv2 = conv3x3(32, 64, rngs)
        self.fc1 = dense(7 * 7 * 64, 256, rngs)
        self.fc2 = dense(256, num_classes, rngs)

    def __call__(self, x):
        x = x[..., None]  # (B, 28, 28, 1)
        x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)  # (B, 7*7*64) in (H, W, C) order
        return self.fc2(jax.nn.relu(self.fc1(x)))

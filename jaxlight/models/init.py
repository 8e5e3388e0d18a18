"""PyTorch's default initialisation, written for Flax.

Both frameworks draw every model's initial weights from the same distributions, so two runs
initialised independently are the same experiment. We use PyTorch's defaults in both (the
tutorial's, and what most ported models were trained with), not Flax's:

| layer | weight | bias |
| --- | --- | --- |
| ``nn.Linear`` / ``nn.Conv2d`` | ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (kaiming-uniform, a=sqrt(5)) | same bound |
| ``nn.LSTM`` | ``U(-1/sqrt(hidden), 1/sqrt(hidden))`` for all weights and both biases | same |

Flax's own defaults differ (lecun-normal kernels, zero biases); see ``tests/test_models.py``
for the test that the distributions match.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["torch_kernel_init", "torch_bias_init", "uniform_init"]


def uniform_init(bound: float):
    """``U(-bound, bound)`` for any shape."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_kernel_init(key, shape, dtype=jnp.float32):
    """Kernel of shape ``(..., fan_in_part, out)`` (Linear ``(in, out)``, Conv ``HWIO``):
    ``fan_in`` is the product of every dimension but the last, as PyTorch computes it."""
    fan_in = int(np.prod(shape[:-1]))
    return uniform_init(1.0 / math.sqrt(fan_in))(key, shape, dtype)


def torch_bias_init(fan_in: int):
    """A bias initialiser with PyTorch's bound, which depends on the layer's fan-in."""
    return uniform_init(1.0 / math.sqrt(fan_in))

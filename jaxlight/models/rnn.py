"""An LSTM that reads the image row by row (28 steps x 28 features), then a dense layer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlight.models.init import uniform_init
from jaxlight.models.linear import dense

__all__ = ["LSTM", "LSTMClassifier"]


class LSTM(nnx.Module):
    """A single-layer, batch-first LSTM with PyTorch's parameters and gate order.

    Parameters mirror ``torch.nn.LSTM`` one to one, transposed: ``kernel_ih (in, 4H)`` is
    ``weight_ih_l0.T``, ``kernel_hh (H, 4H)`` is ``weight_hh_l0.T``, and both biases are kept
    (``bias_ih``, ``bias_hh``), so conversion round-trips exactly and the parameter count equals
    PyTorch's. The 4H columns are the gates in PyTorch's order: input, forget, cell (g), output.

    Speed: the input projection of all T steps is one ``(B*T, in) @ (in, 4H)`` matmul outside
    the recurrence; only ``h @ kernel_hh`` stays inside the ``lax.scan``.
    """

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        init = uniform_init(1.0 / math.sqrt(hidden))
        self.hidden = hidden
        self.kernel_ih = nnx.Param(init(rngs.params(), (in_features, 4 * hidden)))
        self.kernel_hh = nnx.Param(init(rngs.params(), (hidden, 4 * hidden)))
        self.bias_ih = nnx.Param(init(rngs.params(), (4 * hidden,)))
        self.bias_hh = nnx.Param(init(rngs.params(), (4 * hidden,)))

    def __call__(self, x):
        """``x: (B, T, in)`` -> ``(outputs (B, T, H), (h_T, c_T))``."""
        batch = x.shape[0]
        # PyTorch adds the two biases to the two products separately; same sum, same order.
        gates_x = x @ self.kernel_ih[...] + self.bias_ih[...]  # (B, T, 4H)
        kernel_hh, bias_hh = self.kernel_hh[...], self.bias_hh[...]

        def cell(carry, gx):
            h, c = carry
            gates = gx + (h @ kernel_hh + bias_hh)
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((batch, self.hidden), x.dtype)
        (h, c), hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(gates_x, 0, 1))
        return jnp.swapaxes(hs, 0, 1), (h, c)


class LSTMClassifier(nnx.Module):
    """Input ``(B, 28, 28) float32`` read as 28 rows of 28 pixels; output ``(B, 10)`` logits
    from the last hidden state."""

    def __init__(self, in_features: int = 28, hidden: int = 128, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.input_shape = (28, in_features)
        self.lstm = LSTM(in_features, hidden, rngs=rngs)
        self.fc = dense(hidden, num_classes, rngs)

    def __call__(self, x):
        _, (h, _) = self.lstm(x)
        return self.fc(h)

"""An LSTM that reads the image row by row (28 steps x 28 features), then a dense layer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlight.hparams import save_hyperparameters
from jaxlight.models.init import uniform_init
from jaxlight.models.linear import dense

__all__ = ["LSTM", "LSTMClassifier", "lstm_recurrence"]


def _cell(gates, c):
    """One LSTM cell from its pre-activations ``gates``, four ``(B, H)`` blocks in torch's order
    i, f, g, o."""
    i, f, g, o = gates
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c + i * g
    tanh_c = jnp.tanh(c)
    return o * tanh_c, c, (i, f, g, o, tanh_c)


def _gate_blocks(a):
    """The four gates' column blocks of ``a (..., 4H)``."""
    h = a.shape[-1] // 4
    return tuple(a[..., j * h:(j + 1) * h] for j in range(4))


def _recurrence_fwd(gates_x, kernel_hh, bias_hh, h0, c0):
    # One (B, H) @ (H, H) product per gate instead of one (B, H) @ (H, 4H): on XLA:CPU each
    # lands in its own fusion with its gate's addition and activation, and the step measured
    # 5-8% faster (benchmarks/README.md). bias_hh joins the input projection outside the loop.
    kernels = _gate_blocks(kernel_hh)

    def step(carry, gx):
        h, c = carry
        i, f, g, o = (gx[j] + h @ kernels[j] for j in range(4))
        h_new, c_new, acts = _cell((i, f, g, o), c)
        return (h_new, c_new), (h_new, c, acts)

    (_, c), (hs, c_prev, acts) = jax.lax.scan(step, (h0, c0), _gate_blocks(gates_x + bias_hh))
    return (hs, c), (kernel_hh, h0, hs, c_prev, acts)


def _recurrence_bwd(residuals, cotangents):
    kernel_hh, h0, hs, c_prev, acts = residuals
    d_hs, d_c_last = cotangents
    # kernel_hh.T materialised once, outside the loop; inside it the dot would otherwise take
    # the transposed operand (and repack it) at every one of the T steps.
    kernel_hh_t = jax.lax.optimization_barrier(kernel_hh.T)

    def step(carry, xs):
        dh, dc = carry
        dh_out, c_before, (i, f, g, o, tanh_c) = xs
        dh = dh + dh_out
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        d_gates = jnp.concatenate([dc * g * i * (1 - i), dc * c_before * f * (1 - f),
                                   dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], axis=-1)
        return (d_gates @ kernel_hh_t, dc * f), d_gates

    (dh0, dc0), d_gates = jax.lax.scan(step, (jnp.zeros_like(h0), d_c_last), (d_hs, c_prev, acts), reverse=True)
    # The weight gradient of all T steps as one (H, T*B) @ (T*B, 4H) matmul after the loop,
    # instead of T small matmuls accumulated inside it (what autodiff of the scan emits).
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    d_kernel_hh = h_prev.reshape(-1, h_prev.shape[-1]).T @ d_gates.reshape(-1, d_gates.shape[-1])
    return d_gates, d_kernel_hh, d_gates.sum((0, 1)), dh0, dc0


@jax.custom_vjp
def lstm_recurrence(gates_x, kernel_hh, bias_hh, h0, c0):
    """The recurrent half of an LSTM layer, with a hand-written backward pass.

    Args:
        gates_x: ``(T, B, 4H)`` float32, the input projection ``x_t @ kernel_ih + bias_ih`` of
            every step (computed outside, as one matmul).
        kernel_hh: ``(H, 4H)``; bias_hh: ``(4H,)``; h0, c0: ``(B, H)``.

    Returns:
        ``(hs (T, B, H), c_T (B, H))``; ``hs[-1]`` is ``h_T``.

    Why by hand: on XLA:CPU, autodiff of ``lax.scan`` accumulates ``h_{t-1}^T @ d_gates_t``
    into the kernel gradient inside the backward loop, T small matmuls (and in a fused epoch a
    while loop nested in another). Here the backward loop only carries ``d_gates @ kernel_hh.T``;
    the kernel and bias gradients are one matmul / one sum over all steps afterwards. Same sums
    (up to float reassociation, ~1e-7 relative); the gradient w.r.t. ``gates_x`` flows on to
    ``kernel_ih``, ``bias_ih`` and ``x`` through ordinary autodiff.
    """
    (hs, c), _ = _recurrence_fwd(gates_x, kernel_hh, bias_hh, h0, c0)
    return hs, c


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


class LSTM(nnx.Module):
    """A single-layer, batch-first LSTM with PyTorch's parameters and gate order.

    Parameters mirror ``torch.nn.LSTM`` one to one, transposed: ``kernel_ih (in, 4H)`` is
    ``weight_ih_l0.T``, ``kernel_hh (H, 4H)`` is ``weight_hh_l0.T``, and both biases are kept
    (``bias_ih``, ``bias_hh``), so conversion round-trips exactly and the parameter count equals
    PyTorch's. The 4H columns are the gates in PyTorch's order: input, forget, cell (g), output.

    Speed: the input projection of all T steps is one ``(T*B, in) @ (in, 4H)`` matmul outside
    the recurrence, time-major so that the scan reads it without a transpose; only
    ``h @ kernel_hh`` stays inside the ``lax.scan`` (one product per gate), and the backward pass
    (``lstm_recurrence``) keeps only ``d_gates @ kernel_hh.T`` (transposed once, before the
    loop) inside its loop.
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
        # Time-major from the start: swapping the small input (B, T, in) instead of the
        # projection (B, T, 4H) saves a transpose of 4H/in times the data, forward and backward.
        # PyTorch adds the two biases to the two products separately; here bias_hh joins the
        # input projection before the loop (the same sum in another float order, ~1 ulp).
        gates_x = jnp.swapaxes(x, 0, 1) @ self.kernel_ih[...] + self.bias_ih[...]  # (T, B, 4H)
        zeros = jnp.zeros((batch, self.hidden), x.dtype)
        hs, c = lstm_recurrence(gates_x, self.kernel_hh[...], self.bias_hh[...], zeros, zeros)
        h = hs[-1]
        return jnp.swapaxes(hs, 0, 1), (h, c)


class LSTMClassifier(nnx.Module):
    """Input ``(B, 28, 28) float32`` read as 28 rows of 28 pixels; output ``(B, 10)`` logits
    from the last hidden state."""

    def __init__(self, in_features: int = 28, hidden: int = 128, num_classes: int = 10, *, rngs: nnx.Rngs):
        save_hyperparameters(self)  # (load_from_checkpoint rebuilds it from a checkpoint)
        self.input_shape = (28, in_features)
        self.lstm = LSTM(in_features, hidden, rngs=rngs)
        self.fc = dense(hidden, num_classes, rngs)

    def __call__(self, x):
        _, (h, _) = self.lstm(x)
        return self.fc(h)

"""Two frozen versions of the CNN and LSTM (as of commits 2f4a885 and 0fffecc), so that the
current models can be timed against them in the same process (``python -m benchmarks.ab``). Same parameters, names and initialisation as the
library's models; only the compiled code differs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlight.models import build_model
from jaxlight.models.cnn import CNN, _patches, max_pool_2x2
from jaxlight.models.rnn import LSTMClassifier
from jaxlight.models.rnn import _recurrence_bwd as _recurrence_bwd_current

__all__ = ["STAGES", "build_baseline"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, padding):
    """XLA's convolution (the library's forward pass until the patches matmul replaced it)."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _conv2d_fwd(x, kernel, padding):
    return _conv(x, kernel, padding), (x, kernel)


def _flipped_kernel_dx(dy, kernel, padding):
    """The input gradient as autodiff emits it: dy convolved with the spatially flipped kernel,
    in/out channels swapped, padded back to x's size."""
    kh, kw = kernel.shape[:2]
    back_pad = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
                (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    flipped = jax.lax.optimization_barrier(jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    return _conv(dy, flipped, back_pad)


def _bwd_2f4a885(padding, residuals, dy):
    """2f4a885: the kernel gradient as a convolution in XLA:CPU's fast layout (transposes
    around it, kept apart by optimization barriers)."""
    x, kernel = residuals
    xt, dyt = jax.lax.optimization_barrier((jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3))))
    dk = _conv(xt, dyt, padding)
    return _flipped_kernel_dx(dy, kernel, padding), jnp.transpose(dk, (1, 2, 0, 3))


def _bwd_0fffecc(padding, residuals, dy):
    """0fffecc: the kernel gradient ``patches(x)^T @ dy``."""
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    dk = _patches(x, kh, kw, padding).T @ dy.reshape(-1, cout)
    return _flipped_kernel_dx(dy, kernel, padding), dk.reshape(kh, kw, cin, cout)


def _conv_general(bwd):
    """A ``conv_general_dilated`` for ``nnx.Conv`` in the CNN's case (stride 1, NHWC, explicit
    pads): XLA's convolution forward, ``bwd`` as its gradient."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def conv(x, kernel, padding):
        return _conv(x, kernel, padding)

    conv.defvjp(_conv2d_fwd, bwd)
    return lambda lhs, rhs, window_strides, padding, **kwargs: conv(
        lhs, rhs, tuple(tuple(int(p) for p in pair) for pair in padding))


class _FrozenCNN(CNN):
    """The CNN with a frozen convolution and a frozen forward pass (ReLU before the pool)."""

    conv_general = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for conv in (self.conv1, self.conv2):
            conv.conv_general_dilated = self.conv_general

    def __call__(self, x):
        x = x[..., None]
        x = max_pool_2x2(jax.nn.relu(self.conv1(x)))
        x = max_pool_2x2(jax.nn.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(x)))


class CNN0(_FrozenCNN):
    """2f4a885's CNN: the transposed-layout kernel gradient."""

    conv_general = staticmethod(_conv_general(_bwd_2f4a885))


class CNN1(_FrozenCNN):
    """0fffecc's CNN: XLA's convolution forward and for the input gradient, the kernel gradient
    as a matmul."""

    conv_general = staticmethod(_conv_general(_bwd_0fffecc))


# -- the LSTM of 2f4a885 -------------------------------------------------------------------------

def _cell(gates, c):
    """One LSTM cell from its pre-activations ``gates (B, 4H)`` (torch's order i, f, g, o)."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c + i * g
    tanh_c = jnp.tanh(c)
    return o * tanh_c, c, (i, f, g, o, tanh_c)


def _recurrence_fwd(gates_x, kernel_hh, bias_hh, h0, c0):
    def step(carry, gx):
        h, c = carry
        h_new, c_new, acts = _cell(gx + (h @ kernel_hh + bias_hh), c)
        return (h_new, c_new), (h_new, c, acts)

    (_, c), (hs, c_prev, acts) = jax.lax.scan(step, (h0, c0), gates_x)
    return (hs, c), (kernel_hh, h0, hs, c_prev, acts)


def _recurrence_bwd(residuals, cotangents):
    kernel_hh, h0, hs, c_prev, acts = residuals
    d_hs, d_c_last = cotangents

    def step(carry, xs):
        dh, dc = carry
        dh_out, c_before, (i, f, g, o, tanh_c) = xs
        dh = dh + dh_out
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        d_gates = jnp.concatenate([dc * g * i * (1 - i), dc * c_before * f * (1 - f),
                                   dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], axis=-1)
        return (d_gates @ kernel_hh.T, dc * f), d_gates

    (dh0, dc0), d_gates = jax.lax.scan(step, (jnp.zeros_like(h0), d_c_last), (d_hs, c_prev, acts), reverse=True)
    # The weight gradient of all T steps as one (H, T*B) @ (T*B, 4H) matmul after the loop,
    # instead of T small matmuls accumulated inside it (what autodiff of the scan emits).
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    d_kernel_hh = h_prev.reshape(-1, h_prev.shape[-1]).T @ d_gates.reshape(-1, d_gates.shape[-1])
    return d_gates, d_kernel_hh, d_gates.sum((0, 1)), dh0, dc0


def _lstm_recurrence(bwd):
    """A frozen ``lstm_recurrence``: 2f4a885's forward loop (one (B, H) @ (H, 4H) product per
    step, bias_hh added inside the loop) with ``bwd`` as its backward pass."""
    @jax.custom_vjp
    def recurrence(gates_x, kernel_hh, bias_hh, h0, c0):
        (hs, c), _ = _recurrence_fwd(gates_x, kernel_hh, bias_hh, h0, c0)
        return hs, c

    recurrence.defvjp(_recurrence_fwd, bwd)
    return recurrence


class _FrozenLSTM(LSTMClassifier):
    """The LSTM classifier with a frozen recurrence and input projection."""

    recurrence = None
    time_major_projection = False

    def __call__(self, x):
        lstm = self.lstm
        if self.time_major_projection:
            gates_x = jnp.swapaxes(x, 0, 1) @ lstm.kernel_ih[...] + lstm.bias_ih[...]
        else:
            gates_x = jnp.swapaxes(x @ lstm.kernel_ih[...] + lstm.bias_ih[...], 0, 1)
        zeros = jnp.zeros((x.shape[0], lstm.hidden), x.dtype)
        hs, _ = self.recurrence(gates_x, lstm.kernel_hh[...], lstm.bias_hh[...], zeros, zeros)
        return self.fc(hs[-1])


class LSTM0(_FrozenLSTM):
    """2f4a885's LSTM classifier: batch-major input projection, kernel transposed in the loop."""

    recurrence = staticmethod(_lstm_recurrence(_recurrence_bwd))


class LSTM1(_FrozenLSTM):
    """0fffecc's LSTM classifier: time-major projection, the backward's kernel transposed once
    (the library's backward pass today)."""

    recurrence = staticmethod(_lstm_recurrence(_recurrence_bwd_current))
    time_major_projection = True


# The intermediate versions of each model, oldest first: ``benchmarks.ab`` times each against
# the current code, so every change's share is measured in the same run.
STAGES = {"cnn": (("2f4a885", CNN0), ("0fffecc", CNN1)), "lstm": (("2f4a885", LSTM0), ("0fffecc", LSTM1))}


def build_baseline(name: str, seed: int = 0, stage: int = 0):
    """Version ``stage`` of model ``name`` from ``STAGES`` (0: as of 2f4a885; the current model
    where nothing changed)."""
    from flax import nnx

    if name in STAGES:
        return STAGES[name][stage][1](rngs=nnx.Rngs(params=seed))
    return build_model(name, seed)

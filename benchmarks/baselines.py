"""The CNN and LSTM as they were before issue 12's speed work (commit 2f4a885), kept so that
every speed change can be measured against its baseline in the same process
(``python -m benchmarks.ab``). Same parameters, names and initialisation as the library's
models; only the compiled code differs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlight.models import build_model
from jaxlight.models.cnn import CNN, _conv, max_pool_2x2

__all__ = ["build_baseline", "BASELINES"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d(x, kernel, padding):
    return _conv(x, kernel, padding)


def _conv2d_fwd(x, kernel, padding):
    return _conv(x, kernel, padding), (x, kernel)


def _conv2d_bwd(padding, residuals, dy):
    """2f4a885: the kernel gradient as a convolution in XLA:CPU's fast layout (transposes
    around it, kept apart by optimization barriers)."""
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    back_pad = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
                (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    flipped = jax.lax.optimization_barrier(jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    dx = _conv(dy, flipped, back_pad)
    xt, dyt = jax.lax.optimization_barrier((jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3))))
    dk = _conv(xt, dyt, padding)
    return dx, jnp.transpose(dk, (1, 2, 0, 3))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d_transposed_layout(lhs, rhs, window_strides, padding, **kwargs):
    """The 2f4a885 ``conv2d_nhwc`` for the CNN's case (stride 1, NHWC, explicit pads)."""
    return _conv2d(lhs, rhs, tuple(tuple(int(p) for p in pair) for pair in padding))


class CNN0(CNN):
    """2f4a885's CNN: ReLU before the pool, the transposed-layout kernel gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for conv in (self.conv1, self.conv2):
            conv.conv_general_dilated = conv2d_transposed_layout

    def __call__(self, x):
        x = x[..., None]
        x = max_pool_2x2(jax.nn.relu(self.conv1(x)))
        x = max_pool_2x2(jax.nn.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(x)))


BASELINES = {"cnn": CNN0}


def build_baseline(name: str, seed: int = 0):
    """The 2f4a885 version of model ``name`` (the current one where nothing changed)."""
    from flax import nnx

    if name in BASELINES:
        return BASELINES[name](rngs=nnx.Rngs(params=seed))
    return build_model(name, seed)

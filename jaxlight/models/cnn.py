"""A small CNN: conv3x3(32) -> ReLU -> pool2 -> conv3x3(64) -> ReLU -> pool2 -> 256 -> 10."""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlight.hparams import save_hyperparameters
from jaxlight.models.init import torch_bias_init, torch_kernel_init
from jaxlight.models.linear import dense

__all__ = ["CNN", "conv2d_nhwc", "max_pool_2x2"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _patches(x, kh, kw, padding):
    """im2col: ``x (B, H, W, C)`` -> ``(B*H'*W', kh*kw*C)``, the (i, j, c) order of an HWIO
    kernel reshaped to ``(kh*kw*C, Cout)``; one row per output pixel."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    cols = [xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1).reshape(b * ho * wo, kh * kw * c)


def _col2im(cols, x_shape, kh, kw, padding):
    """The adjoint of ``_patches``: ``cols (B, H', W', kh*kw*C)`` -> ``(B, H, W, C)``, each
    column block added back at the input pixels it was read from (padding dropped)."""
    b, h, w, c = x_shape
    hp, wp = h + sum(padding[0]), w + sum(padding[1])
    ho, wo = hp - kh + 1, wp - kw + 1
    cols = cols.reshape(b, ho, wo, kh * kw, c)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = jnp.pad(cols[:, :, :, i * kw + j, :], ((0, 0), (i, hp - ho - i), (j, wp - wo - j), (0, 0)))
            out = term if out is None else out + term
    return out[:, padding[0][0]:padding[0][0] + h, padding[1][0]:padding[1][0] + w, :]


def _conv(x, kernel, padding):
    """The convolution as patches @ kernel: one ``(B*H'*W', kh*kw*Cin) @ (kh*kw*Cin, Cout)``."""
    kh, kw, cin, cout = kernel.shape
    y = _patches(x, kh, kw, padding) @ kernel.reshape(kh * kw * cin, cout)
    b, h, w, _ = x.shape
    return y.reshape(b, h + sum(padding[0]) - kh + 1, w + sum(padding[1]) - kw + 1, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d(x, kernel, padding):
    return _conv(x, kernel, padding)


def _conv2d_fwd(x, kernel, padding):
    # Only x is kept: the backward pass forms the patches again, which measured faster than
    # keeping the 9x larger patches alive from the forward to the backward pass.
    return _conv(x, kernel, padding), (x, kernel)


def _conv2d_bwd(padding, residuals, dy):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    dy2 = dy.reshape(-1, cout)
    # Kernel gradient: patches(x)^T @ dy, contracting over every output pixel of the batch.
    dk = _patches(x, kh, kw, padding).T @ dy2
    # Input gradient: dy @ kernel^T gives each output pixel's contribution to its kh*kw*Cin
    # input values, which col2im adds back in place.
    dx = _col2im(dy2 @ kernel.reshape(kh * kw * cin, cout).T, x.shape, kh, kw, padding)
    return dx, dk.reshape(kh, kw, cin, cout)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d_nhwc(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` as matrix products, with a hand-written gradient that stays
    fast inside ``lax.scan``.

    A drop-in for ``nnx.Conv(conv_general_dilated=...)``. The forward pass is the input's
    patches (im2col) times the kernel, one matmul; the kernel gradient is ``patches^T @ dy``;
    the input gradient is ``dy @ kernel^T`` added back in place (col2im). Same sums as
    autodiff of ``lax.conv_general_dilated`` in a different float order (nearer the float64
    value than autodiff's loop nest inside a scan). Why: on XLA:CPU a matmul runs faster
    than the library's convolution and its transposes (the 2-core CPU's whole CNN step, in
    a fused epoch: 1.2-1.3x, ``benchmarks/README.md``), and autodiff's kernel gradient falls
    back to a naive loop nest inside a while loop, so a fused CNN epoch needs this.
    Memory: the backward pass forms the patches again, ``kh*kw`` times the input, for one
    layer at a time; nothing larger than the input is kept between the passes.
    Handles the case the models use (2-D, NHWC/HWIO, stride 1, explicit padding, no dilation,
    no groups) on the CPU backend. A negative padding crops the input first (a slice), then
    the rest pads: XLA:CPU's own convolution with a negative padding returns different sums
    from one process to the next (jax 0.10.2), the slice and the patches do not. Anything
    else, and every call on a GPU or TPU
    (whose vendor convolutions are fast, forward and backward, inside loops too), goes to
    ``lax.conv_general_dilated`` unchanged, with autodiff's gradient.

    Args:
        lhs: ``(B, H, W, Cin)`` float32. rhs: ``(kh, kw, Cin, Cout)``.
        padding: ``((lo, hi), (lo, hi))``.

    Returns:
        ``(B, H', W', Cout)``.
    """
    simple = (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and dimension_numbers is not None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and tuple(window_strides) == (1, 1)
        and not isinstance(padding, str)
        and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1
        and precision is None
        and kwargs.get("preferred_element_type") is None
    )
    if not simple:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, **kwargs)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if any(p < 0 for pair in padding for p in pair):
        (top, bottom), (left, right) = padding
        _, h, w, _ = lhs.shape
        lhs = lhs[:, max(-top, 0):h - max(-bottom, 0), max(-left, 0):w - max(-right, 0)]
        padding = tuple((max(lo, 0), max(hi, 0)) for lo, hi in padding)
    return _conv2d(lhs, rhs, padding)


def _windows(x):
    """``(B, H, W, C)`` -> ``(B, H/2, 2, W/2, 2, C)``: each 2x2 window on axes 2 and 4."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x):
    """2x2 max pooling, stride 2, of ``x (B, H, W, C)`` with even H and W -> ``(B, H/2, W/2, C)``.

    The same values as ``nnx.max_pool(x, (2, 2), strides=(2, 2))`` and the same gradient as
    PyTorch's ``max_pool2d``, ties included: all of a window's gradient goes to its *first*
    maximum in row-major order (torch scans the window row by row and keeps the first). MNIST's
    saturated regions make exact non-zero ties after a convolution, so this matters for parity:
    autodiff of a reshape + max would split the gradient among tied entries, and that pushed
    the CNN's 100-step SGD-momentum trajectory off torch's (2.1e-3 at step 95).

    Why not ``nnx.max_pool``: ``reduce_window``'s gradient lowers on XLA:CPU to a variadic
    reduce-window over (value, index) tuples. Here the forward is a reshape and a max and the
    backward four elementwise masks: the whole CNN step inside ``lax.scan`` measured 81 -> 58 ms
    on the 2-core CPU (batch 64).
    """
    return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
    top = max_pool_2x2(x)
    return top, (x, top)


def _max_pool_bwd(residuals, dy):
    x, top = residuals
    win = _windows(x)
    # Row-major order within a window: (0, 0), (0, 1), (1, 0), (1, 1); each entry gets dy only
    # when it is a maximum and no earlier entry is.
    grads, taken = [], jnp.zeros(top.shape, bool)
    for i in (0, 1):
        for j in (0, 1):
            is_max = win[:, :, i, :, j, :] == top
            grads.append(jnp.where(is_max & ~taken, dy, jnp.zeros_like(dy)))
            taken = taken | is_max
    rows = [jnp.stack(grads[0:2], axis=3), jnp.stack(grads[2:4], axis=3)]  # (B, H/2, W/2, 2, C)
    return (jnp.stack(rows, axis=2).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv3x3(in_channels: int, out_channels: int, rngs: nnx.Rngs) -> nnx.Conv:
    """3x3, stride 1, padding 1 ('SAME'), PyTorch's initialisation. Kernel ``HWIO``; PyTorch's
    ``Conv2d.weight`` is ``OIHW``. The padding is spelled out (it is 'SAME' for 3x3) because
    ``conv2d_nhwc``, the scan-friendly gradient, takes explicit pads."""
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(3, 3),
        padding=((1, 1), (1, 1)),
        conv_general_dilated=conv2d_nhwc,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_channels * 9),
        rngs=rngs,
    )


class CNN(nnx.Module):
    """Input ``(B, 28, 28) float32``; output ``(B, 10)`` logits.

    Activations are NHWC (Flax's layout; PyTorch's is NCHW). The flatten before ``fc1`` therefore
    orders the 7x7x64 features as (H, W, C), where PyTorch orders them (C, H, W):
    ``jaxlight.interop`` permutes ``fc1``'s rows when converting; :attr:`torch_flatten` says so
    to ``jaxlight.bridge.layout_for``, which derives the layout from this model and its torch twin.
    """

    # {torch Linear name: (C, H, W)} of the feature maps torch flattens NCHW where this model
    # flattens NHWC (``jaxlight.interop.derive_layout``'s ``flatten``).
    torch_flatten: ClassVar[dict] = {"fc1": (64, 7, 7)}

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        save_hyperparameters(self)  # (load_from_checkpoint rebuilds it from a checkpoint)
        self.input_shape = (28, 28)
        self.conv1 = conv3x3(1, 32, rngs)
        self.conv2 = conv3x3(32, 64, rngs)
        self.fc1 = dense(7 * 7 * 64, 256, rngs)
        self.fc2 = dense(256, num_classes, rngs)

    def __call__(self, x):
        x = x[..., None]  # (B, 28, 28, 1)
        # ReLU before the pool, as torch does. Pooling first would give bit-identical values and
        # gradients with a quarter of the ReLU work, but it measured slower in a fused epoch, in
        # CPU time, three times out of three.
        x = max_pool_2x2(jax.nn.relu(self.conv1(x)))
        x = max_pool_2x2(jax.nn.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)  # (B, 7*7*64) in (H, W, C) order
        return self.fc2(jax.nn.relu(self.fc1(x)))

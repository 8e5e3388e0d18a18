"""NNX layers with PyTorch's constructor arguments and PyTorch's arithmetic: what the source
written by ``jaxlight.port`` builds its models from.

Generated source imports this module as ``nn`` (``from jaxlight.bridge.porting import nn``), so that a
ported ``__init__`` reads like the torch one: ``self.conv1 = nn.Conv2d(3, 64, kernel_size=(7, 7),
stride=(2, 2), padding=(3, 3), bias=False, rngs=rngs)``. Each class takes torch's arguments,
holds torch's parameters under Flax's names and layouts (below), and computes what the torch
layer computes, in train and in eval mode:

| torch | here | parameters (torch -> NNX) | input |
| --- | --- | --- | --- |
| ``Linear`` | :class:`Linear` (an ``nnx.Linear``) | ``weight (out, in)`` -> ``kernel (in, out)`` | torch layout |
| ``Conv1d/2d`` | :class:`Conv1d`, :class:`Conv2d` (``nnx.Conv``) | ``weight`` OI(H)W -> ``kernel`` (H)WIO | channels-last |
| ``ConvTranspose1d/2d`` | :class:`ConvTranspose1d`, :class:`ConvTranspose2d` | ``weight`` IO(H)W -> ``kernel`` (H)WOI | channels-last |
| ``BatchNorm1d/2d/3d`` | :class:`BatchNorm1d`... (``nnx.BatchNorm``) | ``weight``/``bias`` -> ``scale``/``bias``; ``running_mean/var`` -> ``mean``/``var`` | channels-last |
| ``LayerNorm``, ``GroupNorm`` | :class:`LayerNorm`, :class:`GroupNorm` | ``weight``/``bias`` -> ``scale``/``bias`` | torch layout |
| ``Embedding`` | :class:`Embedding` (``nnx.Embed``) | ``weight`` -> ``embedding`` | ids |
| ``LSTM``, ``GRU``, ``RNN`` | :class:`LSTM`, :class:`GRU`, :class:`RNN` | ``weight_ih_l0`` -> ``kernel_ih_l0`` (transposed), biases kept | torch layout |
| ``MultiheadAttention`` | :class:`MultiheadAttention` | ``in_proj_weight`` -> ``in_proj_kernel`` (transposed) | torch layout |
| ``TransformerEncoder(Layer)`` | :class:`TransformerEncoder`, :class:`TransformerEncoderLayer` | its parts' | torch layout |
| ``Dropout`` | :class:`Dropout` (``nnx.Dropout``) | | any |

"Channels-last": the port moves feature maps to ``(B, *spatial, C)`` before the first
convolution and back to torch's layout where a torch-layout operation needs it
(``functional.channels_last`` / ``channels_first`` in the generated ``__call__``): XLA's
convolutions and jaxlight's ``conv2d_nhwc`` / ``max_pool_2x2`` fast paths are channels-last.

Train / eval: ``model.train()`` / ``model.eval()`` (NNX's ``deterministic`` and
``use_running_average``) switch :class:`Dropout` and the batch norms, as torch's
``module.train()`` / ``.eval()`` switch theirs. The batch norms keep torch's statistics exactly:
normalise with the biased batch variance, update ``var`` with the *unbiased* one, momentum
``m`` weighing the new batch (NNX's ``momentum`` attribute holds ``1 - m``). jaxlight's step runs
them on padded batches through their ``mask=`` argument (``jaxlight.layers``).

Initialisation follows torch's defaults where it is cheap to (``jaxlight.models.init``); a
port's weights come from the torch module anyway.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlight.models.init import torch_bias_init, torch_kernel_init, uniform_init
from jaxlight.bridge.porting import functional as F

__all__ = [
    "Linear", "Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LayerNorm", "GroupNorm", "Embedding", "EmbeddingBag", "LSTM", "GRU", "RNN", "MultiheadAttention",
    "TransformerEncoderLayer", "TransformerEncoder", "Dropout",
    "Dropout1d", "Dropout2d", "Sequential", "NamedSequential", "Buffer", "PReLU", "Activation", "Identity", "Flatten", "Unflatten",
    "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "Upsample", "PixelShuffle",
    "ReLU", "ReLU6", "GELU", "SiLU", "Tanh", "Sigmoid", "LeakyReLU", "ELU", "SELU", "CELU", "Softplus", "Mish",
    "Hardswish", "Hardsigmoid", "Hardtanh", "LogSigmoid", "Softmax", "LogSoftmax", "GLU", "Tanhshrink", "Softsign",
]


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class Buffer(nnx.BatchStat):
    """A torch buffer registered outside a batch norm (a mask, position ids, a fixed table):
    part of the model's state (``nnx.BatchStat``, so it is saved, converted and never trained)."""


# ----------------------------------------------------------------------------------------- #
# Dense, convolutions


class Linear(nnx.Linear):
    """``torch.nn.Linear(in_features, out_features, bias)``: ``x @ kernel + bias``; ``kernel``
    is torch's ``weight`` transposed, ``(in, out)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, use_bias=bias, kernel_init=torch_kernel_init,
                         bias_init=torch_bias_init(in_features), rngs=rngs)


def _conv_padding(padding, kernel, dilation, nd: int) -> tuple:
    """torch's ``padding`` (int, tuple, ``'same'``, ``'valid'``) as ``((lo, hi), ...)``; torch's
    ``'same'`` puts the odd element on the right, as XLA's ``'SAME'`` does."""
    if padding == "valid":
        return ((0, 0),) * nd
    if padding == "same":
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return tuple((p, p) for p in _tuple(padding, nd))


class _ConvNd(nnx.Conv):
    nd = 2
    port_layout = "cl"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, rngs: nnx.Rngs):
        from jaxlight.models.cnn import conv2d_nhwc

        nd = self.nd
        kernel, stride, dilation = _tuple(kernel_size, nd), _tuple(stride, nd), _tuple(dilation, nd)
        pads = _conv_padding(padding, kernel, dilation, nd)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode {padding_mode!r}")
        fan_in = in_channels // groups * math.prod(kernel)
        super().__init__(in_channels, out_channels, kernel, stride,
                         padding=pads if padding_mode == "zeros" else ((0, 0),) * nd,
                         kernel_dilation=dilation, feature_group_count=groups, use_bias=bias,
                         kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in),
                         conv_general_dilated=conv2d_nhwc if nd == 2 else jax.lax.conv_general_dilated, rngs=rngs)
        self.padding_mode = padding_mode
        self.mode_pads = pads

    def __call__(self, x):
        """``x``: channels-last ``(B, *spatial, C_in)`` -> ``(B, *spatial', C_out)``."""
        if self.padding_mode != "zeros":
            mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[self.padding_mode]
            x = jnp.pad(x, [(0, 0), *self.mode_pads, (0, 0)], mode=mode)
        return super().__call__(x)


class Conv1d(_ConvNd):
    """``torch.nn.Conv1d`` on channels-last ``(B, L, C)``; ``kernel (K, C_in/groups, C_out)``."""

    nd = 1


class Conv2d(_ConvNd):
    """``torch.nn.Conv2d`` on channels-last ``(B, H, W, C)``; ``kernel`` HWIO
    ``(kh, kw, C_in/groups, C_out)``. Stride 1 without dilation or groups runs
    ``jaxlight.models.cnn.conv2d_nhwc`` (the hand-written CNN's fast path on XLA:CPU)."""

    nd = 2


class _ConvTransposeNd(nnx.Module):
    nd = 2
    port_layout = "cl"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", *, rngs: nnx.Rngs):
        if padding_mode != "zeros":
            raise ValueError("ConvTranspose supports padding_mode='zeros' only (as torch)")
        nd = self.nd
        self.kernel_size, self.stride = _tuple(kernel_size, nd), _tuple(stride, nd)
        self.padding, self.output_padding = _tuple(padding, nd), _tuple(output_padding, nd)
        self.dilation, self.groups = _tuple(dilation, nd), groups
        self.in_channels, self.out_channels = in_channels, out_channels
        # torch's fan-in for this weight (I, O/g, *k) is (O/g) * prod(k).
        fan_in = out_channels // groups * math.prod(self.kernel_size)
        init = uniform_init(1.0 / math.sqrt(fan_in))
        self.kernel = nnx.Param(init(rngs.params(), (*self.kernel_size, out_channels // groups, in_channels)))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,))) if bias else None

    def __call__(self, x):
        """``x``: channels-last ``(B, *spatial, C_in)``; torch's output size
        ``(n - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``."""
        nd, g = self.nd, self.groups
        k = self.kernel[...]  # (*k, O/g, I)
        ks = k.shape[:nd]
        # The transposed convolution is the convolution of the stride-dilated input with the
        # flipped kernel, in and out channels swapped group by group.
        k = k.reshape(*ks, k.shape[nd], g, self.in_channels // g)
        k = k.transpose(*range(nd), nd + 2, nd + 1, nd)  # (*k, I/g, g, O/g)
        k = k.reshape(*ks, self.in_channels // g, self.out_channels)
        k = jnp.flip(k, axis=tuple(range(nd)))
        pads = [(d * (kk - 1) - p, d * (kk - 1) - p + op)
                for kk, p, op, d in zip(ks, self.padding, self.output_padding, self.dilation)]
        spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[nd]
        y = jax.lax.conv_general_dilated(x, k, (1,) * nd, pads, lhs_dilation=self.stride,
                                         rhs_dilation=self.dilation, dimension_numbers=spec, feature_group_count=g)
        return y if self.bias is None else y + self.bias[...]


class ConvTranspose1d(_ConvTransposeNd):
    """``torch.nn.ConvTranspose1d`` on channels-last ``(B, L, C)``; ``kernel (K, C_out/groups, C_in)``
    (torch's ``weight (C_in, C_out/groups, K)`` with its axes reversed)."""

    nd = 1


class ConvTranspose2d(_ConvTransposeNd):
    """``torch.nn.ConvTranspose2d`` on channels-last ``(B, H, W, C)``; ``kernel (kh, kw,
    C_out/groups, C_in)`` (torch's ``weight (C_in, C_out/groups, kh, kw)`` with its axes reversed)."""

    nd = 2


# ----------------------------------------------------------------------------------------- #
# Normalisation


class _BatchNorm(nnx.BatchNorm):
    """torch's batch norm on channels-last input (features on the last axis).

    Train mode: normalise with the batch mean and biased variance; update ``mean`` with the
    batch mean and ``var`` with the *unbiased* batch variance (``n / (n - 1)`` times the
    biased one, ``n`` values per feature), as torch updates ``running_mean``/``running_var``.
    (``nnx.BatchNorm`` averages the biased variance.) ``momentum`` here is NNX's, the weight of
    the old average: torch's ``momentum=0.1`` is ``0.9``. Eval mode is ``nnx.BatchNorm``'s.

    ``mask=`` (``nnx.BatchNorm``'s argument, True = counted in the statistics) is honoured
    with the same meaning: jaxlight's step passes it for padded batches (``masked_call``).
    """

    port_layout = "cl"
    masked_call = True  # (jaxlight.layers: __call__ honours mask= as nnx.BatchNorm does)
    unbiased_running_var = True  # (jaxlight.bridge.parity / jaxlight.layers: var averages torch's estimate)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, rngs: nnx.Rngs):
        if momentum is None:
            raise ValueError("momentum=None (torch's cumulative average) is not supported")
        if not track_running_stats:
            raise ValueError("track_running_stats=False is not supported")
        super().__init__(num_features, momentum=1.0 - momentum, epsilon=eps, use_bias=affine, use_scale=affine,
                         use_fast_variance=False, rngs=rngs)

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = self.use_running_average if use_running_average is None else use_running_average
        if running:
            return super().__call__(x, True, mask=mask)
        axes = tuple(range(x.ndim - 1))
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(dtype)
        if mask is None:
            n = jnp.asarray(math.prod(x.shape[:-1]), dtype)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
        else:
            keep = jnp.broadcast_to(mask, x.shape)
            n = jnp.maximum(jnp.sum(keep, axes).astype(dtype), 1.0)
            mean = jnp.sum(jnp.where(keep, xf, 0), axes) / n
            var = jnp.sum(jnp.where(keep, jnp.square(xf - mean), 0), axes) / n
        m = self.momentum
        self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * unbiased)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(jnp.result_type(x.dtype, *(p[...].dtype for p in (self.scale, self.bias) if p is not None)))


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d`` on ``(B, C)`` or channels-last ``(B, L, C)``."""


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d`` on channels-last ``(B, H, W, C)``."""


class BatchNorm3d(_BatchNorm):
    """``torch.nn.BatchNorm3d`` on channels-last ``(B, D, H, W, C)``."""


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias)`` over the last
    ``len(normalized_shape)`` axes; ``scale``/``bias`` are torch's ``weight``/``bias``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 *, rngs: nnx.Rngs | None = None):
        self.normalized_shape = _tuple(normalized_shape, 1)
        self.eps = eps
        self.scale = nnx.Param(jnp.ones(self.normalized_shape)) if elementwise_affine else None
        self.bias = nnx.Param(jnp.zeros(self.normalized_shape)) if elementwise_affine and bias else None

    def __call__(self, x):
        return F.layer_norm(x, self.normalized_shape, None if self.scale is None else self.scale[...],
                            None if self.bias is None else self.bias[...], self.eps)


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm(num_groups, num_channels, eps, affine)`` on torch's layout
    ``(B, C, *)``: statistics per example and group of ``C / num_groups`` channels."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 *, rngs: nnx.Rngs | None = None):
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.scale = nnx.Param(jnp.ones((num_channels,))) if affine else None
        self.bias = nnx.Param(jnp.zeros((num_channels,))) if affine else None

    def __call__(self, x):
        b = x.shape[0]
        g = x.reshape(b, self.num_groups, -1)
        mean = jnp.mean(g, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=-1, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.scale is not None:
            y = y * self.scale[...].reshape(shape) + self.bias[...].reshape(shape)
        return y


# ----------------------------------------------------------------------------------------- #
# Embeddings


class Embedding(nnx.Embed):
    """``torch.nn.Embedding(num_embeddings, embedding_dim, padding_idx)``: rows of
    ``embedding`` (torch's ``weight``). The ``padding_idx`` row gets no gradient, as in torch."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 *, rngs: nnx.Rngs):
        super().__init__(num_embeddings, embedding_dim, embedding_init=jax.nn.initializers.normal(1.0), rngs=rngs)
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx

    def __call__(self, ids):
        out = jnp.take(self.embedding[...], ids, axis=0)
        if self.padding_idx is not None:
            out = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(out), out)
        return out


class EmbeddingBag(nnx.Module):
    """``torch.nn.EmbeddingBag(num_embeddings, embedding_dim, mode)`` on a 2-D ``(B, N)`` input
    (each row one bag, no offsets): the bag's ``sum``, ``mean`` or ``max`` of the rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean", padding_idx: int | None = None,
                 *, rngs: nnx.Rngs):
        self.mode, self.padding_idx = mode, padding_idx
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num_embeddings, embedding_dim)))

    def __call__(self, ids, offsets=None, per_sample_weights=None):
        if offsets is not None or per_sample_weights is not None or ids.ndim != 2:
            raise ValueError("EmbeddingBag: only a 2-D input without offsets or weights is supported")
        rows = jnp.take(self.embedding[...], ids, axis=0)
        keep = jnp.ones(ids.shape, bool) if self.padding_idx is None else ids != self.padding_idx
        rows = jnp.where(keep[..., None], rows, 0.0)
        if self.mode == "sum":
            return rows.sum(1)
        if self.mode == "mean":
            return rows.sum(1) / jnp.maximum(keep.sum(1, keepdims=True), 1)
        return jnp.where(keep[..., None], rows, -jnp.inf).max(1)


# ----------------------------------------------------------------------------------------- #
# Recurrent layers


def _rnn_scan(cell, gates_x, h0, reverse: bool):
    """Scan ``cell(h, gx) -> h`` over time-major ``gates_x (T, B, G)``; returns ``hs (T, B, H)``."""

    def step(h, gx):
        h = cell(h, gx)
        return h, h

    _, hs = jax.lax.scan(step, h0, gates_x, reverse=reverse)
    return hs


class _RNNBase(nnx.Module):
    """The parameters and layer/direction loop shared by :class:`LSTM`, :class:`GRU`, :class:`RNN`."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 *, rngs: nnx.Rngs, **kwargs):
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.directions = 2 if bidirectional else 1
        init = uniform_init(1.0 / math.sqrt(hidden_size))
        g = self.gates * hidden_size
        for layer in range(num_layers):
            n_in = input_size if layer == 0 else hidden_size * self.directions
            for suffix in self._suffixes(layer):
                setattr(self, f"kernel_ih{suffix}", nnx.Param(init(rngs.params(), (n_in, g))))
                setattr(self, f"kernel_hh{suffix}", nnx.Param(init(rngs.params(), (hidden_size, g))))
                if bias:
                    setattr(self, f"bias_ih{suffix}", nnx.Param(init(rngs.params(), (g,))))
                    setattr(self, f"bias_hh{suffix}", nnx.Param(init(rngs.params(), (g,))))
        self.dropout = Dropout(dropout, rngs=rngs) if dropout and num_layers > 1 else None

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    def _params(self, suffix: str):
        zeros = jnp.zeros((self.gates * self.hidden_size,))
        return (getattr(self, f"kernel_ih{suffix}")[...], getattr(self, f"kernel_hh{suffix}")[...],
                getattr(self, f"bias_ih{suffix}")[...] if self.bias else zeros,
                getattr(self, f"bias_hh{suffix}")[...] if self.bias else zeros)

    def __call__(self, x, hx=None):
        """``x``: ``(B, T, in)`` when ``batch_first`` else ``(T, B, in)``. Returns torch's
        ``(output, h_n)`` (``(output, (h_n, c_n))`` for the LSTM), ``h_n`` of shape
        ``(num_layers * directions, B, H)``."""
        if x.ndim != 3:
            raise ValueError(f"{type(self).__name__}: expected a batched 3-D input, got shape {x.shape}")
        seq = jnp.swapaxes(x, 0, 1) if self.batch_first else x  # time-major (T, B, in)
        batch = seq.shape[1]
        states = self._initial(hx, batch, seq.dtype)
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(self._suffixes(layer)):
                state = tuple(s[layer * self.directions + d] for s in states)
                hs, final = self._direction(seq, self._params(suffix), state, reverse=d == 1)
                outs.append(hs)
                finals.append(final)
            seq = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
            if self.dropout is not None and layer < self.num_layers - 1:
                seq = self.dropout(seq)
        out = jnp.swapaxes(seq, 0, 1) if self.batch_first else seq
        stacked = tuple(jnp.stack([f[i] for f in finals]) for i in range(len(finals[0])))
        return out, (stacked if len(stacked) > 1 else stacked[0])

    def _initial(self, hx, batch, dtype):
        n = self.num_layers * self.directions
        zeros = jnp.zeros((n, batch, self.hidden_size), dtype)
        if hx is None:
            return (zeros,) * self.state_count
        return tuple(hx) if self.state_count > 1 else (hx,)

    state_count = 1


class LSTM(_RNNBase):
    """``torch.nn.LSTM``: torch's gate order (input, forget, cell, output), both biases kept.
    Each layer's input projection is one matmul over all steps; the recurrence is
    ``jaxlight.models.rnn.lstm_recurrence`` (the hand-written LSTM's fast path)."""

    gates = 4
    state_count = 2

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 *, rngs: nnx.Rngs):
        if proj_size:
            raise ValueError("LSTM(proj_size>0) is not supported")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, rngs=rngs)

    def _direction(self, seq, params, state, reverse):
        from jaxlight.models.rnn import lstm_recurrence

        k_ih, k_hh, b_ih, b_hh = params
        if reverse:
            seq = jnp.flip(seq, 0)
        hs, c = lstm_recurrence(seq @ k_ih + b_ih, k_hh, b_hh, state[0], state[1])
        h = hs[-1]
        if reverse:
            hs = jnp.flip(hs, 0)
        return hs, (h, c)


class GRU(_RNNBase):
    """``torch.nn.GRU``: torch's gates (reset, update, new) and its ``n = tanh(W_in x + b_in +
    r * (W_hn h + b_hn))`` (the reset gate multiplies the recurrent term with its bias)."""

    gates = 3

    def _direction(self, seq, params, state, reverse):
        k_ih, k_hh, b_ih, b_hh = params
        hidden = self.hidden_size

        def cell(h, gx):
            gh = h @ k_hh + b_hh
            r = jax.nn.sigmoid(gx[:, :hidden] + gh[:, :hidden])
            z = jax.nn.sigmoid(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
            n = jnp.tanh(gx[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
            return (1 - z) * n + z * h

        hs = _rnn_scan(cell, seq @ k_ih + b_ih, state[0], reverse)
        return hs, (hs[0] if reverse else hs[-1],)


class RNN(_RNNBase):
    """``torch.nn.RNN`` (``nonlinearity`` ``'tanh'`` or ``'relu'``)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 *, rngs: nnx.Rngs):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, rngs=rngs)
        self.nonlinearity = nonlinearity

    def _direction(self, seq, params, state, reverse):
        k_ih, k_hh, b_ih, b_hh = params
        act = jnp.tanh if self.nonlinearity == "tanh" else jax.nn.relu
        hs = _rnn_scan(lambda h, gx: act(gx + h @ k_hh + b_hh), seq @ k_ih + b_ih, state[0], reverse)
        return hs, (hs[0] if reverse else hs[-1],)


# ----------------------------------------------------------------------------------------- #
# Attention


class MultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, kdim, vdim,
    batch_first)``, called as torch's: ``(query, key, value, key_padding_mask=None,
    need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False) ->
    (output, weights or None)``.

    Parameters: ``in_proj_kernel (E, 3E)`` (torch's ``in_proj_weight`` transposed; or
    ``q/k/v_proj_kernel`` when ``kdim``/``vdim`` differ), ``in_proj_bias``, ``out_proj``
    (a :class:`Linear`). Masks as torch: boolean True = masked out, float = added.
    ``dropout`` drops attention weights in train mode.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, *, rngs: nnx.Rngs):
        if add_bias_kv or add_zero_attn:
            raise ValueError("MultiheadAttention(add_bias_kv / add_zero_attn) is not supported")
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.same_dims = self.kdim == embed_dim and self.vdim == embed_dim
        init = jax.nn.initializers.xavier_uniform()
        if self.same_dims:
            self.in_proj_kernel = nnx.Param(init(rngs.params(), (embed_dim, 3 * embed_dim)))
        else:
            self.q_proj_kernel = nnx.Param(init(rngs.params(), (embed_dim, embed_dim)))
            self.k_proj_kernel = nnx.Param(init(rngs.params(), (self.kdim, embed_dim)))
            self.v_proj_kernel = nnx.Param(init(rngs.params(), (self.vdim, embed_dim)))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * embed_dim,))) if bias else None
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, rngs=rngs)
        self.attn_dropout = Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                 average_attn_weights: bool = True, is_causal: bool = False):
        if self.batch_first:
            query, key, value = (jnp.swapaxes(a, 0, 1) for a in (query, key, value))
        # Time-major from here, as torch's F.multi_head_attention_forward: (L, B, E).
        e, h = self.embed_dim, self.num_heads
        if self.same_dims:
            w = self.in_proj_kernel[...]
            wq, wk, wv = w[:, :e], w[:, e:2 * e], w[:, 2 * e:]
        else:
            wq, wk, wv = self.q_proj_kernel[...], self.k_proj_kernel[...], self.v_proj_kernel[...]
        q, k, v = query @ wq, key @ wk, value @ wv
        if self.in_proj_bias is not None:
            b = self.in_proj_bias[...]
            q, k, v = q + b[:e], k + b[e:2 * e], v + b[2 * e:]
        L, B = q.shape[0], q.shape[1]
        S = k.shape[0]
        heads = lambda t, n: t.reshape(n, B * h, e // h).swapaxes(0, 1)  # noqa: E731  (B*h, n, e/h)
        q, k, v = heads(q, L), heads(k, S), heads(v, S)
        scores = (q / math.sqrt(e // h)) @ k.swapaxes(1, 2)  # (B*h, L, S)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.ndim == 3 else attn_mask[None]
            scores = jnp.where(mask, -jnp.inf, scores) if mask.dtype == jnp.bool_ else scores + mask
        if key_padding_mask is not None:
            kpm = jnp.repeat(key_padding_mask, h, axis=0)[:, None, :]  # (B*h, 1, S), batch-major like torch
            scores = jnp.where(kpm, -jnp.inf, scores) if kpm.dtype == jnp.bool_ else scores + kpm
        weights = jax.nn.softmax(scores, axis=-1)
        if self.attn_dropout is not None:  # (torch returns the weights after dropout too)
            weights = self.attn_dropout(weights)
        out = (weights @ v).swapaxes(0, 1).reshape(L, B, e)  # (L, B, E)
        out = self.out_proj(out)
        if self.batch_first:
            out = jnp.swapaxes(out, 0, 1)
        if not need_weights:
            return out, None
        weights = weights.reshape(B, h, L, S)
        return out, (weights.mean(axis=1) if average_attn_weights else weights)


class TransformerEncoderLayer(nnx.Module):
    """``torch.nn.TransformerEncoderLayer`` (post-norm, or pre-norm with ``norm_first``), called
    as torch's: ``(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``. Its parts
    keep torch's names (``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``, the
    dropouts); ``activation`` is ``"relu"`` or ``"gelu"`` (exact)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, *, rngs: nnx.Rngs):
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            rngs=rngs)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, rngs=rngs)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = Dropout(dropout, rngs=rngs)
        self.dropout2 = Dropout(dropout, rngs=rngs)
        self.activation = activation

    def _sa_block(self, x, mask, key_padding_mask):
        x = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        act = jax.nn.relu if self.activation == "relu" else F.gelu
        return self.dropout2(self.linear2(self.dropout(act(self.linear1(x)))))

    def __call__(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask))
        return self.norm2(x + self._ff_block(x))


class TransformerEncoder(nnx.Module):
    """``torch.nn.TransformerEncoder(encoder_layer, num_layers, norm)``: ``num_layers`` copies of
    ``encoder_layer`` (``layers.0``, ``layers.1``...) and an optional final ``norm``."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm=None,
                 *, rngs: nnx.Rngs | None = None):
        self.layers = nnx.List([encoder_layer] + [nnx.clone(encoder_layer) for _ in range(num_layers - 1)])
        self.norm = norm

    def __call__(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
        return x if self.norm is None else self.norm(x)


# ----------------------------------------------------------------------------------------- #
# Dropout, containers


class Dropout(nnx.Dropout):
    """``torch.nn.Dropout(p)``: in train mode zero each element with probability ``p`` and
    scale the rest by ``1 / (1 - p)``; identity in eval mode (``nnx.Dropout``: jaxlight's step
    handles it under every strategy). The random masks are JAX's, not torch's."""

    port_layout = "any"

    def __init__(self, p: float = 0.5, inplace: bool = False, *, rngs: nnx.Rngs):
        super().__init__(p, rngs=rngs)


class Dropout1d(nnx.Dropout):
    """``torch.nn.Dropout1d``: whole channels of channels-last ``(B, L, C)``."""

    port_layout = "cl"

    def __init__(self, p: float = 0.5, inplace: bool = False, *, rngs: nnx.Rngs):
        super().__init__(p, broadcast_dims=(1,), rngs=rngs)


class Dropout2d(nnx.Dropout):
    """``torch.nn.Dropout2d``: whole channels of channels-last ``(B, H, W, C)``."""

    port_layout = "cl"

    def __init__(self, p: float = 0.5, inplace: bool = False, *, rngs: nnx.Rngs):
        super().__init__(p, broadcast_dims=(1, 2), rngs=rngs)


def _chain(layers, x):
    """Call ``layers`` in order on ``x`` (torch's layout in and out); a feature map stays
    channels-last from a channels-last layer (``port_layout = "cl"``: convolutions, batch norms,
    pools) through elementwise ones (``"any"``) until a torch-layout layer needs it back."""
    last = False  # whether x is channels-last now
    for layer in layers:
        want = getattr(layer, "port_layout", "cf")
        if getattr(x, "ndim", 0) >= 3:
            if want == "cl" and not last:
                x, last = F.channels_last(x), True
            elif want == "cf" and last:
                x, last = F.channels_first(x), False
        else:
            last = False
        x = layer(x)
        if getattr(x, "ndim", 0) < 3:
            last = False
    return F.channels_first(x) if last else x


class Sequential(nnx.List):
    """``torch.nn.Sequential``: its layers under ``"0"``, ``"1"``... (torch's names), called in
    order; takes and returns torch's layout (layouts between layers: see :func:`_chain`)."""

    def __init__(self, *layers):
        super().__init__(layers)

    def __call__(self, x):
        return _chain(self, x)


class NamedSequential(nnx.Module):
    """``torch.nn.Sequential(OrderedDict(...))``: its layers under torch's names, called in
    that order (``seq["conv"]`` or ``getattr(seq, "conv")``)."""

    def __init__(self, layers: dict):
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.port_order = tuple(layers)

    def __getitem__(self, name: str):
        return getattr(self, name)

    def __call__(self, x):
        return _chain([getattr(self, n) for n in self.port_order], x)


# ----------------------------------------------------------------------------------------- #
# Parameter-free layers: torch's module, its function


class Activation(nnx.Module):
    """A parameter-free torch layer: applies ``fn`` (from ``jax.nn`` or :mod:`functional`)
    with the layer's arguments."""

    fn = staticmethod(lambda x: x)

    def __init__(self, **kwargs):
        hashable = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731  (a static attribute)
        self.kwargs = tuple(sorted((k, hashable(v)) for k, v in kwargs.items()))

    def __call__(self, x):
        return type(self).fn(x, **dict(self.kwargs))


def _activation(name: str, fn, doc: str, signature: Sequence[str] = (), defaults: dict | None = None,
                layout: str = "cf"):
    def __init__(self, *args, inplace: bool = False, **kwargs):
        kwargs = {**(defaults or {}), **dict(zip(signature, args)), **kwargs}
        Activation.__init__(self, **kwargs)

    return type(name, (Activation,), {"fn": staticmethod(fn), "__init__": __init__, "__doc__": doc,
                                      "__module__": __name__, "port_layout": layout})


ReLU = _activation("ReLU", jax.nn.relu, "``torch.nn.ReLU``.", layout="any")
ReLU6 = _activation("ReLU6", F.relu6, "``torch.nn.ReLU6``.", layout="any")
GELU = _activation("GELU", F.gelu, "``torch.nn.GELU(approximate)``.", ("approximate",), layout="any")
SiLU = _activation("SiLU", jax.nn.silu, "``torch.nn.SiLU``.", layout="any")
Tanh = _activation("Tanh", jnp.tanh, "``torch.nn.Tanh``.", layout="any")
Sigmoid = _activation("Sigmoid", jax.nn.sigmoid, "``torch.nn.Sigmoid``.", layout="any")
LeakyReLU = _activation("LeakyReLU", jax.nn.leaky_relu, "``torch.nn.LeakyReLU(negative_slope)``.",
                        ("negative_slope",), layout="any")
ELU = _activation("ELU", F.elu, "``torch.nn.ELU(alpha)``.", ("alpha",), layout="any")
SELU = _activation("SELU", F.selu, "``torch.nn.SELU``.", layout="any")
CELU = _activation("CELU", F.celu, "``torch.nn.CELU(alpha)``.", ("alpha",), layout="any")
Softplus = _activation("Softplus", F.softplus, "``torch.nn.Softplus(beta, threshold)``.", ("beta", "threshold"), layout="any")
Mish = _activation("Mish", F.mish, "``torch.nn.Mish``.", layout="any")
Hardswish = _activation("Hardswish", F.hardswish, "``torch.nn.Hardswish``.", layout="any")
Hardsigmoid = _activation("Hardsigmoid", F.hardsigmoid, "``torch.nn.Hardsigmoid``.", layout="any")
Hardtanh = _activation("Hardtanh", F.hardtanh, "``torch.nn.Hardtanh(min_val, max_val)``.", ("min_val", "max_val"), layout="any")
LogSigmoid = _activation("LogSigmoid", F.logsigmoid, "``torch.nn.LogSigmoid``.", layout="any")
Tanhshrink = _activation("Tanhshrink", lambda x: x - jnp.tanh(x), "``torch.nn.Tanhshrink``.", layout="any")
Softsign = _activation("Softsign", jax.nn.soft_sign, "``torch.nn.Softsign``.", layout="any")
Softmax = _activation("Softmax", F.softmax, "``torch.nn.Softmax(dim)``.", ("dim",))
LogSoftmax = _activation("LogSoftmax", F.log_softmax, "``torch.nn.LogSoftmax(dim)``.", ("dim",))
GLU = _activation("GLU", F.glu, "``torch.nn.GLU(dim)``.", ("dim",))
Identity = _activation("Identity", lambda x: x, "``torch.nn.Identity``.", layout="any")
Flatten = _activation("Flatten", F.flatten, "``torch.nn.Flatten(start_dim=1, end_dim=-1)``.",
                      ("start_dim", "end_dim"), {"start_dim": 1})
Unflatten = _activation("Unflatten", F.unflatten, "``torch.nn.Unflatten(dim, unflattened_size)``.",
                        ("dim", "sizes"))
MaxPool1d = _activation("MaxPool1d", F.max_pool1d, "``torch.nn.MaxPool1d`` on channels-last ``(B, L, C)``.",
                        ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"), layout="cl")
MaxPool2d = _activation("MaxPool2d", F.max_pool2d, "``torch.nn.MaxPool2d`` on channels-last ``(B, H, W, C)``.",
                        ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"), layout="cl")
AvgPool1d = _activation("AvgPool1d", F.avg_pool1d, "``torch.nn.AvgPool1d`` on channels-last ``(B, L, C)``.",
                        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"), layout="cl")
AvgPool2d = _activation("AvgPool2d", F.avg_pool2d, "``torch.nn.AvgPool2d`` on channels-last ``(B, H, W, C)``.",
                        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"), layout="cl")
AdaptiveAvgPool1d = _activation("AdaptiveAvgPool1d", F.adaptive_avg_pool1d,
                                "``torch.nn.AdaptiveAvgPool1d`` on channels-last ``(B, L, C)``.", ("output_size",), layout="cl")
AdaptiveAvgPool2d = _activation("AdaptiveAvgPool2d", F.adaptive_avg_pool2d,
                                "``torch.nn.AdaptiveAvgPool2d`` on channels-last ``(B, H, W, C)``.", ("output_size",), layout="cl")
AdaptiveMaxPool1d = _activation("AdaptiveMaxPool1d", F.adaptive_max_pool1d,
                                "``torch.nn.AdaptiveMaxPool1d`` on channels-last ``(B, L, C)``.", ("output_size",), layout="cl")
AdaptiveMaxPool2d = _activation("AdaptiveMaxPool2d", F.adaptive_max_pool2d,
                                "``torch.nn.AdaptiveMaxPool2d`` on channels-last ``(B, H, W, C)``.", ("output_size",), layout="cl")
Upsample = _activation("Upsample", F.interpolate, "``torch.nn.Upsample(mode='nearest')`` on channels-last input.",
                       ("size", "scale_factor", "mode"), layout="cl")
PixelShuffle = _activation("PixelShuffle", F.pixel_shuffle, "``torch.nn.PixelShuffle``.", ("upscale_factor",))


class PReLU(nnx.Module):
    """``torch.nn.PReLU(num_parameters, init)`` on torch's layout; ``weight`` as torch's."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25, *, rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.full((num_parameters,), init, jnp.float32))

    def __call__(self, x):
        return F.prelu(x, self.weight[...])

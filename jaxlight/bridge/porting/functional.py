"""PyTorch's tensor functions with PyTorch's semantics, on JAX arrays: what ported ``__call__``
methods call where ``jax.numpy`` has no function of the same meaning.

Generated source imports this module as ``F`` (``from jaxlight.bridge.porting import functional as F``),
so a ported line reads like the torch line it comes from: ``F.flatten(x, 1)``,
``F.chunk(qkv, 3, dim=-1)``, ``F.max_pool2d(x, 2)``. Where a function of ``jax.numpy`` or
``jax.nn`` means exactly what torch's does, the generated code calls it directly
(``jnp.reshape``, ``jax.nn.relu``) and nothing is defined here.

Layouts: arrays are in torch's layout (``(B, C, H, W)``, ``(B, T, C)``), except for the
functions that say ``channels-last``: the pooling functions take ``(B, H, W, C)`` /
``(B, L, C)``, the layout the port's convolutions run in (:func:`channels_last`,
:func:`channels_first` convert; see ``jaxlight.bridge.porting.nn``).

Numerics that differ from a naive JAX spelling, and why each function exists:

- ``gelu``: torch's default is the exact (erf) form; ``jax.nn.gelu``'s default is the tanh
  approximation.
- ``var``/``std``: torch's default is the unbiased estimate (``correction=1``); ``jnp.var`` is
  biased.
- ``squeeze(x, dim)``: torch leaves a dimension that is not of size 1 alone; ``jnp.squeeze``
  raises.
- ``chunk``/``split``: torch's ``split`` takes a chunk *size*; ``jnp.split`` takes a number of
  sections or split points.
- ``max``/``min`` with ``dim``: torch returns ``(values, indices)``.
- ``softmax`` without ``dim``: torch's legacy implicit dimension.
- the pools: torch's window arithmetic (``ceil_mode``, ``count_include_pad``, adaptive bins).
"""

from __future__ import annotations

import itertools
import math
from collections import namedtuple
from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "channels_last", "channels_first", "torch_dim", "flatten", "unflatten", "squeeze", "expand", "repeat",
    "split", "chunk", "unbind", "narrow", "max", "min", "var", "std", "softmax", "log_softmax", "gelu",
    "softplus", "elu", "selu", "celu", "hardtanh", "relu6", "hardswish", "hardsigmoid", "mish", "logsigmoid",
    "glu", "prelu", "linear", "masked_fill", "pad", "normalize", "layer_norm", "scaled_dot_product_attention",
    "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "one_hot", "gather", "index_select", "repeat_interleave",
    "interpolate", "pixel_shuffle", "div", "cumsum", "arange", "full", "dropout", "embedding", "sort", "topk",
]


def builtins_max(a, b):
    return a if a >= b else b  # (this module defines torch's max)


# ----------------------------------------------------------------------------------------- #
# Layout


def channels_last(x):
    """torch's ``(B, C, *spatial)`` -> ``(B, *spatial, C)``: the layout convolutions, batch
    norms and pools of a port run in (XLA's convolutions and jaxlight's ``conv2d_nhwc`` are
    fastest channels-last)."""
    return jnp.moveaxis(x, 1, -1)


def channels_first(x):
    """``(B, *spatial, C)`` -> torch's ``(B, C, *spatial)``."""
    return jnp.moveaxis(x, -1, 1)


def torch_dim(dim: int, ndim: int) -> int:
    """torch's ``dim`` of an ``ndim``-dimensional tensor as a non-negative axis."""
    if not -ndim <= dim < builtins_max(ndim, 1):
        raise IndexError(f"dimension {dim} out of range for a {ndim}-dimensional array")
    return dim % builtins_max(ndim, 1)


# ----------------------------------------------------------------------------------------- #
# Shapes


def flatten(x, start_dim: int = 0, end_dim: int = -1):
    """``torch.flatten``: dimensions ``start_dim..end_dim`` merged into one."""
    if x.ndim == 0:
        return x.reshape(1)
    s, e = torch_dim(start_dim, x.ndim), torch_dim(end_dim, x.ndim)
    return x.reshape(x.shape[:s] + (math.prod(x.shape[s:e + 1]),) + x.shape[e + 1:])


def unflatten(x, dim: int, sizes: Sequence[int]):
    """``torch.unflatten``: dimension ``dim`` split into ``sizes`` (one may be -1)."""
    d = torch_dim(dim, x.ndim)
    sizes = list(sizes)
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = x.shape[d] // known
    return x.reshape(x.shape[:d] + tuple(sizes) + x.shape[d + 1:])


def squeeze(x, dim=None):
    """``torch.squeeze``: the given dimension(s) removed where they have size 1 (others kept,
    as torch does), or every size-1 dimension."""
    if dim is None:
        return jnp.squeeze(x)
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    axes = tuple(d for d in (torch_dim(d, x.ndim) for d in dims) if x.shape[d] == 1)
    return jnp.squeeze(x, axes) if axes else x


def expand(x, sizes: Sequence[int]):
    """``Tensor.expand``: broadcast to ``sizes``, where -1 keeps the dimension."""
    sizes = tuple(sizes)
    lead = len(sizes) - x.ndim
    shape = tuple(x.shape[i - lead] if (s == -1 and i >= lead) else s for i, s in enumerate(sizes))
    return jnp.broadcast_to(x, shape)


def repeat(x, sizes: Sequence[int]):
    """``Tensor.repeat``: tiled ``sizes`` times along each dimension (new leading ones too)."""
    sizes = tuple(sizes)
    x = x.reshape((1,) * (len(sizes) - x.ndim) + x.shape)
    return jnp.tile(x, sizes)


def split(x, split_size_or_sections, dim: int = 0):
    """``torch.split``: pieces of ``split_size`` along ``dim`` (the last may be shorter), or of
    the given sizes."""
    d = torch_dim(dim, x.ndim)
    n = x.shape[d]
    if isinstance(split_size_or_sections, int):
        size = split_size_or_sections
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = list(split_size_or_sections)
    points, at = [], 0
    for s in sizes[:-1]:
        at += s
        points.append(at)
    return tuple(jnp.split(x, points, axis=d))


def chunk(x, chunks: int, dim: int = 0):
    """``torch.chunk``: pieces of ``ceil(n / chunks)`` along ``dim`` (possibly fewer pieces)."""
    n = x.shape[torch_dim(dim, x.ndim)]
    return split(x, builtins_max(-(-n // chunks), 1), dim)


def unbind(x, dim: int = 0):
    """``torch.unbind``: the slices along ``dim``."""
    d = torch_dim(dim, x.ndim)
    return tuple(jnp.moveaxis(x, d, 0))


def narrow(x, dim: int, start: int, length: int):
    """``torch.narrow``."""
    d = torch_dim(dim, x.ndim)
    start = start % x.shape[d] if start < 0 else start
    return jax.lax.slice_in_dim(x, start, start + length, axis=d)


def repeat_interleave(x, repeats: int, dim=None):
    """``torch.repeat_interleave`` with an integer ``repeats``."""
    if dim is None:
        return jnp.repeat(x.reshape(-1), repeats)
    return jnp.repeat(x, repeats, axis=torch_dim(dim, x.ndim))


def gather(x, dim: int, index):
    """``torch.gather``."""
    return jnp.take_along_axis(x, index, axis=torch_dim(dim, x.ndim))


def index_select(x, dim: int, index):
    """``torch.index_select``."""
    return jnp.take(x, index, axis=torch_dim(dim, x.ndim))


def pixel_shuffle(x, upscale_factor: int):
    """``torch.nn.functional.pixel_shuffle`` on ``(B, C*r*r, H, W)``."""
    r = upscale_factor
    b, c, h, w = x.shape
    x = x.reshape(b, c // (r * r), r, r, h, w)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)


# ----------------------------------------------------------------------------------------- #
# Reductions


_MinMax = namedtuple("_MinMax", ["values", "indices"])


def _extreme(x, dim, keepdim, other, reduce, arg, pairwise):
    if other is not None or (dim is not None and not isinstance(dim, int)):
        return pairwise(x, dim if other is None else other)  # torch.max(a, b): elementwise
    if dim is None:
        return reduce(x)
    d = torch_dim(dim, x.ndim)
    return _MinMax(reduce(x, axis=d, keepdims=keepdim), arg(x, axis=d, keepdims=keepdim))


def max(x, dim=None, keepdim: bool = False, *, other=None):  # noqa: A001 - torch's name
    """``torch.max``: the maximum; with ``dim`` the pair ``(values, indices)``; with a tensor as
    second argument the elementwise maximum."""
    return _extreme(x, dim, keepdim, other, jnp.max, jnp.argmax, jnp.maximum)


def min(x, dim=None, keepdim: bool = False, *, other=None):  # noqa: A001 - torch's name
    """``torch.min``, as :func:`max`."""
    return _extreme(x, dim, keepdim, other, jnp.min, jnp.argmin, jnp.minimum)


def _axes(dim, ndim):
    if dim is None:
        return None
    if isinstance(dim, int):
        return torch_dim(dim, ndim)
    return tuple(torch_dim(d, ndim) for d in dim)


def var(x, dim=None, unbiased=None, keepdim: bool = False, *, correction=None):
    """``torch.var``: by default the unbiased estimate (``correction=1``), as torch."""
    ddof = 1 if correction is None and unbiased is None else (correction if correction is not None else int(unbiased))
    return jnp.var(x, axis=_axes(dim, x.ndim), ddof=ddof, keepdims=keepdim)


def std(x, dim=None, unbiased=None, keepdim: bool = False, *, correction=None):
    """``torch.std``: by default the unbiased estimate (``correction=1``), as torch."""
    return jnp.sqrt(var(x, dim, unbiased, keepdim, correction=correction))


def cumsum(x, dim: int):
    """``torch.cumsum``."""
    return jnp.cumsum(x, axis=torch_dim(dim, x.ndim))


# ----------------------------------------------------------------------------------------- #
# Activations


def _softmax_dim(ndim: int) -> int:
    # torch's legacy choice when no dim is given (torch.nn.functional._get_softmax_dim).
    return 0 if ndim in (0, 1, 3) else 1


def softmax(x, dim=None):
    """``torch.softmax`` over ``dim`` (torch's legacy dimension when None)."""
    return jax.nn.softmax(x, axis=_softmax_dim(x.ndim) if dim is None else dim)


def log_softmax(x, dim=None):
    """``torch.log_softmax`` over ``dim`` (torch's legacy dimension when None)."""
    return jax.nn.log_softmax(x, axis=_softmax_dim(x.ndim) if dim is None else dim)


def gelu(x, approximate: str = "none"):
    """``torch.nn.functional.gelu``: exact (erf) by default, ``approximate="tanh"`` for the tanh
    form. (``jax.nn.gelu``'s default is the tanh form.)"""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def softplus(x, beta: float = 1.0, threshold: float = 20.0):
    """``torch.nn.functional.softplus``: ``log(1 + exp(beta x)) / beta``, linear above
    ``threshold``."""
    bx = beta * x
    return jnp.where(bx > threshold, x, jnp.logaddexp(bx, 0.0) / beta)


def elu(x, alpha: float = 1.0):
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0.0)))


def selu(x):
    return jax.nn.selu(x)


def celu(x, alpha: float = 1.0):
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0.0) / alpha))


def hardtanh(x, min_val: float = -1.0, max_val: float = 1.0):
    return jnp.clip(x, min_val, max_val)


def relu6(x):
    return jnp.clip(x, 0.0, 6.0)


def hardsigmoid(x):
    return jnp.clip(x / 6.0 + 0.5, 0.0, 1.0)


def hardswish(x):
    return x * hardsigmoid(x)


def mish(x):
    return x * jnp.tanh(softplus(x))


def logsigmoid(x):
    return jax.nn.log_sigmoid(x)


def glu(x, dim: int = -1):
    a, b = chunk(x, 2, dim)
    return a * jax.nn.sigmoid(b)


def prelu(x, weight):
    """``torch.nn.functional.prelu``: ``weight`` (1 or C values) on the channel axis 1."""
    w = weight.reshape((1, -1) + (1,) * (x.ndim - 2)) if x.ndim >= 2 and weight.size > 1 else weight.reshape(())
    return jnp.where(x >= 0, x, w * x)


# ----------------------------------------------------------------------------------------- #
# Layers as functions (torch layout)


def linear(x, weight, bias=None):
    """``torch.nn.functional.linear``: ``x @ weight.T + bias`` with torch's ``(out, in)`` weight."""
    y = x @ weight.T
    return y if bias is None else y + bias


def embedding(ids, weight):
    """``torch.nn.functional.embedding``: rows of ``weight``."""
    return jnp.take(weight, ids, axis=0)


def masked_fill(x, mask, value):
    """``Tensor.masked_fill``: ``value`` where ``mask`` is True."""
    return jnp.where(mask, jnp.asarray(value, x.dtype), x)


def div(x, y, rounding_mode=None):
    """``torch.div``: true division, or ``"floor"`` / ``"trunc"`` rounding."""
    if rounding_mode is None:
        return jnp.true_divide(x, y)
    if rounding_mode == "floor":
        return jnp.floor_divide(x, y)
    if rounding_mode == "trunc":
        q = jnp.true_divide(x, y)
        return jnp.trunc(q).astype(jnp.result_type(x, y))
    raise ValueError(f"div: unknown rounding_mode {rounding_mode!r}")


def pad(x, pad: Sequence[int], mode: str = "constant", value=None):
    """``torch.nn.functional.pad``: ``pad`` lists (left, right) pairs from the last dimension
    backwards; negative amounts crop. Modes constant, reflect, replicate, circular."""
    pad = list(pad)
    pairs = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        pairs[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    crop = tuple(slice(-lo if lo < 0 else None, hi if hi < 0 else None) for lo, hi in pairs)
    x = x[crop]
    pairs = [(builtins_max(lo, 0), builtins_max(hi, 0)) for lo, hi in pairs]
    if mode == "constant":
        return jnp.pad(x, pairs, constant_values=0 if value is None else value)
    jmode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}.get(mode)
    if jmode is None:
        raise ValueError(f"pad: unknown mode {mode!r}")
    return jnp.pad(x, pairs, mode=jmode)


def normalize(x, p: float = 2.0, dim: int = 1, eps: float = 1e-12):
    """``torch.nn.functional.normalize``: ``x / max(||x||_p, eps)`` along ``dim``."""
    norm = jnp.sum(jnp.abs(x) ** p, axis=dim, keepdims=True) ** (1.0 / p)
    return x / jnp.maximum(norm, eps)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``torch.nn.functional.layer_norm`` over the last ``len(normalized_shape)`` dimensions."""
    axes = tuple(range(x.ndim - len(tuple(normalized_shape)), x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var_ = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var_ + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def one_hot(ids, num_classes: int = -1):
    """``torch.nn.functional.one_hot`` (``num_classes`` must be given: the port's shapes are static)."""
    if num_classes < 0:
        raise ValueError("one_hot: num_classes must be given (shapes are static under jit)")
    return jax.nn.one_hot(ids, num_classes, dtype=jnp.int32)


def arange(start, end=None, step=1, dtype=None):
    """``torch.arange`` (integer arguments give integers, as torch)."""
    return jnp.arange(start, end, step, dtype=dtype)


def full(size, fill_value, dtype=None):
    """``torch.full``: torch infers float32 from a Python float, int64 (here int32) from an int."""
    return jnp.full(tuple(size), fill_value, dtype=dtype)


def dropout(x, layer):
    """A mode-dependent dropout written as a function in torch (``F.dropout(x, p,
    training=self.training)``): the port gives it an ``nnx.Dropout`` ``layer`` of its own, which
    ``model.train()`` / ``model.eval()`` switch."""
    return layer(x)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale=None, enable_gqa: bool = False, *, dropout=None):
    """``torch.nn.functional.scaled_dot_product_attention`` on ``(..., L, E)`` queries and
    ``(..., S, E)`` keys / values.

    ``attn_mask``: boolean (True = may attend) or additive float, broadcast to ``(..., L, S)``.
    ``is_causal``: the lower-triangular mask (top-left aligned, as torch). ``dropout``: an
    ``nnx.Dropout`` applied to the attention weights (the port's stand-in for ``dropout_p``,
    which torch applies whenever it is non-zero).
    """
    if enable_gqa:
        rep = query.shape[-3] // key.shape[-3]
        key = jnp.repeat(key, rep, axis=-3)
        value = jnp.repeat(value, rep, axis=-3)
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ jnp.swapaxes(key, -1, -2)) * scale
    if is_causal:
        scores = jnp.where(jnp.tril(jnp.ones((L, S), bool)), scores, -jnp.inf)
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            scores = jnp.where(attn_mask, scores, -jnp.inf)
        else:
            scores = scores + attn_mask
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        weights = dropout(weights)
    return weights @ value


# ----------------------------------------------------------------------------------------- #
# Pools (channels-last)


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _pool_pads(sizes, kernel, stride, padding, dilation, ceil_mode):
    """torch's output sizes and the (lo, hi) pads giving them (``ceil_mode`` adds right padding;
    a last window must start inside the input or its left padding, as torch requires)."""
    pads = []
    for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation):
        eff = d * (k - 1) + 1
        num = n + 2 * p - eff
        out = (-(-num // s) if ceil_mode else num // s) + 1
        if ceil_mode and (out - 1) * s >= n + p:
            out -= 1
        hi = builtins_max((out - 1) * s + eff - n - p, 0)
        pads.append((p, hi))
    return pads


def _max_pool(x, nd, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    if return_indices:
        raise NotImplementedError("max_pool with return_indices=True is not supported")
    kernel = _tuple(kernel_size, nd)
    stride = _tuple(kernel_size if stride is None or stride == [] else stride, nd)
    padding, dilation = _tuple(padding, nd), _tuple(dilation, nd)
    spatial = x.shape[1:1 + nd]
    if (nd == 2 and kernel == (2, 2) and stride == (2, 2) and padding == (0, 0) and dilation == (1, 1)
            and all(n % 2 == 0 for n in spatial)):
        from jaxlight.models.cnn import max_pool_2x2

        return max_pool_2x2(x)  # torch's gradient on ties, and the fast path on XLA:CPU
    pads = _pool_pads(spatial, kernel, stride, padding, dilation, ceil_mode)
    # A Python scalar as the initial value: JAX then uses its differentiable max / sum windows.
    init = -math.inf if jnp.issubdtype(x.dtype, jnp.floating) else int(jnp.iinfo(x.dtype).min)
    if any(d != 1 for d in dilation):
        # JAX has no gradient for a dilated max window: the max of the kernel's strided slices.
        xp = jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=init)
        outs = [(n + lo + hi - d * (k - 1) - 1) // s + 1
                for n, (lo, hi), k, s, d in zip(spatial, pads, kernel, stride, dilation)]
        best = None
        for offset in itertools.product(*[range(k) for k in kernel]):
            index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                          for o, d, n, s in zip(offset, dilation, outs, stride))
            part = xp[(slice(None), *index)]
            best = part if best is None else jnp.maximum(best, part)
        return best
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, *kernel, 1), (1, *stride, 1),
                                 [(0, 0), *pads, (0, 0)], window_dilation=(1, *dilation, 1))


def max_pool1d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``torch.nn.functional.max_pool1d`` on channels-last ``(B, L, C)``."""
    return _max_pool(x, 1, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``torch.nn.functional.max_pool2d`` on channels-last ``(B, H, W, C)``; a 2x2 pool of even
    sizes runs ``jaxlight.models.cnn.max_pool_2x2`` (torch's gradient on ties)."""
    return _max_pool(x, 2, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _avg_pool(x, nd, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    kernel = _tuple(kernel_size, nd)
    stride = _tuple(kernel_size if stride is None or stride == [] else stride, nd)
    padding = _tuple(padding, nd)
    spatial = x.shape[1:1 + nd]
    pads = _pool_pads(spatial, kernel, stride, padding, (1,) * nd, ceil_mode)
    window = ((1, *kernel, 1), (1, *stride, 1), [(0, 0), *pads, (0, 0)])
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window)
    if divisor_override:
        return total / divisor_override
    if count_include_pad:
        # torch counts the explicit padding but not the extra right padding of ceil_mode.
        ones = jnp.ones(tuple(n + 2 * p for n, p in zip(spatial, padding)), x.dtype)
        pads_extra = [(0, hi - p) for (_, hi), p in zip(pads, padding)]
        count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, kernel, stride, pads_extra)
    else:
        ones = jnp.ones(spatial, x.dtype)
        count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, kernel, stride, pads)
    return total / count[None, ..., None]


def avg_pool1d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """``torch.nn.functional.avg_pool1d`` on channels-last ``(B, L, C)``."""
    return _avg_pool(x, 1, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """``torch.nn.functional.avg_pool2d`` on channels-last ``(B, H, W, C)``."""
    return _avg_pool(x, 2, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive(x, nd, output_size, reduce):
    out = _tuple(output_size, nd)
    spatial = x.shape[1:1 + nd]
    out = tuple(n if o is None else o for o, n in zip(out, spatial))
    if all(n % o == 0 for n, o in zip(spatial, out)):
        # Equal bins: one reshape and one reduction.
        shape = [x.shape[0]]
        for n, o in zip(spatial, out):
            shape += [o, n // o]
        y = reduce(x.reshape(*shape, x.shape[-1]), axis=tuple(2 + 2 * i for i in range(nd)))
        return y
    # torch's bins: [floor(i n / o), ceil((i + 1) n / o)).
    for axis, (n, o) in enumerate(zip(spatial, out), start=1):
        parts = [reduce(jax.lax.slice_in_dim(x, (i * n) // o, -(-((i + 1) * n) // o), axis=axis), axis=axis,
                        keepdims=True) for i in range(o)]
        x = jnp.concatenate(parts, axis=axis)
    return x


def adaptive_avg_pool1d(x, output_size):
    """``torch.nn.functional.adaptive_avg_pool1d`` on channels-last ``(B, L, C)``."""
    return _adaptive(x, 1, output_size, jnp.mean)


def adaptive_avg_pool2d(x, output_size):
    """``torch.nn.functional.adaptive_avg_pool2d`` on channels-last ``(B, H, W, C)``."""
    return _adaptive(x, 2, output_size, jnp.mean)


def adaptive_max_pool1d(x, output_size, return_indices=False):
    if return_indices:
        raise NotImplementedError("adaptive_max_pool with return_indices=True is not supported")
    return _adaptive(x, 1, output_size, jnp.max)


def adaptive_max_pool2d(x, output_size, return_indices=False):
    if return_indices:
        raise NotImplementedError("adaptive_max_pool with return_indices=True is not supported")
    return _adaptive(x, 2, output_size, jnp.max)


def interpolate(x, size=None, scale_factor=None, mode: str = "nearest"):
    """``torch.nn.functional.interpolate``, mode ``nearest`` with an integer scale, channels-last."""
    nd = x.ndim - 2
    if mode != "nearest":
        raise NotImplementedError(f"interpolate mode {mode!r}")
    spatial = x.shape[1:1 + nd]
    if size is not None:
        size = _tuple(size, nd)
        factors = [s // n for s, n in zip(size, spatial)]
    else:
        factors = [int(f) for f in _tuple(scale_factor, nd)]
    for axis, f in enumerate(factors, start=1):
        x = jnp.repeat(x, f, axis=axis)
    return x


_Sorted = namedtuple("_Sorted", ["values", "indices"])


def sort(x, dim: int = -1, descending: bool = False):
    """``torch.sort``: ``(values, indices)`` (stable)."""
    d = torch_dim(dim, x.ndim)
    idx = jnp.argsort(x, axis=d, descending=descending, stable=True)
    return _Sorted(jnp.take_along_axis(x, idx, axis=d), idx)


def topk(x, k: int, dim: int = -1, largest: bool = True):
    """``torch.topk``: the ``k`` largest (or smallest) values along ``dim`` and their indices."""
    d = torch_dim(dim, x.ndim)
    moved = jnp.moveaxis(x, d, -1)
    values, idx = jax.lax.top_k(moved if largest else -moved, k)
    values = values if largest else -values
    return _Sorted(jnp.moveaxis(values, -1, d), jnp.moveaxis(idx, -1, d))

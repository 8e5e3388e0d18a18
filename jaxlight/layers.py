"""How a training step runs the user's ``nnx.BatchNorm`` and ``nnx.Dropout`` layers.

A jaxlight batch can end in padding rows (the exact padded last batch), and under ``pmap``
each device holds only its block of the global batch. Flax's layers know neither, so while
the step traces the user's loss it puts a *stand-in* in the place of each such layer of its own
copy of the model (:func:`stand_ins`), and puts the layer back before the model's state is
read. Nothing of Flax is modified: a stand-in is a jaxlight object that calls the layer through
its public signature or reproduces it, and the user's module is never touched (the step works
on a fresh ``nnx.merge`` of the state).

- :class:`PaddedBatchNorm` (train mode, batch statistics): the statistics come from the real
  rows only, through ``nnx.BatchNorm``'s own ``mask=`` argument (Flax's arithmetic, every
  setting honoured: ``use_fast_variance``, ``axis``, ``epsilon``, ``momentum``,
  ``use_bias/scale``). Under a mapped axis (``pmap``) it computes the statistics of the global
  batch itself, from sums ``psum``-ed over the devices (Flax's ``axis_name`` averages the
  devices' means, which is wrong when devices hold different numbers of real rows), with
  Flax's formulas (:func:`batch_stats`), then updates the running averages and normalises
  exactly as ``nnx.BatchNorm`` does.
- :class:`GlobalRowsDropout` (``pmap`` only): each device draws ``nnx.Dropout``'s mask for the
  whole global batch from the shared key and keeps its own rows, so ``pmap`` drops exactly the
  units one device would (bit for bit).

A subclass of ``nnx.BatchNorm`` with a ``__call__`` of its own gets the same treatment when it
says ``masked_call = True`` (its ``mask=`` argument means what ``nnx.BatchNorm``'s does); with
``unbiased_running_var = True`` its ``var`` averages the unbiased batch variance, as torch's
``running_var`` does, under ``pmap`` too (``jaxlight.bridge.porting.nn``'s batch norms say both).

A BatchNorm whose input does not keep the batch axis first (e.g. ``(B*T, C)`` after a reshape)
cannot be told which rows are padding; the step then raises a :class:`LayerError` naming the
layer before the first step, rather than let padding enter the statistics.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LayerError", "StandIn", "PaddedBatchNorm", "GlobalRowsDropout", "batch_stats", "stand_ins", "references"]


class LayerError(ValueError):
    """A layer of the model that the step cannot run correctly on padded batches."""


def _axes(ndim: int, axes) -> tuple:
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return tuple(sorted({a % ndim for a in axes}))


def batch_stats(x, reduction_axes, weight, dtype=None, axis_name=None, axis_index_groups=None,
                use_fast_variance: bool = True):
    """``(mean, var)`` over ``reduction_axes`` of the rows ``weight`` selects, summed over
    ``axis_name``: Flax's ``BatchNorm`` statistics (``E[x²] - E[x]²`` clipped at 0 with
    ``use_fast_variance``, else ``E[(x - E[x])²]``, computed in at least float32) with every
    device's real rows counted once.

    Args:
        x: the normalised input, ``(B, ...)``.
        reduction_axes: the axes reduced (they include the batch axis 0).
        weight: ``(B,)`` 1.0 for a real row, 0.0 for padding.
        dtype: the layer's ``dtype`` (the statistics' precision is at least float32).
        axis_name: the mapped axis the global batch is split over, or None.
    """
    dtype = jnp.promote_types(dtype if dtype is not None else jnp.result_type(x), jnp.float32)
    x = jnp.asarray(x, dtype)
    axes = _axes(x.ndim, reduction_axes)
    keep = jnp.broadcast_to(weight.reshape((-1,) + (1,) * (x.ndim - 1)) > 0, x.shape)

    def total(v):  # sums, not means: devices with different numbers of real rows combine exactly
        s = jnp.sum(jnp.where(keep, v, 0), axes)
        return jax.lax.psum(s, axis_name, axis_index_groups=axis_index_groups) if axis_name else s

    count = jnp.maximum(total(jnp.ones_like(x)), 1)
    mean = total(x) / count
    if use_fast_variance:
        var = jnp.maximum(0.0, total(jnp.square(x)) / count - jnp.square(mean))
    else:
        var = total(jnp.square(x - jnp.expand_dims(mean, axes))) / count
    return mean, var


def _normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, dtype, epsilon):
    """``nnx.BatchNorm``'s normalisation: ``(x - mean) * rsqrt(var + eps) * scale + bias``."""
    stats_shape = [1 if i in reduction_axes else d for i, d in enumerate(x.shape)]
    feature_shape = [x.shape[i] if i in feature_axes else 1 for i in range(x.ndim)]
    y = x - mean.reshape(stats_shape)
    mul = jax.lax.rsqrt(var.reshape(stats_shape) + epsilon)
    args = [x]
    if scale is not None:
        mul *= scale.reshape(feature_shape)
        args.append(scale)
    y *= mul
    if bias is not None:
        y += bias.reshape(feature_shape)
        args.append(bias)
    if dtype is None:  # Flax's canonicalize_dtype: the inputs' result type, made inexact
        dtype = jnp.result_type(*args)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    return jnp.asarray(y, dtype)


class StandIn:
    """Takes the place of ``wrapped`` (a layer, or the model a loss function is given) while a
    step is traced: a subclass defines ``__call__``; every other attribute is read from the
    wrapped object, so code that reads a layer's fields (a ported ``nn.Sequential`` reads
    ``port_layout``) or a model's submodules (``model.encoder(x)`` in a loss) sees them.
    jaxlight's one forwarding class: every stand-in subclasses it.

    >>> class Doubled(StandIn):
    ...     def __call__(self, x):
    ...         return 2 * self.wrapped(x)
    >>> class Layer:
    ...     features = 3
    ...     def __call__(self, x):
    ...         return x + 1
    >>> layer = Doubled(Layer())
    >>> layer(1), layer.features
    (4, 3)
    """

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __getattr__(self, name):
        # (Called only for names the stand-in lacks. ``wrapped`` is missing only before
        # __init__ has run, as in copy.copy: no endless recursion then.)
        if name == "wrapped":
            raise AttributeError(name)
        return getattr(self.wrapped, name)


class PaddedBatchNorm(StandIn):
    """Stands in for one ``nnx.BatchNorm`` while a step traces the loss (see the module doc).

    Args:
        layer: the model's ``nnx.BatchNorm`` (its variables are read and written in place).
        path: the layer's path in the model, for error messages.
        mask: ``(B,)`` padding mask of this device's rows.
        axis_name: the step's mapped axis, or None.
    """

    def __init__(self, layer: nnx.BatchNorm, path: str, mask, axis_name):
        super().__init__(layer)
        self.path, self.mask, self.axis_name = path, mask, axis_name

    def __call__(self, x, use_running_average=None, *, mask=None):
        bn = self.wrapped
        running = bn.use_running_average if use_running_average is None else use_running_average
        feature_axes = _axes(jnp.ndim(x), bn.axis)
        reduction_axes = tuple(i for i in range(jnp.ndim(x)) if i not in feature_axes)
        if running or 0 not in reduction_axes:
            return bn(x, use_running_average, mask=mask)
        rows = self.mask.shape[0]
        if x.shape[0] != rows:
            raise LayerError(
                f"BatchNorm {self.path!r} normalises an input of shape {tuple(x.shape)} whose first axis is not the "
                f"batch ({rows} rows): jaxlight cannot tell which of its rows are padding. Keep the batch axis first "
                f"(e.g. (B, T, C) rather than (B*T, C)), or pass mask= to the layer yourself")
        keep = jnp.broadcast_to(self.mask.reshape((-1,) + (1,) * (x.ndim - 1)) > 0, x.shape)
        if mask is not None:
            keep = keep & jnp.broadcast_to(mask, x.shape)
        axis_name = bn.axis_name or self.axis_name
        if axis_name is None or bn.axis_name is not None:
            # Flax's own arithmetic through its public mask argument. A batch of padding only
            # (the filler of an accumulation window) would divide by zero rows: its statistics
            # are then those of its padding rows, finite, and nothing of it counts anyway.
            keep = keep | ~jnp.any(keep)
            return bn(x, use_running_average, mask=keep)
        if mask is not None:
            raise LayerError(f"BatchNorm {self.path!r}: a mask= of your own is not supported under pmap; use the "
                             f"sharded strategy")
        return self._global(x, reduction_axes, feature_axes, axis_name)

    def _global(self, x, reduction_axes, feature_axes, axis_name):
        """The statistics of the global batch under ``pmap``; the rest as ``nnx.BatchNorm``."""
        bn = self.wrapped
        scale = bn.scale[...] if bn.scale is not None else None
        bias = bn.bias[...] if bn.bias is not None else None
        x, _, _, scale, bias = bn.promote_dtype((x, bn.mean[...], bn.var[...], scale, bias), dtype=bn.dtype)
        mean, var = batch_stats(x, reduction_axes, self.mask, bn.dtype, axis_name, bn.axis_index_groups,
                                bn.use_fast_variance)
        stat = var
        if getattr(bn, "unbiased_running_var", False):
            # torch's running_var: the unbiased estimate, n / (n - 1) times the biased one, n
            # the global batch's real values per feature.
            rows = jax.lax.psum(jnp.sum(self.mask > 0), axis_name, axis_index_groups=bn.axis_index_groups)
            n = (rows * math.prod(x.shape[i] for i in reduction_axes if i != 0)).astype(var.dtype)
            stat = var * n / jnp.maximum(n - 1, 1)
        bn.mean[...] = jax.lax.stop_gradient(bn.momentum * bn.mean[...] + (1 - bn.momentum) * mean)
        bn.var[...] = jax.lax.stop_gradient(bn.momentum * bn.var[...] + (1 - bn.momentum) * stat)
        return _normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, bn.dtype, bn.epsilon)


class GlobalRowsDropout(StandIn):
    """Stands in for one ``nnx.Dropout`` inside ``pmap``: the mask of the global batch, this
    device's rows (see the module doc). Everything else is the layer's own call."""

    def __init__(self, layer: nnx.Dropout, axis_name, rows: int):
        super().__init__(layer)
        self.axis_name, self.rows = axis_name, rows

    def __call__(self, inputs, *, deterministic=None, rngs=None):
        d = self.wrapped
        off = d.deterministic if deterministic is None else deterministic
        shape = list(jnp.shape(inputs))
        for dim in d.broadcast_dims:
            shape[dim] = 1
        if (off or d.rate in (0.0, 1.0) or rngs is not None or not isinstance(d.rngs, nnx.RngStream)
                or not shape or shape[0] != self.rows):
            return d(inputs, deterministic=deterministic, rngs=rngs)
        keep_prob = 1.0 - d.rate
        devices = jax.lax.psum(1, self.axis_name)
        every = jax.random.bernoulli(d.rngs(), p=keep_prob, shape=(devices * self.rows, *shape[1:]))
        mask = jax.lax.dynamic_slice_in_dim(every, jax.lax.axis_index(self.axis_name) * self.rows, self.rows)
        mask = jnp.broadcast_to(mask, inputs.shape)
        return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


def _children(node):
    """``(key, child)`` for each direct child of an NNX graph node (module, ``nnx.List``/``Dict``)."""
    if isinstance(node, (nnx.List, list)):
        return list(enumerate(node))
    if isinstance(node, (nnx.Dict, dict)):
        return list(node.items())
    if isinstance(node, nnx.Module):
        return [(k, v) for k, v in vars(node).items() if not k.startswith("_")]
    return []


def references(model, kinds: tuple) -> list:
    """``(parent, key, layer, path)`` for every reference to a module of ``kinds`` in ``model``
    (a layer shared by two parents appears twice)."""
    found = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (nnx.Module, nnx.List, nnx.Dict)):
            continue
        for key, child in _children(node):
            if isinstance(child, kinds):
                found.append((node, key, child, ".".join(str(p) for p in (*path, key))))
    return found


def _put(parent, key, value) -> None:
    if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
        parent[key] = value
    else:
        setattr(parent, key, value)


@contextlib.contextmanager
def swapped(model, make, kinds: tuple = (nnx.Module,)):
    """Replace each child ``c`` (of ``kinds``) of ``model``'s graph for which ``make(c, path)``
    returns a stand-in, and put every original back on exit."""
    done = []
    try:
        for parent, key, child, path in references(model, kinds):
            stand_in = make(child, path)
            if stand_in is not None:
                _put(parent, key, stand_in)
                done.append((parent, key, child))
        yield model
    finally:
        for parent, key, child in reversed(done):
            _put(parent, key, child)


def stand_ins(model, mask, axis_name=None):
    """While a step traces the loss on ``model`` (its own merged copy): padding-aware BatchNorm
    layers and, under a mapped axis, global-batch dropout (see the module doc)."""
    rows = mask.shape[0]

    def make(layer, path):
        if isinstance(layer, nnx.BatchNorm) and (type(layer).__call__ is nnx.BatchNorm.__call__
                                                 or getattr(layer, "masked_call", False)):
            return PaddedBatchNorm(layer, path, mask, axis_name)
        if axis_name is not None and isinstance(layer, nnx.Dropout) and type(layer).__call__ is nnx.Dropout.__call__:
            return GlobalRowsDropout(layer, axis_name, rows)
        return None

    return swapped(model, make)

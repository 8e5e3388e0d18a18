"""The one train step and the one eval step, pure; their jitted and fused (K steps) forms.

Every path runs the same two functions:

- :func:`apply_train_step` ``(state, batch, mask, axis_name=None) -> (state, metrics)`` and
  :func:`apply_eval_step` ``(state, batch, mask, axis_name=None) -> metrics`` are pure and
  unjitted, for users who wrap them in their own ``jit`` / ``shard_map`` / ``pmap``. With
  ``axis_name`` every reduction (the masked means of the loss and metrics, the gradient,
  BatchNorm's batch statistics) is also summed over that mapped axis, so the result is the
  one device's result on the global batch.
- :func:`train_step` / :func:`eval_step`: one jitted step for a batch from the host.
- :func:`train_chunk` / :func:`eval_chunk`: K steps in one compiled program, a ``lax.scan``
  over batches gathered on the device from a dataset that lives there. With K equal to the
  number of batches the whole epoch is one program (a *fused* epoch).
- ``jaxlight.parallel``'s ``sharded`` strategy jits the same functions over a device mesh and
  ``pmap`` maps them with ``axis_name``.

What the step does around the user's ``loss_fn(model, batch)`` (``jaxlight.tasks``):

- **Modes.** Training runs the model's train-mode graph (``Dropout`` on, ``BatchNorm`` on
  batch statistics, which it updates); evaluation runs its eval-mode graph.
- **Randomness.** Before each training step every RNG stream of the model is reset to
  ``fold_in(fold_in(state.key, step), i)`` (i numbers the streams), so dropout depends on the
  seed and the step alone: identical for any K, across a resume, under every strategy. Under
  ``pmap`` (``axis_name``) each device draws ``nnx.Dropout``'s mask for the whole global batch
  and keeps its rows, so the masks are one device's; other random draws in a user's model get
  the same key on every device (fold in ``jax.lax.axis_index`` for per-device noise).
- **Padding.** The padding mask never reaches the loss as data: the loss's ``(B,)`` values are
  averaged under it, and every batch-statistics normalisation (``nnx.BatchNorm``, which
  reduces over the batch axis) computes its statistics over the real rows only.
- **Mixed precision** (``state.compute_dtype``): parameters and floating batch leaves are cast
  inside the differentiated function; gradients and optimizer state stay float32. The model's
  outputs reach the loss as float32, so losses, metrics and their means are float32 whatever
  the compute dtype.

Every compiled function donates the incoming state: do not use a state after passing it in
(:class:`DonatedStateError` says so if you do).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx.nn import normalization as _nnx_norm
from flax.nnx.nn import stochastic as _nnx_stochastic

from jaxlight.models import has_scan_slow_conv
from jaxlight.state import MODEL_STATE, TrainState
from jaxlight.tasks import Task, takes_mask

__all__ = [
    "BatchError",
    "DonatedStateError",
    "apply_train_step",
    "apply_eval_step",
    "apply_predict",
    "compute_dtype",
    "split_mask",
    "check_batch",
    "check_loss",
    "train_step",
    "eval_step",
    "train_chunk",
    "eval_chunk",
    "gather",
    "default_steps_per_call",
    "needs_unroll",
]


class BatchError(ValueError):
    """A batch that does not fit the model or the loss; raised before XLA runs a step."""


class DonatedStateError(RuntimeError):
    """A TrainState that was donated to a compiled step was used again."""


def check_not_donated(state: TrainState) -> None:
    """Raise :class:`DonatedStateError` if ``state``'s buffers were donated to an earlier step."""
    if isinstance(state.step, jax.Array) and state.step.is_deleted():
        raise DonatedStateError(
            "this TrainState was donated to a compiled step (train_step, fit, Trainer.fit...) and its "
            "buffers are gone; use the state that call returned")


# --------------------------------------------------------------------------------------------
# Context the step sets while the user's loss runs (read at trace time only)

_COMPUTE_DTYPE: contextvars.ContextVar = contextvars.ContextVar("jaxlight_compute_dtype", default=None)
_BATCH_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("jaxlight_batch_context", default=None)


def compute_dtype():
    """The step's compute dtype while a loss is traced (None, or ``jnp.bfloat16`` under bf16).

    A loss function that builds floats of its own (e.g. from integer inputs) casts them to it.
    """
    return _COMPUTE_DTYPE.get()


_original_compute_stats = _nnx_norm._compute_stats


def _masked_compute_stats(x, axes, dtype=None, axis_name=None, axis_index_groups=None, use_mean=True,
                          use_fast_variance=True, mask=None):
    """Flax's statistics, with the step's padding mask and mapped axis applied to batch stats.

    Only normalisations that reduce over axis 0 (the batch axis: ``BatchNorm``) are changed;
    ``LayerNorm``/``GroupNorm`` statistics are per example and stay as they are.
    """
    context = _BATCH_CONTEXT.get()
    canonical = tuple(a % x.ndim for a in (axes if isinstance(axes, tuple) else (axes,)))
    if context is None or 0 not in canonical or mask is not None or x.shape[0] != context[0].shape[0]:
        return _original_compute_stats(x, axes, dtype, axis_name, axis_index_groups, use_mean,
                                       use_fast_variance, mask)
    pad_mask, mapped_axis = context
    axis_name = axis_name or mapped_axis
    if dtype is None:
        dtype = jnp.result_type(x)
    x = jnp.asarray(x, jnp.promote_types(dtype, jnp.float32))
    weight = pad_mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    # Sums, not means, so that devices holding different numbers of real rows combine exactly.
    count = jnp.sum(jnp.broadcast_to(weight, x.shape), canonical)
    sums = jnp.stack([jnp.sum(x * weight, canonical), jnp.sum(jnp.square(x) * weight, canonical), count])
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
    n = jnp.maximum(sums[2], 1.0)
    mean = sums[0] / n
    if not use_mean:
        return jnp.zeros_like(mean), sums[1] / n
    return mean, jnp.maximum(0.0, sums[1] / n - jnp.square(mean))


class _GlobalRowsRandom:
    """``jax.random`` for ``nnx.Dropout`` inside a mapped step: each device draws the global
    batch's mask from the (shared) key and keeps its own rows, so ``pmap`` drops exactly the
    units one device would. Everything else is ``jax.random`` itself."""

    def __init__(self, axis_name, rows: int):
        self.axis_name, self.rows = axis_name, rows

    def __getattr__(self, name):
        return getattr(jax.random, name)

    def bernoulli(self, key, p=0.5, shape=None, **_):
        if not shape or shape[0] != self.rows:
            return jax.random.bernoulli(key, p, shape)
        devices = jax.lax.psum(1, self.axis_name)
        every = jax.random.bernoulli(key, p, (devices * self.rows, *shape[1:]))
        return jax.lax.dynamic_slice_in_dim(every, jax.lax.axis_index(self.axis_name) * self.rows, self.rows)


@contextlib.contextmanager
def _running_loss(mask, axis_name, dtype):
    """While the user's loss is traced: the padding mask and mapped axis for batch statistics,
    dropout masks of the global batch under a mapped axis, and the compute dtype."""
    tokens = (_BATCH_CONTEXT.set((mask, axis_name)), _COMPUTE_DTYPE.set(dtype))
    previous = _nnx_norm._compute_stats, _nnx_stochastic.random
    _nnx_norm._compute_stats = _masked_compute_stats
    if axis_name is not None:
        _nnx_stochastic.random = _GlobalRowsRandom(axis_name, mask.shape[0])
    try:
        yield
    finally:
        _nnx_norm._compute_stats, _nnx_stochastic.random = previous
        _BATCH_CONTEXT.reset(tokens[0])
        _COMPUTE_DTYPE.reset(tokens[1])


# --------------------------------------------------------------------------------------------
# The pure steps


def _cast(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _model(state: TrainState, train: bool, params=None, rng_state=None):
    """The live module inside a step: train- or eval-mode graph, ``params`` (default the
    state's) cast to the compute dtype, fresh Variables at this trace level (``copy=True``, or
    BatchNorm could not write its statistics under ``jax.grad``)."""
    params = state.params if params is None else params
    rng_state = state.rng_state if rng_state is None else rng_state
    return nnx.merge(state.graphdef if train else state.eval_graphdef, _cast(params, state.compute_dtype),
                     rng_state, state.model_state, copy=True)


def _step_rng_state(state: TrainState, axis_name):
    """The model's RNG streams for this step: keys from (seed, step[, device]), counts 0."""
    leaves, treedef = jax.tree.flatten(state.rng_state)
    if not leaves:
        return state.rng_state
    key = jax.random.fold_in(state.key, state.step)
    fresh = [jax.random.fold_in(key, i) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else jnp.zeros_like(a)
             for i, a in enumerate(leaves)]
    return jax.tree.unflatten(treedef, fresh)


def _reduce(losses, metrics, mask, axis_name):
    """Masked means over the real rows of the (global) batch: ``(loss, {"loss", ..., "count"})``.

    ``loss`` is this device's share of the global mean (the gradient of the global mean is the
    sum of the devices' gradients of it); the returned metrics are global.
    """
    count = jnp.sum(mask)
    total = jax.lax.psum(count, axis_name) if axis_name is not None else count
    denom = jnp.maximum(total, 1.0)

    def share(v):
        v = jnp.asarray(v, jnp.float32)
        if v.ndim == 0:  # a mask-aware loss's scalar: the value over this device's real rows
            return v * count / denom
        return jnp.sum(v * mask) / denom

    loss = share(losses)
    values = {"loss": loss, **{k: share(v) for k, v in metrics.items()}}
    if axis_name is not None:
        values = jax.lax.psum(values, axis_name)
    return loss, {**values, "count": total}


def _loss_for_grad(params, state: TrainState, batch, mask, axis_name):
    dtype = state.compute_dtype
    model = _model(state, True, params, _step_rng_state(state, axis_name))
    with _running_loss(mask, axis_name, dtype):
        losses, metrics = _call_loss(state, model, _cast(batch, dtype), mask)
    loss, metrics = _reduce(losses, metrics, mask, axis_name)
    model_state = nnx.state(model, MODEL_STATE)
    return loss, (metrics, model_state)


def apply_train_step(state: TrainState, batch, mask, axis_name: str | None = None):
    """One optimizer step, pure and unjitted: ``(state, batch, mask) -> (state, metrics)``.

    Args:
        state: the current state.
        batch: any pytree of arrays with a leading batch axis ``B`` (the loss's input).
        mask: ``(B,)`` float32: 1.0 for real rows, 0.0 for padding.
        axis_name: inside ``pmap``/``shard_map``, the mapped axis the global batch is split over.

    Returns:
        The new state and ``{"loss", <the loss's metrics>, "count"}``: masked means over the
        real rows of the global batch, ``count`` their number.
    """
    grads, (metrics, model_state) = jax.grad(_loss_for_grad, has_aux=True)(state.params, state, batch, mask, axis_name)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
    return new_state, metrics


def apply_eval_step(state: TrainState, batch, mask, axis_name: str | None = None) -> dict:
    """The loss and metrics of the eval-mode model on one batch, pure; nothing is updated."""
    model = _model(state, False)
    with _running_loss(mask, axis_name, state.compute_dtype):
        losses, metrics = _call_loss(state, model, _cast(batch, state.compute_dtype), mask)
    return _reduce(losses, metrics, mask, axis_name)[1]


def apply_predict(state: TrainState, batch, predict_fn=None):
    """The eval-mode model's outputs on one batch (any pytree), pure.

    ``predict_fn(model, batch)`` gives them; by default a built-in task's ``predict``, and for
    a user's loss the return value of the first call of the model inside ``loss_fn`` (so
    ``loss_fn`` must run on the batch: give ``predict_fn`` for batches without labels).
    """
    dtype = state.compute_dtype
    model = _model(state, False)
    batch = _cast(batch, dtype)
    with _running_loss(jnp.ones((_batch_size(batch),), jnp.float32), None, dtype):
        if predict_fn is not None:
            return predict_fn(model, batch)
        if isinstance(state.loss_fn, Task):
            return state.loss_fn.predict(model, batch)
        return _first_model_call(model, lambda m: _call_loss(state, m, batch, jnp.ones((_batch_size(batch),))))


def _first_model_call(model, run):
    """What ``model(...)`` returned the first time ``run(model)`` called it."""
    cls, seen = type(model), []

    class _Recording(cls):  # a per-call subclass: the class itself is never modified
        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            if not seen:
                seen.append(out)
            return out

    _Recording.__name__ = _Recording.__qualname__ = cls.__name__
    model.__class__ = _Recording
    try:
        run(model)
    finally:
        model.__class__ = cls
    if not seen:
        raise BatchError("predict: loss_fn never called the model, so there are no outputs to return; "
                         "pass predict_fn=lambda model, batch: ...")
    return seen[0]


# --------------------------------------------------------------------------------------------
# Batches: the padding mask apart from the data, and checks before XLA


def _batch_size(batch) -> int:
    return int(jax.tree.leaves(batch)[0].shape[0])


def leaf_name(path, where: str = "batch") -> str:
    """``batch['image']``, ``batch[0]``, ``batch.x`` for a pytree path."""
    return where + jax.tree_util.keystr(path)


def split_mask(state: TrainState, batch, mask=None):
    """``(batch, mask)`` for the steps: ``mask`` defaults to all ones.

    For the built-in tasks a ``"mask"`` key in the batch dict is the padding mask (the tasks
    take only ``x`` and ``y``); a user's loss keeps every key of its batch, ``"mask"`` included.
    """
    if mask is None and isinstance(state.loss_fn, Task) and isinstance(batch, dict) and "mask" in batch:
        batch = dict(batch)
        mask = batch.pop("mask")
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise BatchError(f"the batch holds no arrays: {type(batch).__name__}")
    n = leaves[0].shape[0] if getattr(leaves[0], "ndim", 0) else None
    if mask is None:
        return batch, np.ones((n or 0,), np.float32)
    if tuple(np.shape(mask)) != (n,):
        raise BatchError(f"batch['mask'] has shape {tuple(np.shape(mask))}, expected ({n},): the padding mask "
                         f"has one entry per row")
    return batch, jnp.asarray(mask, jnp.float32) if isinstance(mask, jax.Array) else np.asarray(mask, np.float32)


def check_structure(batch, where: str = "batch") -> int:
    """Every leaf an array with the same leading (batch) size; returns that size."""
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not flat:
        raise BatchError(f"{where} holds no arrays ({type(batch).__name__})")
    size = None
    for path, leaf in flat:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise BatchError(f"{leaf_name(path, where)} must be an array, got {type(leaf).__name__}")
        if leaf.ndim < 1:
            raise BatchError(f"{leaf_name(path, where)} is a scalar; every leaf needs a leading batch axis")
        if size is None:
            size, first = leaf.shape[0], leaf_name(path, where)
        elif leaf.shape[0] != size:
            raise BatchError(f"{leaf_name(path, where)} has {leaf.shape[0]} rows but {first} has {size}: every "
                             f"leaf of a batch shares the leading (batch) axis")
    return size


def check_batch(state: TrainState, batch, mask=None, where: str = "batch"):
    """Validate one host batch cheaply (no device transfer, no tracing); returns ``(batch, mask)``.

    Checks the structure always, and for the built-in tasks the shapes, dtypes and (host numpy)
    label values. Whether the batch fits the model is :func:`check_loss`'s job (once per run).
    """
    batch, mask = split_mask(state, batch, mask)
    if isinstance(state.loss_fn, Task):
        state.loss_fn.check(batch, state.input_shape, where)
        batch = state.loss_fn.cast_labels(batch)
    check_structure(batch, where)
    return batch, mask


def _describe(batch, where: str) -> str:
    return ", ".join(f"{leaf_name(p, where)} {tuple(a.shape)} {a.dtype}"
                     for p, a in jax.tree_util.tree_flatten_with_path(batch)[0])


def _user_frame(exc: BaseException) -> str:
    """The deepest traceback frame outside jax, flax, optax and jaxlight: where the user's code
    (model or loss) failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    skip = ("/jax/", "/jaxlib/", "/flax/", "/optax/", "/jaxlight/", "contextlib.py", "/numpy/")
    own = [f for f in frames if not any(s in f.filename.replace("\\", "/") for s in skip)]
    if not own:
        return ""
    f = own[-1]
    return f" (in {f.filename.rsplit('/', 1)[-1]}:{f.lineno}, {f.name})"


def _complaint(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip() and not ln.startswith("---")]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _culprits(batch, message: str, where: str) -> list[str]:
    """The batch leaves whose shape (or last dimension) the error message mentions."""
    found = []
    for path, a in jax.tree_util.tree_flatten_with_path(batch)[0]:
        dims = tuple(a.shape)
        if str(dims) in message or (len(dims) > 1 and f"({dims[-1]},)" in message) or str(a.dtype) in message:
            found.append(f"{leaf_name(path, where)} {dims} {a.dtype}")
    return found


def check_loss(state: TrainState, batch, mask, where: str = "batch") -> None:
    """Trace the loss on ``batch`` without running it (``jax.eval_shape``), in train and eval
    mode: a batch that does not fit the model, or a loss that breaks the contract, gives one
    :class:`BatchError` naming the leaf and the model's complaint instead of an XLA traceback.
    """
    for apply, mode in ((apply_train_step, "training"), (apply_eval_step, "evaluation")):
        try:
            jax.eval_shape(lambda s, b, m: apply(s, b, m), state, batch, mask)
        except BatchError:  # the loss contract (_check_loss_outputs), already one line
            raise
        except Exception as exc:  # the user's model or loss: name it, do not bury it
            culprits = _culprits(batch, str(exc), "batch")
            leaves = "; ".join(culprits) if culprits else _describe(batch, "batch")
            raise BatchError(f"{where}: {leaves} does not fit the model or the loss (in {mode}). The model "
                             f"said{_user_frame(exc)}: {_complaint(exc)}") from None


def _check_loss_outputs(losses, metrics, batch_size: int, masked: bool):
    """The loss function's contract, checked at trace time with a message that says which part."""
    if not isinstance(metrics, dict):
        raise BatchError(f"loss_fn returned metrics of type {type(metrics).__name__}; it must return "
                         f"(losses, metrics) with metrics a dict of (B,) arrays")
    allowed = {(batch_size,)} | ({()} if masked else set())
    shapes = {"losses": losses, **{f"metric {k!r}": v for k, v in metrics.items()}}
    for name, value in shapes.items():
        shape = tuple(getattr(value, "shape", ()))
        if shape not in allowed:
            want = f"({batch_size},)" + (" or ()" if masked else "")
            raise BatchError(f"loss_fn returned {name} of shape {shape}; expected {want}: one value per example "
                             f"(declare a mask parameter to return batch-level scalars)")
    for reserved in ("loss", "count"):
        if reserved in metrics:
            raise BatchError(f"loss_fn returned a metric named {reserved!r}; jaxlight fills that one, pick another name")


def _float32_outputs(model):
    """``model`` whose calls return float32 (its floating outputs cast): under mixed precision
    the loss, its log-softmax and every reduction then run in float32, as ``torch.autocast``
    runs them (a bf16 cross-entropy rounds small losses to multiples of 1/16). A per-call
    subclass of the step's own copy of the module; the class itself is never modified."""
    cls = type(model)

    class _Float32(cls):
        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, out)

    _Float32.__name__ = _Float32.__qualname__ = cls.__name__
    model.__class__ = _Float32
    return cls


def _call_loss(state: TrainState, model, batch, mask):
    """``loss_fn(model, batch[, mask])``, its outputs checked against the contract (at trace time)."""
    masked = takes_mask(state.loss_fn)
    cls = _float32_outputs(model) if state.compute_dtype is not None else None
    try:
        out = state.loss_fn(model, batch, mask=mask) if masked else state.loss_fn(model, batch)
    finally:
        if cls is not None:
            model.__class__ = cls
    if not (isinstance(out, tuple) and len(out) == 2):
        raise BatchError(f"loss_fn returned {type(out).__name__}; it must return (losses, metrics)")
    _check_loss_outputs(*out, mask.shape[0], masked)
    return out


def _forward(params, state: TrainState, x):
    """``(outputs, model_state)`` of the train-mode model on inputs ``x`` (a built-in task's
    ``batch["x"]``), differentiable in ``params``: for parity checks that hold outputs."""
    model = _model(state, True, params)
    with _running_loss(jnp.ones((x.shape[0],), jnp.float32), None, state.compute_dtype):
        outputs = state.loss_fn.predict(model, {"x": x})
    return outputs, nnx.state(model, MODEL_STATE)


def _loss_fn(params, state: TrainState, batch):
    """``(loss, (metrics, model_state))`` of a batch dict with an optional ``"mask"``."""
    batch, mask = split_mask(state, batch)
    return _loss_for_grad(params, state, batch, jnp.asarray(mask, jnp.float32), None)


# --------------------------------------------------------------------------------------------
# Compiled forms


_train_step_jit = jax.jit(apply_train_step, donate_argnums=0)
_eval_step_jit = jax.jit(apply_eval_step)


def train_step(state: TrainState, batch, mask=None) -> tuple[TrainState, dict]:
    """One optimizer step: ``(state, batch) -> (state, metrics)``, jit-compiled, state donated.

    Args:
        state: the current state (donated: do not use it afterwards).
        batch: any pytree of arrays whose leaves share the leading batch axis (for the built-in
            tasks ``{"x": (B, ...) uint8|float, "y": (B,) int | (B, D) float}``).
        mask: ``(B,)``: 1 for real rows, 0 for padding (default: all real).

    Returns:
        The new state and ``{"loss", <metrics>, "count"}`` for this batch.

    Example:
        >>> state, metrics = train_step(state, {"x": images, "y": labels})   # doctest: +SKIP
    """
    check_not_donated(state)
    return _train_step_jit(state, *check_batch(state, batch, mask))


def eval_step(state: TrainState, batch, mask=None) -> dict:
    """Metrics of the eval-mode model on one batch, without updating anything."""
    check_not_donated(state)
    return _eval_step_jit(state, *check_batch(state, batch, mask))


def gather(data, rows):
    """The batch of ``rows`` of a dataset pytree (numpy or jax arrays)."""
    return jax.tree.map(lambda a: a[rows], data)


def _scan_steps(body, carry, xs, steps: int, unroll: bool = False):
    # A scan of length 1 would still be a while loop, which is what makes convolutions slow on
    # XLA:CPU; a single step runs at top level instead.
    if steps == 1:
        carry, out = body(carry, jax.tree.map(lambda a: a[0], xs))
        return carry, jax.tree.map(lambda a: a[None], out)
    return jax.lax.scan(body, carry, xs, unroll=unroll)


def chunk(step_fn, state, data, idx, mask, start, steps: int, unroll: bool = False, constrain=None):
    """``steps`` applications of ``step_fn(state, batch, mask) -> (state, out)`` over batches
    gathered from ``data`` by ``idx[start:start + steps]``; what every fused program runs."""
    idx_k = jax.lax.dynamic_slice_in_dim(idx, start, steps)
    mask_k = jax.lax.dynamic_slice_in_dim(mask, start, steps)

    def body(state, im):
        batch, m = gather(data, im[0]), im[1]
        if constrain is not None:
            batch, m = constrain((batch, m))
        return step_fn(state, batch, m)

    return _scan_steps(body, state, (idx_k, mask_k), steps, unroll)


def _eval_body(eval_fn):
    return lambda state, batch, mask: (state, eval_fn(state, batch, mask))


@functools.partial(jax.jit, static_argnums=(4,), static_argnames=("unroll",), donate_argnums=(0,))
def train_chunk(state: TrainState, data, idx, mask, steps: int, start=0, unroll: bool = False):
    """``steps`` training steps in one compiled program, on data that lives on the device.

    Args:
        state: donated.
        data: the whole training set on the device, a pytree (``ArrayDataset.data``).
        idx, mask: ``(num_batches, B)`` from ``jaxlight.data.batch_indices``.
        steps: how many batches to run (static: one compilation per value).
        start: index of the first batch (traced: no recompilation as it moves).
        unroll: unroll the scan into straight-line code (static). For convolutions on XLA:CPU
            (see ``needs_unroll``): inside a while loop XLA:CPU keeps autodiff's weight-gradient
            convolutions in a layout its fast kernels do not take, so they run 15-40x slower
            and sum in another order. Unrolled, every step compiles as at top level: the same
            bits as K single steps. Compile time grows with ``steps``.

    Returns:
        The new state and per-step metrics, each stacked to ``(steps,)``.
    """
    return chunk(apply_train_step, state, data, idx, mask, start, steps, unroll)


@functools.partial(jax.jit, static_argnums=(4,))
def eval_chunk(state: TrainState, data, idx, mask, steps: int, start=0):
    """Metrics of ``steps`` evaluation batches, stacked to ``(steps,)``; nothing is updated."""
    return chunk(_eval_body(apply_eval_step), state, data, idx, mask, start, steps)[1]


def _model_of(state_or_model):
    return state_or_model.module(train=True) if isinstance(state_or_model, TrainState) else state_or_model


def needs_unroll(state_or_model, backend: str | None = None) -> bool:
    """Whether ``train_chunk`` must unroll its scan to match single steps bit for bit: models on
    the CPU whose convolutions autodiff lowers differently inside a while loop (see
    ``jaxlight.models.has_scan_slow_conv`` and ``train_chunk``'s ``unroll``)."""
    backend = backend or jax.default_backend()
    return backend == "cpu" and has_scan_slow_conv(_model_of(state_or_model))


def default_steps_per_call(state_or_model, num_batches: int, backend: str | None = None) -> int:
    """K for ``train_chunk``: the whole epoch, except 1 on the CPU for a model whose convolutions
    are slow inside ``lax.scan`` (see ``jaxlight.models.has_scan_slow_conv``)."""
    backend = backend or jax.default_backend()
    if backend == "cpu" and has_scan_slow_conv(_model_of(state_or_model)):
        return 1
    return num_batches

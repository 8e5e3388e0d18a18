"""The one train step and the one eval step, pure; their jitted and fused (K steps) forms.

Every path runs the same two functions:

- :func:`apply_train_step` ``(state, batch, mask, axis_name=None) -> (state, metrics)``,
  :func:`apply_eval_step` ``(state, batch, mask, axis_name=None) -> metrics`` and
  :func:`apply_predict` ``(state, batch, mask, axis_name=None) -> outputs`` are pure and
  unjitted, for users who wrap them in their own ``jit`` / ``shard_map`` / ``pmap``
  (:func:`apply_grads` is the first half of the train step: the gradient and metrics). With
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
  ``fold_in(fold_in(state.key, step), i)`` (i: the key's position among the leaves of
  ``state.rng_state``), so dropout depends on the seed and the step alone: identical for any
  K, across a resume, under every strategy. Under
  ``pmap`` (``axis_name``) each device draws ``nnx.Dropout``'s mask for the whole global batch
  and keeps its rows, so the masks are one device's; other random draws in a user's model get
  the same key on every device (fold in ``jax.lax.axis_index`` for per-device noise).
- **Padding.** The padding mask never reaches the loss as data: the loss's ``(B,)`` values are
  averaged under it, and every ``nnx.BatchNorm`` computes its statistics over the real rows
  of the global batch only (``jaxlight.layers``: Flax's own arithmetic through its ``mask=``
  argument; a BatchNorm whose input does not keep the batch axis first is an error).
- **Mixed precision** (``state.compute_dtype``): parameters and floating batch leaves are cast
  inside the differentiated function; gradients and optimizer state stay float32. The model's
  outputs reach the loss as float32, so losses, metrics and their means are float32 whatever
  the compute dtype.

Every compiled function donates the incoming state: do not use a state after passing it in
(:class:`DonatedStateError` says so if you do).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlight.data.stream import check_structure, leaf_name
from jaxlight.errors import BatchError, DonatedStateError
from jaxlight.layers import LayerError, StandIn, stand_ins
from jaxlight.metrics import Metric
from jaxlight.models import has_scan_slow_conv
from jaxlight.state import MODEL_STATE, TrainState
from jaxlight.tasks import _COMPUTE_DTYPE, Task, compute_dtype, takes_mask

__all__ = [
    "BatchError",
    "DonatedStateError",
    "apply_train_step",
    "apply_step",
    "apply_grads",
    "apply_optimizer",
    "apply_accumulated_step",
    "apply_eval_step",
    "apply_predict",
    "model_outputs",
    "compute_dtype",
    "split_mask",
    "check_batch",
    "check_loss",
    "train_step",
    "eval_step",
    "predict_step",
    "train_chunk",
    "accumulated_step",
    "accumulated_chunk",
    "eval_chunk",
    "gather",
    "default_steps_per_call",
    "needs_unroll",
    "Compiled",
    "set_program_cache_size",
    "without_optimizer",
]


def check_not_donated(state: TrainState) -> None:
    """Raise :class:`DonatedStateError` if ``state``'s buffers were donated to an earlier step."""
    if isinstance(state.step, jax.Array) and state.step.is_deleted():
        raise DonatedStateError(
            "this TrainState was donated to a compiled step (train_step, fit, Trainer.fit...) and its "
            "buffers are gone; use the state that call returned")


@contextlib.contextmanager
def _running_loss(model, mask, axis_name, dtype):
    """While the user's loss is traced on ``model`` (the step's own merged copy): padding-aware
    BatchNorm and, under a mapped axis, global-batch dropout (``jaxlight.layers``), and the
    compute dtype (:func:`compute_dtype`)."""
    token = _COMPUTE_DTYPE.set(dtype)
    try:
        with stand_ins(model, mask, axis_name):
            yield
    except LayerError as exc:
        raise BatchError(str(exc)) from None
    finally:
        _COMPUTE_DTYPE.reset(token)


# --------------------------------------------------------------------------------------------
# The pure steps

_NO_ACCUMULATION = ("gradient accumulation (accumulate_grad_batches) averages the gradients of the built-in step; "
                    "a state with its own step_fn accumulates inside that step, if it needs to")


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
    """Masked means over the real rows of the (global) batch: ``(loss, {"loss", ..., "count"})``;
    a :class:`~jaxlight.metrics.Metric` comes out as its statistics summed over those rows.

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
    # A Metric's statistics are summed over the real rows (its value comes from the split's sums).
    values = {"loss": loss, **{k: v.reduce(mask) if isinstance(v, Metric) else share(v) for k, v in metrics.items()}}
    if axis_name is not None:
        values = jax.lax.psum(values, axis_name)
    return loss, {**values, "count": total}


def _loss_for_grad(params, state: TrainState, batch, mask, axis_name, loss_fn=None):
    dtype = state.compute_dtype
    model = _model(state, True, params, _step_rng_state(state, axis_name))
    with _running_loss(model, mask, axis_name, dtype):
        losses, metrics = _call_loss(state, model, _cast(batch, dtype), mask, loss_fn)
    loss, metrics = _reduce(losses, metrics, mask, axis_name)
    model_state = nnx.state(model, MODEL_STATE)
    return loss, (metrics, model_state)


def apply_grads(state: TrainState, batch, mask, axis_name: str | None = None, loss_fn=None):
    """The gradient of the masked mean loss, pure: ``-> (grads, metrics, model_state)``.

    The first half of :func:`apply_train_step` (which adds the Optax update): ``grads`` is the
    gradient of the global batch's mean loss (``psum``-ed over ``axis_name``) with respect to
    every parameter, ``metrics`` its ``{"loss", <the loss's metrics>, "count"}`` over the real
    rows, ``model_state`` the model's updated batch statistics. The model runs in train mode
    with this step's dropout keys, on the real rows, as in the built-in step.

    ``loss_fn``: another loss than the state's, with the same contract (a step of your own that
    takes the gradients of several losses: a GAN's discriminator and generator losses).
    """
    grads, (metrics, model_state) = jax.grad(_loss_for_grad, has_aux=True)(state.params, state, batch, mask,
                                                                         axis_name, loss_fn)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
    return grads, metrics, model_state


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
    grads, metrics, model_state = apply_grads(state, batch, mask, axis_name)
    return _apply_gradients(state, grads, model_state), metrics


def _apply_gradients(state: TrainState, grads, model_state) -> TrainState:
    """The optimizer update every train step ends with: one ``tx.update``, ``step + 1``."""
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)


def apply_optimizer(state: TrainState, grads, model_state=None, part: str | None = None) -> TrainState:
    """``state`` after one update of its optimizer with ``grads``, pure; ``step`` is not
    advanced (:func:`apply_step` counts a step of your own once).

    Args:
        state: the current state.
        grads: a gradient of the shape of ``state.params`` (:func:`apply_grads`).
        model_state: the model's new batch statistics, when they changed.
        part: with an optimizer built by ``jaxlight.optim.parts({"generator": ..., ...})``,
            update only that part: its parameters, with its own optimizer and state (the
            other parts, their optimizer states and their ``grads`` are left alone).
    """
    if part is None:
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    else:
        from jaxlight.optim import PartsState

        found = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, PartsState))
                 if isinstance(s, PartsState)]
        if not found or part not in found[0].states:
            names = sorted(found[0].states) if found else None
            raise ValueError(f"apply_optimizer(part={part!r}) needs an optimizer built by jaxlight.optim.parts "
                             f"with that part" + (f"; its parts are {names}" if names else ""))
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params, part=part)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(params=params, opt_state=opt_state)
    return new if model_state is None else new.replace(model_state=model_state)


def apply_step(state: TrainState, batch, mask, axis_name: str | None = None):
    """The train step every path runs (fused chunks, host steps, every strategy, the Trainer).

    The state's own ``step_fn`` when it has one (``create_train_state(..., step_fn=...)``), else
    :func:`apply_train_step`. A step of your own has the signature of :func:`apply_train_step`,
    ``step_fn(state, batch, mask, axis_name=None) -> (state, metrics)``, and is pure (it is
    traced once into the compiled program). The engine around it is the built-in one: the
    padded, masked batches, K steps per compiled call, checkpoints that resume exactly, the
    strategies (with ``axis_name`` under ``pmap``: reduce over it, as :func:`apply_grads`
    does). Its contract, checked when it is first traced (:class:`BatchError` otherwise):

    - it returns a state of the same structure, shapes and dtypes; jaxlight advances
      ``step`` by one (the step number that dropout keys, the data position and the learning
      rate schedules count);
    - ``metrics`` holds ``"loss"`` (what the NaN check, the progress bar and the loggers read)
      and scalars (the batch's values over its real rows, averaged over an epoch weighted by
      real rows) or :class:`~jaxlight.metrics.Metric` sums; ``"count"`` (the real rows) is
      filled in when absent.

    Building blocks: :func:`apply_grads` (the gradient of any loss over the real rows) and
    :func:`apply_optimizer` (one update, of one part with ``jaxlight.optim.parts``).
    """
    if state.step_fn is None:
        return apply_train_step(state, batch, mask, axis_name)
    out = state.step_fn(state, batch, mask, axis_name)
    new, metrics = _check_step_outputs(state, out, mask, axis_name)
    return new.replace(step=state.step + 1), metrics


def _check_step_outputs(state: TrainState, out, mask, axis_name):
    """A step of your own's ``(state, metrics)``, checked against the contract at trace time."""
    name = getattr(state.step_fn, "__name__", "step_fn")
    if not (isinstance(out, tuple) and len(out) == 2):
        raise BatchError(f"{name} returned {type(out).__name__}; a train step returns (state, metrics)")
    new, metrics = out
    if not isinstance(new, TrainState):
        raise BatchError(f"{name} returned {type(new).__name__} as its state; it returns a TrainState "
                         f"(state.replace(params=..., opt_state=...))")
    before, after = jax.tree_util.tree_flatten_with_path(state), jax.tree_util.tree_flatten_with_path(new)
    if before[1] != after[1]:
        raise BatchError(f"{name} returned a state of another structure than it was given; keep every field's "
                         f"tree (params, opt_state, model_state...) as it came in")
    for (path, a), (_, b) in zip(before[0], after[0]):
        if (jnp.shape(a), jnp.result_type(a)) != (jnp.shape(b), jnp.result_type(b)):
            raise BatchError(f"{name} returned state{jax.tree_util.keystr(path)} as {jnp.shape(b)} "
                             f"{jnp.result_type(b)}; it came in as {jnp.shape(a)} {jnp.result_type(a)}")
    if not isinstance(metrics, dict) or "loss" not in metrics:
        got = sorted(metrics) if isinstance(metrics, dict) else type(metrics).__name__
        raise BatchError(f"{name} returned metrics {got}; they are a dict with a 'loss' (what the NaN check, the "
                         f"progress bar and the loggers read)")
    checked = {}
    for key, value in metrics.items():
        if isinstance(value, Metric):
            checked[key] = value
            continue
        if jnp.shape(value) != ():
            raise BatchError(f"{name} returned metric {key!r} of shape {jnp.shape(value)}; a train step's metrics are "
                             f"scalars (the batch's value over its real rows) or jaxlight.metrics sums")
        checked[key] = jnp.asarray(value, jnp.float32)
    if "count" not in checked:
        count = jnp.sum(mask)
        checked["count"] = jax.lax.psum(count, axis_name) if axis_name is not None else count
    return new, checked


def apply_accumulated_step(state: TrainState, batches, masks, axis_name: str | None = None,
                           unroll: bool = False):
    """One optimizer step over a window of ``A`` micro-batches (gradient accumulation), pure.

    The update uses the example-weighted mean gradient over the real rows of the window: each
    micro-batch's gradient of its masked mean loss, weighted by its real rows, summed and
    divided by the window's real rows. Without batch-coupled layers that is exactly the
    gradient one batch of those rows would give (to float32 rounding of the summation order),
    whatever padding the micro-batches hold; an all-padding micro-batch (one that fills the
    last window of an epoch) adds nothing. Then one ``tx.update``: ``state.step`` counts
    optimizer updates, one per window.

    BatchNorm (any batch-statistics normalisation) sees each micro-batch on its own, as in
    PyTorch Lightning: its statistics are those of the micro-batch's real rows, and the running
    averages are updated once per micro-batch that has real rows, in order. Dropout draws for
    micro-batch ``j`` from ``fold_in(state.key, j)`` folded with the step, so the micro-batches
    of a window draw different masks.

    Args:
        state: the current state.
        batches: any pytree of arrays with leading axes ``(A, B)``: ``A`` micro-batches of
            ``B`` rows (``jax.tree.map(lambda *m: np.stack(m), *micro_batches)``).
        masks: ``(A, B)`` float32: 1.0 for real rows, 0.0 for padding.
        axis_name: inside ``pmap``/``shard_map``, the mapped axis each micro-batch is split over.
        unroll: unroll the loop over micro-batches (see ``train_chunk``'s ``unroll``).

    Returns:
        The new state and ``{"loss", <the loss's metrics>, "count"}``: example-weighted means
        over the real rows of the window, ``count`` their number.

    Example (a window of 2 micro-batches of 3 rows, the last row of the second one padding):
        >>> import numpy as np
        >>> from flax import nnx
        >>> from jaxlight import create_train_state, optim, tasks
        >>> from jaxlight.models import LinearRegression
        >>> state = create_train_state(LinearRegression(2, rngs=nnx.Rngs(0)), optim.sgd(0.1), tasks.regression())
        >>> batches = {"x": np.ones((2, 3, 2), np.float32), "y": np.zeros((2, 3, 1), np.float32)}
        >>> masks = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
        >>> state, metrics = jax.jit(apply_accumulated_step)(state, batches, masks)
        >>> int(state.step), float(metrics["count"])
        (1, 5.0)
    """
    if state.step_fn is not None:
        raise ValueError(_NO_ACCUMULATION)
    def micro(carry, xs):
        grads, model_state = carry
        j, batch, mask = xs
        micro_state = state.replace(model_state=model_state, key=jax.random.fold_in(state.key, j))
        g, (metrics, new_model_state) = jax.grad(_loss_for_grad, has_aux=True)(
            state.params, micro_state, batch, mask, axis_name)
        count = metrics["count"]  # real rows of this micro-batch (over every device)
        grads = jax.tree.map(lambda total, x: total + x * count, grads, g)
        model_state = jax.tree.map(lambda new, old: jnp.where(count > 0, new, old), new_model_state, model_state)
        return (grads, model_state), metrics

    a = jnp.shape(masks)[0]
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, model_state), stacked = jax.lax.scan(
        micro, (zeros, state.model_state), (jnp.arange(a), batches, masks), unroll=unroll)
    counts = stacked["count"]
    total = jnp.sum(counts)
    denom = jnp.maximum(total, 1.0)
    grads = jax.tree.map(lambda x: x / denom, grads)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
    metrics = {k: jax.tree.map(lambda a: jnp.sum(a, axis=0), v) if isinstance(v, Metric)
               else jnp.sum(v * counts) / denom for k, v in stacked.items() if k != "count"}
    return _apply_gradients(state, grads, model_state), {**metrics, "count": total}


def apply_eval_step(state: TrainState, batch, mask, axis_name: str | None = None) -> dict:
    """The loss and metrics of the eval-mode model on one batch, pure; nothing is updated."""
    model = _model(state, False)
    with _running_loss(model, mask, axis_name, state.compute_dtype):
        losses, metrics = _call_loss(state, model, _cast(batch, state.compute_dtype), mask)
    return _reduce(losses, metrics, mask, axis_name)[1]


def apply_predict(state: TrainState, batch, mask=None, axis_name: str | None = None, predict_fn=None,
                  train: bool = False):
    """The model's outputs on one batch (any pytree whose leaves keep the batch axis), pure.

    ``predict_fn(model, batch)`` gives them; by default a built-in task's ``predict``, and for
    a user's loss the return value of the first call of the model inside ``loss_fn`` (so
    ``loss_fn`` must run on the batch: give ``predict_fn`` for batches without labels).
    ``train=True`` runs the train-mode graph (dropout keys of this step, BatchNorm on the
    batch's real rows; the statistics it computes are dropped), as the train step's forward.
    Padding rows come out too; the caller drops them (``jaxlight.loop.predict``).
    """
    dtype = state.compute_dtype
    mask = jnp.ones((_batch_size(batch),), jnp.float32) if mask is None else mask
    model = _model(state, train, rng_state=_step_rng_state(state, axis_name) if train else None)
    batch = _cast(batch, dtype)
    with _running_loss(model, mask, axis_name, dtype):
        if predict_fn is not None:
            return predict_fn(model, batch)
        return model_outputs(state.loss_fn, model, batch, mask)


def model_outputs(loss_fn, model, batch, mask):
    """What prediction returns by default: a built-in task's ``predict``, or the value of the
    first ``model(...)`` call inside a user's ``loss_fn``."""
    if isinstance(loss_fn, Task):
        return loss_fn.predict(model, batch)
    return _first_model_call(model, lambda m: _call_loss_fn(loss_fn, m, batch, mask))


class _FirstCall(StandIn):
    """The model as a loss function sees it, recording what its first call returned; every
    other attribute is the model's own."""

    def __init__(self, model):
        super().__init__(model)
        self.outputs = []

    def __call__(self, *args, **kwargs):
        out = self.wrapped(*args, **kwargs)
        if not self.outputs:
            self.outputs.append(out)
        return out


def _first_model_call(model, run):
    """What ``model(...)`` returned the first time ``run(model)`` called it."""
    recording = _FirstCall(model)
    run(recording)
    if not recording.outputs:
        raise BatchError("predict: loss_fn never called the model, so there are no outputs to return; "
                         "pass predict_fn=lambda model, batch: ...")
    return recording.outputs[0]


# --------------------------------------------------------------------------------------------
# Batches: the padding mask apart from the data, and checks before XLA


def _batch_size(batch) -> int:
    return int(jax.tree.leaves(batch)[0].shape[0])


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


def check_batch(state: TrainState, batch, mask=None, where: str = "batch", labels: bool = True):
    """Validate one host batch cheaply (no device transfer, no tracing); returns ``(batch, mask)``.

    Checks the structure always, and for the built-in tasks the shapes, dtypes and (host numpy)
    label values. Whether the batch fits the model is :func:`check_loss`'s job (once per run).
    ``labels=False`` (prediction) lets a built-in task's batch come without ``"y"``.
    """
    batch, mask = split_mask(state, batch, mask)
    if isinstance(state.loss_fn, Task) and not labels and isinstance(batch, dict) and "y" not in batch:
        x = batch.get("x")
        if x is None or not hasattr(x, "shape"):
            raise BatchError(f"{where}: the {state.loss_fn.name} task predicts from a batch dict with key 'x', "
                             f"got {type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
        if state.input_shape is not None and tuple(x.shape[1:]) != tuple(state.input_shape):
            raise BatchError(f"{where}['x'] has shape {tuple(x.shape)}; the model takes "
                             f"(batch, {', '.join(map(str, state.input_shape))})")
    elif isinstance(state.loss_fn, Task):
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


# What check_loss has already traced without error: (mode, tree structure, leaf types), as
# jit's own cache keys a trace. The structure holds the static parts (graphdefs, optimizer,
# loss function), so a second run of the same model on batches of the same shapes (another
# fit, a resume, a validation set) is not traced again. Bounded: a key keeps its objects alive.
_CHECKED: collections.OrderedDict = collections.OrderedDict()
_CHECKED_MAX = 64
_CHECKED_LOCK = threading.Lock()


def _trace_key(*args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    try:
        key = (tree, tuple(jax.typeof(a) for a in leaves))
        hash(key)
    except TypeError:  # an unhashable static part or leaf: check it every time
        return None
    return key


def check_loss(state: TrainState, batch, mask, where: str = "batch") -> None:
    """Trace the loss on ``batch`` without running it (``jax.eval_shape``), in train and eval
    mode: a batch that does not fit the model, or a loss that breaks the contract, gives one
    :class:`BatchError` naming the leaf and the model's complaint instead of an XLA traceback.

    A state and batch of the same structure and types as one already checked are not traced
    again (as ``jax.jit`` does not trace again what it has traced).
    """
    # (evaluation sees the state as its programs do, without the optimizer: one check for every optimizer)
    for apply, mode, checked in ((apply_step, "training", state), (apply_eval_step, "evaluation",
                                                                    without_optimizer(state))):
        types = _trace_key(checked, batch, mask)
        key = None if types is None else (mode, *types)
        with _CHECKED_LOCK:
            if key is not None and key in _CHECKED:
                _CHECKED.move_to_end(key)
                continue
        try:
            jax.eval_shape(lambda s, b, m: apply(s, b, m), checked, batch, mask)
        except BatchError:  # the loss contract (_check_loss_outputs), already one line
            raise
        except Exception as exc:  # the user's model or loss: name it, do not bury it
            culprits = _culprits(batch, str(exc), "batch")
            leaves = "; ".join(culprits) if culprits else _describe(batch, "batch")
            raise BatchError(f"{where}: {leaves} does not fit the model or the loss (in {mode}). The model "
                             f"said{_user_frame(exc)}: {_complaint(exc)}") from None
        if key is not None:
            with _CHECKED_LOCK:
                _CHECKED[key] = None
                if len(_CHECKED) > _CHECKED_MAX:
                    _CHECKED.popitem(last=False)


def _check_loss_outputs(losses, metrics, batch_size: int, masked: bool):
    """The loss function's contract, checked at trace time with a message that says which part."""
    if not isinstance(metrics, dict):
        raise BatchError(f"loss_fn returned metrics of type {type(metrics).__name__}; it must return "
                         f"(losses, metrics) with metrics a dict of (B,) arrays")
    allowed = {(batch_size,)} | ({()} if masked else set())
    for k, v in metrics.items():
        problem = v.check(batch_size, k) if isinstance(v, Metric) else None
        if problem:
            raise BatchError(f"loss_fn returned {problem}")
    shapes = {"losses": losses, **{f"metric {k!r}": v for k, v in metrics.items() if not isinstance(v, Metric)}}
    for name, value in shapes.items():
        shape = tuple(getattr(value, "shape", ()))
        if shape not in allowed:
            want = f"({batch_size},)" + (" or ()" if masked else "")
            raise BatchError(f"loss_fn returned {name} of shape {shape}; expected {want}: one value per example "
                             f"(declare a mask parameter to return batch-level scalars)")
    for reserved in ("loss", "count"):
        if reserved in metrics:
            raise BatchError(f"loss_fn returned a metric named {reserved!r}; jaxlight fills that one, pick another name")


class _Float32Outputs(StandIn):
    """The model as the loss sees it under mixed precision: its calls return float32 (floating
    outputs cast), so the loss, its log-softmax and every reduction run in float32, as
    ``torch.autocast`` runs them (a bf16 cross-entropy rounds small losses to multiples of
    1/16). Every attribute is the model's own; only ``model(...)`` is cast."""

    def __call__(self, *args, **kwargs):
        out = self.wrapped(*args, **kwargs)
        return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, out)


def _call_loss(state: TrainState, model, batch, mask, loss_fn=None):
    """``loss_fn(model, batch[, mask])`` (the state's by default), its outputs checked against
    the contract (at trace time)."""
    model = _Float32Outputs(model) if state.compute_dtype is not None else model
    return _call_loss_fn(loss_fn or state.loss_fn, model, batch, mask)


def _call_loss_fn(loss_fn, model, batch, mask):
    masked = takes_mask(loss_fn)
    out = loss_fn(model, batch, mask=mask) if masked else loss_fn(model, batch)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise BatchError(f"loss_fn returned {type(out).__name__}; it must return (losses, metrics)")
    _check_loss_outputs(*out, mask.shape[0], masked)
    return out


# --------------------------------------------------------------------------------------------
# Compiled forms, kept per configuration of the state


def without_optimizer(state: TrainState) -> TrainState:
    """``state`` without its optimizer and optimizer state: what evaluation and prediction
    compile against, so that one program serves every optimizer (a sweep's trials)."""
    if state.tx is None and state.opt_state is None:
        return state
    return state.replace(tx=None, opt_state=None)


_STATIC = ("graphdef", "eval_graphdef", "tx", "loss_fn", "input_shape", "compute_dtype", "step_fn")


class _ProgramCache:
    """The compiled programs of every :class:`Compiled` function, grouped by the state's static
    configuration (its graphdefs, optimizer, loss, step, precision), the ``size`` most recently
    used configurations kept. A sweep that builds a new optimizer per trial with other
    hyperparameters (``optax.adam(lr)``) needs new programs every trial; the oldest trial's are
    dropped, so memory stays flat. Configurations are told apart by equality (an equal
    optimizer built anew shares the programs) and looked up by identity first (hashing a
    graphdef costs more than a small step)."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._tokens: dict = {}                           # static config -> token
        self._by_id: collections.OrderedDict = collections.OrderedDict()  # ids -> (objects, token)
        self._programs: collections.OrderedDict = collections.OrderedDict()  # token -> {Compiled: program}
        self._next = 0

    def _token(self, state) -> int:
        objects = tuple(getattr(state, name) for name in _STATIC)
        ids = tuple(map(id, objects))
        hit = self._by_id.get(ids)
        if hit is not None and all(a is b for a, b in zip(hit[0], objects)):
            self._by_id.move_to_end(ids)
            return hit[1]
        token = self._tokens.get(objects)
        if token is None:
            token = self._tokens[objects] = self._next
            self._next += 1
        self._by_id[ids] = (objects, token)
        while len(self._by_id) > 4 * self.size:
            self._by_id.popitem(last=False)
        return token

    def get(self, state, function: "Compiled"):
        with self._lock:
            token = self._token(state)
            programs = self._programs.get(token)
            if programs is None:
                programs = self._programs[token] = {}
                while len(self._programs) > self.size:
                    self._evict(next(iter(self._programs)))
            self._programs.move_to_end(token)
            program = programs.get(function)
            if program is None:
                program = programs[function] = function.build()
            return program

    def _evict(self, token: int) -> None:
        del self._programs[token]
        self._tokens = {k: v for k, v in self._tokens.items() if v != token}
        for ids in [i for i, (_, t) in self._by_id.items() if t == token]:
            del self._by_id[ids]

    def programs_of(self, function: "Compiled") -> list:
        with self._lock:
            return [p[function] for p in self._programs.values() if function in p]

    def forget(self, function: "Compiled") -> None:
        with self._lock:
            for programs in self._programs.values():
                programs.pop(function, None)

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = size
            while len(self._programs) > size:
                self._evict(next(iter(self._programs)))


PROGRAMS = _ProgramCache(8)


def set_program_cache_size(configurations: int) -> None:
    """Keep the compiled programs of this many state configurations (default 8); the least
    recently used configuration's programs are dropped beyond it (and compiled again if it
    comes back)."""
    if not isinstance(configurations, int) or configurations < 1:
        raise ValueError(f"configurations must be an int >= 1, got {configurations!r}")
    PROGRAMS.resize(configurations)


class Compiled:
    """``fn`` compiled by ``make`` (``jax.jit`` with ``options``, or a ``pmap``), one program
    set per configuration of the state (its first argument) in :data:`PROGRAMS`, so that the
    programs of configurations no longer used are freed (a ``jax.jit`` keeps every program it
    ever compiled). Called, lowered (``.lower``) and counted (``._cache_size()``) as a jitted
    function. ``evaluation=True``: the state's optimizer is left out (:func:`without_optimizer`).

    The state a training program returns carries the caller's static fields (its optimizer
    object, not an equal one from the call that compiled the program).
    """

    def __init__(self, fn, make=jax.jit, evaluation: bool = False, **options):
        functools.update_wrapper(self, fn)
        self.fn, self.make, self.options, self.evaluation = fn, make, options, evaluation

    def build(self):
        fn = self.fn
        # A new function object per configuration: JAX's tracing caches hold it weakly, so
        # they are freed with the program.
        fresh = functools.wraps(fn)(lambda *args, **kwargs: fn(*args, **kwargs))
        return self.make(fresh, **self.options)

    def _program(self, state):
        return PROGRAMS.get(state, self)

    def __call__(self, state, *args, **kwargs):
        if self.evaluation:
            state = without_optimizer(state)
        out = self._program(state)(state, *args, **kwargs)
        return _with_statics(out, state)

    def lower(self, state, *args, **kwargs):
        if self.evaluation:
            state = without_optimizer(state)
        return self._program(state).lower(state, *args, **kwargs)

    def _cache_size(self) -> int:
        return sum(p._cache_size() for p in PROGRAMS.programs_of(self) if hasattr(p, "_cache_size"))

    def clear_cache(self) -> None:
        PROGRAMS.forget(self)


def _with_statics(out, state):
    """``out`` (a state, or a tuple starting with one) with ``state``'s static fields."""
    new = out[0] if isinstance(out, tuple) and out and isinstance(out[0], TrainState) else out
    if not isinstance(new, TrainState) or all(getattr(new, n) is getattr(state, n) for n in _STATIC):
        return out
    new = new.replace(**{n: getattr(state, n) for n in _STATIC})
    return (new, *out[1:]) if isinstance(out, tuple) else new


def compiled(evaluation: bool = False, **options):
    """``@compiled(static_argnums=..., donate_argnums=...)``: a :class:`Compiled` ``jax.jit``."""
    return lambda fn: Compiled(fn, jax.jit, evaluation, **options)


_train_step_jit = Compiled(apply_step, donate_argnums=0)
_eval_step_jit = Compiled(apply_eval_step, evaluation=True)


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
        >>> import numpy as np
        >>> from flax import nnx
        >>> from jaxlight import create_train_state, optim, tasks
        >>> from jaxlight.models import LinearRegression
        >>> state = create_train_state(LinearRegression(2, rngs=nnx.Rngs(0)), optim.sgd(0.1), tasks.regression())
        >>> x, y = np.ones((4, 2), np.float32), np.zeros((4, 1), np.float32)
        >>> state, metrics = train_step(state, {"x": x, "y": y})
        >>> int(state.step), sorted(metrics)
        (1, ['count', 'loss', 'mse'])
    """
    check_not_donated(state)
    return _train_step_jit(state, *check_batch(state, batch, mask))


def eval_step(state: TrainState, batch, mask=None) -> dict:
    """Metrics of the eval-mode model on one batch, without updating anything."""
    check_not_donated(state)
    return _eval_step_jit(state, *check_batch(state, batch, mask))


@compiled(evaluation=True, static_argnames=("predict_fn",))
def _predict_jit(state, batch, mask, predict_fn=None):
    return apply_predict(state, batch, mask, predict_fn=predict_fn)


def predict_step(state: TrainState, batch, mask=None, predict_fn=None):
    """The eval-mode model's outputs on one batch, jit-compiled (padding rows included)."""
    check_not_donated(state)
    return _predict_jit(state, *check_batch(state, batch, mask, labels=False), predict_fn=predict_fn)


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


@compiled(static_argnums=(4,), static_argnames=("unroll",), donate_argnums=(0,))
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
    return chunk(apply_step, state, data, idx, mask, start, steps, unroll)


@compiled(static_argnames=("unroll",), donate_argnums=(0,))
def accumulated_step(state: TrainState, batches, masks, unroll: bool = False):
    """:func:`apply_accumulated_step` jit-compiled, state donated: one optimizer update over a
    window of host micro-batches ``(A, B, ...)``, masks ``(A, B)``."""
    return apply_accumulated_step(state, batches, masks, unroll=unroll)


@compiled(static_argnums=(4,), static_argnames=("unroll",), donate_argnums=(0,))
def accumulated_chunk(state: TrainState, data, idx, mask, steps: int, start=0, unroll: bool = False):
    """``steps`` optimizer updates with gradient accumulation in one compiled program.

    As :func:`train_chunk`, but ``idx``/``mask`` are ``(num_windows, A, B)``
    (``jaxlight.data.windows``) and each step is :func:`apply_accumulated_step` over the ``A``
    micro-batches of a window; ``start`` and ``steps`` count windows.
    """
    body = functools.partial(apply_accumulated_step, unroll=unroll)
    return chunk(body, state, data, idx, mask, start, steps, unroll)


@compiled(evaluation=True, static_argnums=(4,))
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

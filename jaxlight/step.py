"""The pure, compiled steps: ``train_step``, ``eval_step`` and K steps fused in one program.

Three ways to run an epoch, one step function underneath:

- ``train_step(state, batch)``: one jitted step, for batches that come from the host.
- ``train_chunk(state, data, idx, mask, start, K)``: K steps in one compiled program, a
  ``lax.scan`` over batches gathered on the device from a dataset that lives there. With K equal
  to the number of batches the whole epoch is one program (a *fused* epoch); with K = 1 it is
  one dispatch per step.
- ``default_steps_per_call``: which K is faster. Fused is faster everywhere (no per-step
  dispatch). XLA:CPU used to run a convolution's autodiff kernel gradient inside ``lax.scan`` (a
  while loop) 15-40x slower than at top level (jax 0.10.2: at top level it rewrites the
  convolution into the layout its fast runtime takes, inside a while loop it does not and emits
  a naive loop nest). ``jaxlight.models.cnn.conv2d_nhwc`` spells that layout out in a custom
  gradient, so the built-in CNN is fused too; a model with a plain ``nnx.Conv`` still defaults
  to K = 1 on the CPU.

Every compiled function donates the incoming state: do not use a state after passing it in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlight.data.arrays import gather_batch, prepare_x
from jaxlight.models import has_scan_slow_conv
from jaxlight.state import TrainState

__all__ = [
    "BatchError",
    "check_batch",
    "train_step",
    "eval_step",
    "train_chunk",
    "eval_chunk",
    "default_steps_per_call",
    "needs_unroll",
]


class BatchError(ValueError):
    """A batch with the wrong shape, dtype or labels; raised before XLA sees it."""


def _forward(params, state: TrainState, x):
    x = prepare_x(x)
    if state.compute_dtype is not None:
        # Mixed precision: the cast sits inside the differentiated function, so gradients
        # flow back to the float32 parameters through it and come out float32.
        cast = lambda a: a.astype(state.compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
        params, x = jax.tree.map(cast, params), cast(x)
    model = nnx.merge(state.graphdef, params, state.model_state)
    outputs = model(x)
    if state.compute_dtype is not None:
        outputs = outputs.astype(jnp.float32)
    return outputs, nnx.state(model, nnx.Not(nnx.Param))


def _loss_fn(params, state: TrainState, batch):
    outputs, model_state = _forward(params, state, batch["x"])
    loss, metrics = state.task.loss_and_metrics(outputs, batch["y"], batch["mask"])
    return loss, (metrics, model_state)


def _train_step(state: TrainState, batch):
    grads, (metrics, model_state) = jax.grad(_loss_fn, has_aux=True)(state.params, state, batch)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
    )
    return new_state, metrics


def _eval_step(state: TrainState, batch):
    outputs, _ = _forward(state.params, state, batch["x"])
    _, metrics = state.task.loss_and_metrics(outputs, batch["y"], batch["mask"])
    return metrics


_train_step_jit = jax.jit(_train_step, donate_argnums=0)
_eval_step_jit = jax.jit(_eval_step)


def check_batch(state: TrainState, batch: dict) -> dict:
    """Validate a batch against the state's model and task; add an all-ones ``mask`` if absent.

    Checks shapes and dtypes always (free: no device transfer) and label values when the labels
    are host numpy arrays (device arrays would need a synchronising read each step; datasets are
    checked once when they are built, see ``jaxlight.loop.check_dataset``).
    """
    if not isinstance(batch, dict) or not {"x", "y"} <= set(batch):
        raise BatchError(f"a batch is a dict with keys 'x' and 'y' (and optionally 'mask'), got {type(batch).__name__}"
                         + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
    x, y = batch["x"], batch["y"]
    for name, arr in (("x", x), ("y", y)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise BatchError(f"batch['{name}'] must be an array, got {type(arr).__name__}")
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise BatchError(f"batch['x'] has shape {x.shape} and batch['y'] {y.shape}: their first "
                         f"(batch) dimensions must match")
    if state.input_shape is not None and tuple(x.shape[1:]) != tuple(state.input_shape):
        raise BatchError(f"batch['x'] has shape {tuple(x.shape)}; the model takes "
                         f"(batch, {', '.join(map(str, state.input_shape))})")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.uint8):
        raise BatchError(f"batch['x'] has dtype {x.dtype}; expected uint8 images or floats")
    task = state.task
    if task.num_classes is not None:
        if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim != 1:
            raise BatchError(f"batch['y'] has dtype {y.dtype} and shape {tuple(y.shape)}; a "
                             f"{task.name} task takes (batch,) integer labels")
        if isinstance(y, np.ndarray) and y.size and (y.min() < 0 or y.max() >= task.num_classes):
            bad = int(np.argmax((y < 0) | (y >= task.num_classes)))
            raise BatchError(f"batch['y'][{bad}] = {int(y[bad])} is outside [0, {task.num_classes}) "
                             f"for the {task.name} task")
    elif not jnp.issubdtype(y.dtype, jnp.floating):
        raise BatchError(f"batch['y'] has dtype {y.dtype}; a regression task takes float targets")
    mask = batch.get("mask")
    if mask is None:
        mask = np.ones((x.shape[0],), np.float32)
    elif tuple(mask.shape) != (x.shape[0],):
        raise BatchError(f"batch['mask'] has shape {tuple(mask.shape)}, expected ({x.shape[0]},)")
    if isinstance(y, np.ndarray) and task.num_classes is not None:
        y = y.astype(np.int32)
    return {"x": x, "y": y, "mask": jnp.asarray(mask, jnp.float32)}


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step: ``(state, batch) -> (state, metrics)``, jit-compiled, state donated.

    Args:
        state: the current state (donated: do not use it afterwards).
        batch: ``{"x": (B, *input_shape) uint8|float, "y": (B,) int32 | (B, D) float,
            "mask": (B,) float32, optional}``. uint8 images are scaled by 1/255 inside.

    Returns:
        The new state and ``{"loss", "accuracy"|"mse", "count"}`` for this batch.

    Example:
        >>> state, metrics = train_step(state, {"x": images, "y": labels})   # doctest: +SKIP
    """
    return _train_step_jit(state, check_batch(state, batch))


def eval_step(state: TrainState, batch: dict) -> dict:
    """Metrics of the model on one batch, without updating anything."""
    return _eval_step_jit(state, check_batch(state, batch))


def _scan_steps(body, carry, xs, steps: int, unroll: bool = False):
    # A scan of length 1 would still be a while loop, which is what makes convolutions slow on
    # XLA:CPU; a single step runs at top level instead.
    if steps == 1:
        carry, out = body(carry, jax.tree.map(lambda a: a[0], xs))
        return carry, jax.tree.map(lambda a: a[None], out)
    return jax.lax.scan(body, carry, xs, unroll=unroll)


@functools.partial(jax.jit, static_argnums=(5,), static_argnames=("unroll",), donate_argnums=(0,))
def train_chunk(state: TrainState, data_x, data_y, idx, mask, steps: int, start=0, unroll: bool = False):
    """``steps`` training steps in one compiled program, on data that lives on the device.

    Args:
        state: donated.
        data_x, data_y: the whole training set on the device.
        idx, mask: ``(num_batches, B)`` from ``jaxlight.data.batch_indices``.
        steps: how many batches to run (static: one compilation per value).
        start: index of the first batch (traced: no recompilation as it moves).
        unroll: unroll the scan into straight-line code (static). For convolutions on XLA:CPU
            (see ``needs_unroll``): inside a while loop XLA:CPU keeps the weight-gradient
            convolutions in a layout its fast kernels do not take, so they run 15-40x slower
            and sum in another order (gradients differ from the single-step program in the
            last bits, ~1e-6 relative). Unrolled, every step compiles as at top level: the
            same bits as K single steps. Compile time grows with ``steps``.

    Returns:
        The new state and per-step metrics, each stacked to ``(steps,)``.
    """
    idx_k = jax.lax.dynamic_slice_in_dim(idx, start, steps)
    mask_k = jax.lax.dynamic_slice_in_dim(mask, start, steps)

    def body(state, im):
        return _train_step(state, gather_batch(data_x, data_y, im[0], im[1]))

    return _scan_steps(body, state, (idx_k, mask_k), steps, unroll)


@functools.partial(jax.jit, static_argnums=(5,))
def eval_chunk(state: TrainState, data_x, data_y, idx, mask, steps: int, start=0):
    """Metrics of ``steps`` evaluation batches, stacked to ``(steps,)``; nothing is updated."""
    idx_k = jax.lax.dynamic_slice_in_dim(idx, start, steps)
    mask_k = jax.lax.dynamic_slice_in_dim(mask, start, steps)

    def body(carry, im):
        return carry, _eval_step(state, gather_batch(data_x, data_y, im[0], im[1]))

    return _scan_steps(body, None, (idx_k, mask_k), steps)[1]


def needs_unroll(state_or_model, backend: str | None = None) -> bool:
    """Whether ``train_chunk`` must unroll its scan to match single steps bit for bit: models on
    the CPU whose convolutions autodiff lowers differently inside a while loop (see
    ``jaxlight.models.has_scan_slow_conv`` and ``train_chunk``'s ``unroll``)."""
    backend = backend or jax.default_backend()
    model = state_or_model.model if isinstance(state_or_model, TrainState) else state_or_model
    return backend == "cpu" and has_scan_slow_conv(model)


def default_steps_per_call(state_or_model, num_batches: int, backend: str | None = None) -> int:
    """K for ``train_chunk``: the whole epoch, except 1 on the CPU for a model whose convolutions
    are slow inside ``lax.scan`` (see ``jaxlight.models.has_scan_slow_conv``)."""
    backend = backend or jax.default_backend()
    model = state_or_model.model if isinstance(state_or_model, TrainState) else state_or_model
    if backend == "cpu" and has_scan_slow_conv(model):
        return 1
    return num_batches

"""The training state: one pytree that holds everything a run needs to continue."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxlight.data.arrays import data_key
from jaxlight.tasks import Task

__all__ = ["TrainState", "create_train_state", "data_key", "model_key", "MODEL_STATE"]

# The stream folded into the run's seed for the model's randomness (dropout); the data order
# has its own (``jaxlight.data.arrays.data_key``), so that changing one never changes the other.
_MODEL_STREAM = 2

MODEL_STATE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))
"""The NNX filter of ``TrainState.model_state``: every variable that is neither a parameter nor
RNG state (batch statistics, a user's own ``nnx.Variable`` counters...)."""


def model_key(seed: int) -> jax.Array:
    """The key from which each step's dropout keys are drawn (``fold_in(model_key, step)``)."""
    return jax.random.fold_in(jax.random.key(seed), _MODEL_STREAM)


@struct.dataclass
class TrainState:
    """Parameters, optimizer state, step, keys and model state, as one pytree.

    Array fields travel through ``jax.jit``; the static fields (the model's train- and
    eval-mode ``graphdef``, the Optax transformation, the loss function) are part of the tree's
    structure, so a jitted step specialises on them once.

    Attributes:
        step: int32 scalar, optimizer steps taken.
        params: the model's ``nnx.Param`` variables.
        opt_state: the Optax state for ``params``.
        rng: the data key; epoch ``e`` shuffles with ``fold_in(rng, e)``.
        model_state: every other model variable except RNG state (batch statistics...): updated
            by training steps, read by evaluation.
        rng_state: the model's own ``nnx.Rngs`` streams (``RngKey``/``RngCount``), kept only for
            their structure: each training step replaces every key with
            ``fold_in(fold_in(key, step), i)`` for the i-th stream and every count with 0, so
            dropout depends on the seed and the step number alone (the same for any K steps per
            call, after a resume, under every strategy).
        key: the model-randomness key, ``model_key(seed)``.
        graphdef, eval_graphdef: the model's structure in train mode (``deterministic=False``,
            ``use_running_average=False``) and in eval mode (both True), from ``nnx.view``.
        tx: the Optax transformation.
        loss_fn: ``loss_fn(model, batch) -> (losses, metrics)`` (``jaxlight.tasks``).
        input_shape: a built-in model's ``(28, 28)``-style input shape, checked before XLA.
        compute_dtype: None computes in the parameters' dtype (float32); ``jnp.bfloat16``
            casts the parameters and floating batch leaves to bfloat16 inside the step (mixed
            precision: the stored parameters, gradients and optimizer state stay float32).
            Set by ``jaxlight.trainer.TrainerConfig(precision="bf16")``.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    model_state: nnx.State
    rng_state: nnx.State
    key: jax.Array
    graphdef: Any = struct.field(pytree_node=False)
    eval_graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    loss_fn: Callable = struct.field(pytree_node=False)
    input_shape: tuple | None = struct.field(pytree_node=False, default=None)
    compute_dtype: Any = struct.field(pytree_node=False, default=None)

    @property
    def task(self) -> Task | Callable:
        """The loss function (named ``task`` where it is a built-in :class:`~jaxlight.tasks.Task`)."""
        return self.loss_fn

    def module(self, train: bool = False) -> nnx.Module:
        """A live NNX module with this state's variables, in eval mode (``train=False``) or
        train mode."""
        return nnx.merge(self.graphdef if train else self.eval_graphdef, self.params, self.rng_state,
                         self.model_state, copy=True)

    @property
    def model(self) -> nnx.Module:
        """The model in eval mode, with this state's parameters and statistics (inference)."""
        return self.module(train=False)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, loss_fn: Callable, seed: int = 0
) -> TrainState:
    """Split ``model`` once and build its state.

    Args:
        model: an NNX module (it is not modified: train and eval modes are views of it). A
            ``input_shape`` attribute, when present, is used to check batches before XLA.
        tx: the Optax transformation.
        loss_fn: ``loss_fn(model, batch) -> (losses (B,), {name: (B,)})`` or a built-in task
            (``jaxlight.tasks.multiclass()`` and friends); see ``jaxlight.tasks``.
        seed: the run's seed for the data order and for dropout (the model's initial weights
            come from its own ``nnx.Rngs``).

    Example:
        >>> from jaxlight import build_model, create_train_state, tasks, optim
        >>> state = create_train_state(build_model("mlp"), optim.adam(1e-3), tasks.multiclass())
        >>> int(state.step)
        0
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    modes = dict(raise_if_not_found=False)
    train_view = nnx.view(model, deterministic=False, use_running_average=False, **modes)
    eval_view = nnx.view(model, deterministic=True, use_running_average=True, **modes)
    graphdef, params, rng_state, model_state = nnx.split(train_view, nnx.Param, nnx.RngState, ...)
    eval_graphdef = nnx.split(eval_view, nnx.Param, nnx.RngState, ...)[0]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=data_key(seed),
        model_state=model_state,
        rng_state=rng_state,
        key=model_key(seed),
        graphdef=graphdef,
        eval_graphdef=eval_graphdef,
        tx=tx,
        loss_fn=loss_fn,
        input_shape=tuple(getattr(model, "input_shape", None) or ()) or None,
    )

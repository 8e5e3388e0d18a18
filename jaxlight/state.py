"""The training state: one pytree that holds everything a run needs to continue."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxlight.tasks import Task

__all__ = ["TrainState", "create_train_state", "data_key"]

# Streams folded into the run's seed: one for the data order, so that changing the model's
# initialisation never changes the batches, and the other way round.
_DATA_STREAM = 1


def data_key(seed: int) -> jax.Array:
    """The key from which each epoch's shuffle is drawn (``fold_in(data_key, epoch)``)."""
    return jax.random.fold_in(jax.random.key(seed), _DATA_STREAM)


@struct.dataclass
class TrainState:
    """Parameters, optimizer state, step, data key and model state, as one pytree.

    Array fields travel through ``jax.jit``; the static fields (the model's ``graphdef``, the
    Optax transformation, the task, the expected input shape) are part of the tree's structure,
    so a jitted step specialises on them once.

    Attributes:
        step: int32 scalar, optimizer steps taken.
        params: the model's ``nnx.Param`` variables.
        opt_state: the Optax state for ``params``.
        rng: the data key; epoch ``e`` shuffles with ``fold_in(rng, e)``.
        model_state: every other model variable (batch statistics, RNG state for dropout...).
            Splitting them out keeps a plain ``jax.jit`` over the state free of NNX's trace
            context rules.
        compute_dtype: None computes in the parameters' dtype (float32); ``jnp.bfloat16``
            casts the parameters and inputs to bfloat16 inside the step (mixed precision: the
            stored parameters, gradients and optimizer state stay float32, the loss is taken in
            float32). Set by ``jaxlight.trainer.TrainerConfig(precision="bf16")``.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    model_state: nnx.State
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    task: Task = struct.field(pytree_node=False)
    input_shape: tuple | None = struct.field(pytree_node=False, default=None)
    compute_dtype: Any = struct.field(pytree_node=False, default=None)

    @property
    def model(self) -> nnx.Module:
        """A live NNX module with this state's parameters (for inspection and inference)."""
        return nnx.merge(self.graphdef, self.params, self.model_state)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, task: Task, seed: int = 0
) -> TrainState:
    """Split ``model`` once and build its state.

    Args:
        model: an NNX module; its ``input_shape`` attribute, when present, is used to check
            batches before they reach XLA.
        tx: the Optax transformation.
        task: ``jaxlight.tasks.multiclass()`` and friends.
        seed: the run's seed for the data order (the model's weights come from its own
            ``nnx.Rngs``).

    Example:
        >>> from jaxlight import build_model, create_train_state, tasks, optim
        >>> state = create_train_state(build_model("mlp"), optim.adam(1e-3), tasks.multiclass())
        >>> int(state.step)
        0
    """
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=data_key(seed),
        model_state=model_state,
        graphdef=graphdef,
        tx=tx,
        task=task,
        input_shape=tuple(getattr(model, "input_shape", None) or ()) or None,
    )

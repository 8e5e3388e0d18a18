"""The training state: one pytree that holds everything a run needs to continue."""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxlight.data.arrays import data_key
from jaxlight.tasks import Task

__all__ = ["TrainState", "create_train_state", "data_key", "model_key", "MODEL_STATE", "keyed_transformation"]

# The stream folded into the run's seed for the model's randomness (dropout); the data order
# has its own (``jaxlight.data.arrays.data_key``), so that changing one never changes the other.
_MODEL_STREAM = 2

MODEL_STATE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))
"""The NNX filter of ``TrainState.model_state``: every variable that is neither a parameter nor
RNG state (batch statistics, a user's own ``nnx.Variable`` counters...)."""


def model_key(seed: int) -> jax.Array:
    """The key from which each step's dropout keys are drawn (``fold_in(model_key, step)``)."""
    return jax.random.fold_in(jax.random.key(seed), _MODEL_STREAM)


class _Identity:
    """Part of a fingerprint that stands for one object: equal only to itself."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


_MAX_DEPTH = 64
_MAX_ARRAY_ELEMENTS = 1 << 16


def _global_names(code: types.CodeType) -> set[str]:
    """The names ``code`` (and the functions defined inside it) may read as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _fingerprint(obj, depth: int = 0, active: frozenset = frozenset()):
    """A hashable value equal for two objects that compute the same thing: functions by their
    code, defaults, closure contents and the globals they read (recursively), containers by
    their items, numbers,
    strings and small arrays by value; anything else (and anything too deep, too large or
    recursive) by identity, which can only cost a recompilation, never share a program
    between two different computations."""
    if isinstance(obj, (bool, int, str, bytes, type(None))):
        return type(obj), obj
    if isinstance(obj, (float, complex)):
        return type(obj), repr(obj)  # (repr: nan equals nan, -0.0 differs from 0.0)
    if depth > _MAX_DEPTH or id(obj) in active:
        return _Identity(obj)
    inner = functools.partial(_fingerprint, depth=depth + 1, active=active | {id(obj)})
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        if isinstance(obj, jax.core.Tracer) or np.size(obj) > _MAX_ARRAY_ELEMENTS:
            return _Identity(obj)
        host = np.asarray(obj)
        return "array", type(obj), host.dtype.str, host.shape, host.tobytes()
    if isinstance(obj, _Keyed):  # (see keyed_transformation: a nested one compares by its update too)
        return "keyed", obj.__dict__["_key"]
    if isinstance(obj, (tuple, list)):
        return type(obj), tuple(inner(e) for e in obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return dict, tuple((inner(k), inner(v)) for k, v in obj.items())
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                cells.append(inner(cell.cell_contents))
            except ValueError:  # an empty cell
                cells.append("empty cell")
        # The globals it reads, by value too: a function that reads a rebound global computes
        # something else although its code and closure are the same.
        names = sorted(n for n in _global_names(obj.__code__) if n in obj.__globals__)
        return ("function", obj.__code__, id(obj.__globals__), inner(obj.__defaults__),
                inner(obj.__kwdefaults__), tuple(cells), tuple((n, inner(obj.__globals__[n])) for n in names))
    if isinstance(obj, functools.partial):
        return functools.partial, inner(obj.func), inner(obj.args), inner(obj.keywords)
    if isinstance(obj, types.MethodType):
        return types.MethodType, inner(obj.__func__), inner(obj.__self__)
    if isinstance(obj, np.dtype):
        return np.dtype, obj.str
    return _Identity(obj)  # (classes, builtins, modules and other objects: themselves)


class _Keyed:
    """Equality and hash by fingerprint, for :func:`keyed_transformation`'s classes."""

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, _Keyed):
            return NotImplemented
        return self.__dict__["_hash"] == other.__dict__["_hash"] and self.__dict__["_key"] == other.__dict__["_key"]

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self):
        return self.__dict__["_hash"]

    def __reduce__(self):
        return keyed_transformation, (optax.GradientTransformationExtraArgs(*self) if
                                      isinstance(self, optax.GradientTransformationExtraArgs) else
                                      optax.GradientTransformation(*self),)


class KeyedTransformation(_Keyed, optax.GradientTransformation):
    """An Optax transformation that equals another built the same way (see :func:`keyed_transformation`)."""


class KeyedTransformationExtraArgs(_Keyed, optax.GradientTransformationExtraArgs):
    """:class:`KeyedTransformation` for an ``optax.GradientTransformationExtraArgs``."""


def keyed_transformation(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` as an equal Optax transformation whose equality and hash follow what it computes.

    The optimizer is a static field of :class:`TrainState`, so it is part of every jitted
    step's cache key. Optax transformations compare by identity: every ``optax.adam(1e-3)``
    built anew (one per trial of a sweep) would compile the step again and keep the program.
    The keyed form compares by a structural fingerprint of its ``update`` function (its code,
    defaults and closure contents, recursively: learning rates and other hyperparameters by
    value, schedules by their own code and constants), so two transformations built the same
    way share one compiled program and two with different hyperparameters do not. What cannot
    be fingerprinted counts by identity.

    Only ``update`` runs inside a compiled step (``init`` runs once, eagerly, and its result
    is the state's ``opt_state``), so ``init`` is left out: ``optax.inject_hyperparams(
    optax.adam)(learning_rate=lr)`` keeps ``lr`` in its state, not in its ``update``, and
    every learning rate of a sweep shares one program. A keyed transformation inside another
    one's closure counts by its ``update`` alone too: jaxlight keys what it wraps in
    ``optax.chain``, ``optax.apply_if_finite`` (``Trainer`` clipping and NaN skipping) and
    ``optax.multi_transform`` (``jaxlight.optim.freeze``), whose updates never call the inner
    ``init``.

    Example:
        >>> keyed_transformation(optax.adam(1e-3)) == keyed_transformation(optax.adam(1e-3))
        True
        >>> keyed_transformation(optax.adam(1e-3)) == keyed_transformation(optax.adam(2e-3))
        False
    """
    if isinstance(tx, _Keyed) or not isinstance(tx, optax.GradientTransformation):
        return tx
    cls = KeyedTransformationExtraArgs if isinstance(tx, optax.GradientTransformationExtraArgs) else KeyedTransformation
    keyed = tuple.__new__(cls, (tx.init, tx.update))
    key = ("optax", cls, _fingerprint(tx.update))
    keyed.__dict__.update(_key=key, _hash=hash(key))
    return keyed


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
            ``fold_in(fold_in(key, step), i)`` (``i``: the key's position among the leaves of
            ``rng_state``) and every count with 0, so
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
            Set by ``TrainerConfig(numerics=NumericsConfig(precision="bf16"))``.
        step_fn: your own train step, ``step_fn(state, batch, mask, axis_name=None) -> (state,
            metrics)`` (the signature of ``jaxlight.step.apply_train_step``), run instead of
            the built-in one by every path (``jaxlight.step.apply_step``); None: the built-in.
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
    step_fn: Callable | None = struct.field(pytree_node=False, default=None)

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
    model: nnx.Module, tx: optax.GradientTransformation, loss_fn: Callable, seed: int = 0,
    step_fn: Callable | None = None,
) -> TrainState:
    """Split ``model`` once and build its state.

    Args:
        model: an NNX module (it is not modified: train and eval modes are views of it). A
            ``input_shape`` attribute, when present, is used to check batches before XLA.
        tx: the Optax transformation; kept as :func:`keyed_transformation` gives it, so that a
            new optimizer built with the same hyperparameters reuses the compiled steps.
        loss_fn: ``loss_fn(model, batch) -> (losses (B,), {name: (B,)})`` or a built-in task
            (``jaxlight.tasks.multiclass()`` and friends); see ``jaxlight.tasks``.
        seed: the run's seed for the data order and for dropout (the model's initial weights
            come from its own ``nnx.Rngs``).
        step_fn: your own pure train step, ``step_fn(state, batch, mask, axis_name=None) ->
            (state, metrics)``, which every training path then runs instead of
            ``jaxlight.step.apply_train_step`` (a GAN's alternating updates, two optimizers, any
            update rule; see ``jaxlight.step.apply_step``). ``loss_fn`` still serves evaluation,
            prediction and the first-batch check.

    Example:
        >>> from jaxlight import build_model, create_train_state, tasks, optim
        >>> state = create_train_state(build_model("mlp"), optim.adam(1e-3), tasks.multiclass())
        >>> int(state.step)
        0
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if step_fn is not None and not callable(step_fn):
        raise TypeError(f"step_fn must be callable as step_fn(state, batch, mask, axis_name=None), got "
                        f"{type(step_fn).__name__}")
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
        tx=keyed_transformation(tx),
        loss_fn=loss_fn,
        input_shape=tuple(getattr(model, "input_shape", None) or ()) or None,
        step_fn=step_fn,
    )

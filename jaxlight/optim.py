"""Optimizers by name, as Optax transformations that mean what PyTorch's mean.

Where the two libraries use the same name for different things, these factories follow PyTorch
(the reference the tutorial used) and ``torch_ref.optim`` builds the torch side from the same
arguments:

- ``adam``: identical update rules (``eps`` added outside the square root in both).
- ``adamw``: decoupled weight decay in both, but PyTorch's default ``weight_decay`` is 0.01 and
  optax's is 1e-4. We default to 0.01. Both scale the decay by the learning rate.
- ``sgd`` with ``momentum``: PyTorch keeps ``buf = momentum * buf + grad`` and steps by
  ``lr * buf`` (no dampening); optax's ``sgd(momentum=...)`` is the same trace. ``weight_decay``
  for ``sgd``/``adam`` is PyTorch's L2 penalty (added to the gradient before the update),
  which is ``optax.add_decayed_weights`` *before* the optimizer, not AdamW's decoupled decay.
"""

from __future__ import annotations

import functools
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlight.state import keyed_transformation

__all__ = ["OPTIMIZERS", "check_keywords", "LearningRate", "PartsState", "freeze", "learning_rate", "make_optimizer",
           "parts", "adam", "adamw", "sgd", "wrap_optimizer", "wrap_state"]


def _with_l2(tx: optax.GradientTransformation, weight_decay: float) -> optax.GradientTransformation:
    if not weight_decay:
        return tx
    return optax.chain(optax.add_decayed_weights(weight_decay), tx)


def adam(lr, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8) -> optax.GradientTransformation:
    """``torch.optim.Adam(lr, betas=(b1, b2), eps, weight_decay)``."""
    return _with_l2(optax.adam(lr, b1=b1, b2=b2, eps=eps), weight_decay)


def adamw(lr, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8) -> optax.GradientTransformation:
    """``torch.optim.AdamW(lr, betas=(b1, b2), eps, weight_decay)``; default decay 0.01, as torch."""
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def sgd(lr, momentum: float = 0.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)`` (no dampening, no Nesterov)."""
    return _with_l2(optax.sgd(lr, momentum=momentum or None), weight_decay)


# The optimizers by name: the one list of names (``jaxlight train --optimizer``'s choices, the
# recipes, and torch_ref.optim, which builds each of them in PyTorch).
OPTIMIZERS = {"adam": adam, "adamw": adamw, "sgd": sgd}


def make_optimizer(name: str, lr, **kwargs) -> optax.GradientTransformation:
    """The named optimizer; ``lr`` may be a float or an Optax schedule.

    Raises:
        ValueError: an unknown name. TypeError: a keyword the optimizer does not take (named).

    Example:
        >>> make_optimizer("adam", 1e-3, momentum=0.9)
        Traceback (most recent call last):
        ...
        TypeError: make_optimizer('adam'): unknown keyword 'momentum' (adam takes weight_decay, b1, b2, eps)
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    check_keywords(OPTIMIZERS[name], kwargs, f"make_optimizer({name!r})")
    return OPTIMIZERS[name](lr, **kwargs)


def check_keywords(fn, kwargs: dict, where: str, positional: int = 1) -> None:
    """Refuse a keyword ``fn`` does not take (a misspelt ``weight_decay``), naming it and the
    ones it takes (its parameters after the first ``positional``)."""
    import inspect

    params = list(inspect.signature(fn).parameters)[positional:]
    for key in kwargs:
        if key not in params:
            raise TypeError(f"{where}: unknown keyword {key!r} ({fn.__name__} takes {', '.join(params)})")


def _dotted(key_path) -> str:
    """``"encoder.layers.0.kernel"`` for a tree path into an ``nnx.State`` of parameters (the
    names ``jaxlight.models.init.param_paths`` gives)."""
    import jax

    names = []
    for k in key_path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        names.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(names)


def freeze(tx: optax.GradientTransformation, patterns) -> optax.GradientTransformation:
    """``tx`` for the parameters that match no pattern; the others frozen.

    Built on ``optax.multi_transform``: a frozen parameter's update is zero
    (``optax.set_to_zero``), and ``tx`` never sees it, so it holds no optimizer state for it
    (no Adam moments) and a global-norm clip inside ``tx`` counts only the trained ones.

    Args:
        tx: the optimizer of the trained parameters.
        patterns: ``fnmatch`` patterns over dotted parameter paths (``"backbone.*"``; see
            ``jaxlight.models.init.param_paths``; ``*`` also matches dots).

    Raises:
        ValueError (when the state is built): a pattern matches no parameter.

    Example:
        >>> import optax
        >>> from jaxlight import build_model, create_train_state, tasks
        >>> tx = freeze(optax.adam(1e-3), ["fc1.*"])
        >>> state = create_train_state(build_model("mlp"), tx, tasks.multiclass())
    """
    import fnmatch

    import jax

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)

    def labels(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [_dotted(p) for p, _ in flat]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"freeze pattern {pattern!r} matches no parameter; the parameters: "
                                 f"{', '.join(names[:8])}{'...' if len(names) > 8 else ''}")
        return jax.tree_util.tree_unflatten(treedef, [
            "frozen" if any(fnmatch.fnmatchcase(n, p) for p in patterns) else "trained" for n in names])

    if not patterns:
        return tx
    from jaxlight.state import keyed_transformation  # (multi_transform's update never calls tx.init)

    return optax.multi_transform({"trained": keyed_transformation(tx), "frozen": optax.set_to_zero()}, labels)


class PartsState(NamedTuple):
    """The state of :func:`parts`: each part's own optimizer state, by name."""

    states: dict


def parts(transforms: dict) -> optax.GradientTransformationExtraArgs:
    """One optimizer per part of the model: ``{"generator": optax.adam(2e-4), "discriminator":
    optax.adam(1e-4)}`` (Lightning's ``configure_optimizers`` returning two).

    A part is a top-level attribute of the model (``model.generator``); each optimizer keeps
    its own state over its part's parameters (``state.opt_state.states["generator"]``), and
    every parameter belongs to one part. ``update`` updates every part (the built-in step, one
    update of all optimizers at once); ``update(..., part="generator")`` updates only that part
    (``jaxlight.step.apply_optimizer(state, grads, part=...)``: alternating updates in a step of
    your own), leaving the other parts' parameters and states as they are.

    Raises:
        ValueError (when the state is built): a parameter in no part, or a part the model lacks.
    """
    names = sorted(transforms)

    def init(params):
        missing = [n for n in names if n not in params]
        other = [k for k in params if k not in transforms]
        if missing or other:
            raise ValueError(f"jaxlight.optim.parts: the model's top-level parts are {sorted(params)}; the optimizer "
                             f"has {names}" + (f" (no {missing} in the model)" if missing else "")
                             + (f" (no optimizer for {other})" if other else ""))
        return PartsState({n: transforms[n].init(params[n]) for n in names})

    def update(updates, state, params=None, part=None, **extra_args):
        if part is not None and part not in transforms:
            raise ValueError(f"jaxlight.optim.parts: no part {part!r}; the parts are {names}")
        new_updates = jax.tree.map(lambda u: u, updates)  # (a copy of the same tree type: nnx.State or dict)
        states = dict(state.states)
        for n in names:
            if part is None or n == part:
                tx = optax.with_extra_args_support(transforms[n])
                new_updates[n], states[n] = tx.update(updates[n], state.states[n],
                                                      None if params is None else params[n], **extra_args)
            else:
                new_updates[n] = jax.tree.map(jnp.zeros_like, updates[n])
        return new_updates, PartsState(states)

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------------------------
# The learning rate an optimizer applies, read from the optimizer itself


class LearningRate:
    """Where an Optax transformation keeps the rate it applies, found by
    :func:`learning_rate`; :meth:`rates` reads the rates of its latest updates from a state.

    Attributes:
        kind: ``"injected"`` (``optax.inject_hyperparams``: the rate is a hyperparameter in
            the state), ``"schedule"`` (a schedule given to optax's ``scale_by_learning_rate``,
            the last transformation of ``optax.adam`` and every optax alias, evaluated at the
            schedule's own step count) or ``"constant"`` (a number given there).
        schedule: the schedule (a function of the update count), or None.
        value: the constant rate, or None.
    """

    def __init__(self, kind: str, schedule=None, value: float | None = None):
        self.kind, self.schedule, self.value = kind, schedule, value

    def __repr__(self) -> str:
        return f"LearningRate({self.kind!r}, schedule={self.schedule!r}, value={self.value!r})"

    def rates(self, opt_state, updates: int) -> list[float | None]:
        """The rates of the last ``updates`` optimizer updates that ``opt_state`` has taken,
        oldest first; None for an update whose rate the state no longer tells (an injected
        hyperparameter driven by a stateful schedule keeps only its latest value)."""
        if updates <= 0:
            return []
        if self.kind == "constant":
            return [self.value] * updates
        if self.kind == "schedule":
            counts = {int(np.asarray(s.count)) for s in _states(opt_state, optax.ScaleByScheduleState)}
            if len(counts) != 1:
                raise ValueError(f"the optimizer state holds {len(counts)} schedule step counts, expected one")
            count = counts.pop()
            return _evaluate(self.schedule, range(count - updates, count))
        state = _injected(opt_state)
        if self.schedule is not None:  # a plain schedule, evaluated at the hyperparameter's own count
            count = int(np.asarray(state.hyperparams_states[_LR].count))
            return _evaluate(self.schedule, range(count - updates, count))
        value = float(np.asarray(state.hyperparams[_LR]))
        if _LR in getattr(state, "hyperparams_states", {}):  # a stateful schedule: only its latest value is known
            return [None] * (updates - 1) + [value]
        return [value] * updates

    def next_rate(self, opt_state) -> float:
        """The rate the next update will apply (before any update: the first one's)."""
        if self.kind == "constant":
            return self.value
        if self.kind == "schedule":
            return float(np.asarray(self.schedule(_states(opt_state, optax.ScaleByScheduleState)[0].count)))
        state = _injected(opt_state)
        if self.schedule is not None:
            return float(np.asarray(self.schedule(state.hyperparams_states[_LR].count)))
        return float(np.asarray(state.hyperparams[_LR]))

    @classmethod
    def given(cls, schedule, opt_state=None) -> "LearningRate | None":
        """The rate an ``optax.inject_hyperparams`` state holds, else the ``schedule`` (a
        function of the update count) or constant a user names; None when there is neither."""
        if opt_state is not None and _injected(opt_state) is not None:
            return cls("injected")
        if callable(schedule):
            return cls("schedule", schedule)
        return None if schedule is None else cls("constant", value=float(schedule))


_LR = "learning_rate"
_INJECTED = tuple(c for c in (getattr(optax, "InjectHyperparamsState", None),
                              getattr(optax, "InjectStatefulHyperparamsState", None)) if c is not None)


def _states(tree, cls) -> list:
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]


def _injected(opt_state):
    found = [s for s in _states(opt_state, _INJECTED) if _LR in s.hyperparams]
    return found[0] if len(found) == 1 else None


def _evaluate(schedule, counts) -> list[float]:
    counts = list(counts)
    if not counts:
        return []
    values = np.asarray(schedule(np.asarray(counts, np.int32)), np.float64)
    if values.shape != (len(counts),):  # a schedule that is not elementwise
        values = np.array([float(np.asarray(schedule(c))) for c in counts])
    return values.tolist()


@functools.lru_cache(maxsize=1)
def _codes() -> dict:
    """The code objects of the optax functions that hold a learning rate: the schedule lambda
    inside ``scale_by_learning_rate``, ``scale``'s and ``scale_by_schedule``'s update and
    ``inject_hyperparams``'s update (taken from instances, not from optax's private modules)."""
    probe = functools.partial(float)  # (a callable no optax code holds)
    by_schedule = optax.scale_by_learning_rate(probe).update
    lr_lambda = next(c.cell_contents for c in by_schedule.__closure__ if callable(c.cell_contents))
    return {"lr_lambda": lr_lambda.__code__, "scale": optax.scale(1.0).update.__code__,
            "scale_by_schedule": by_schedule.__code__,
            "inject": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).update.__code__}


def _cell(fn, name):
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _functions(obj, seen=None, depth=0):
    """Every function reachable from ``obj`` through closures, partials, bound methods and
    containers (what an Optax transformation is built of)."""
    seen = set() if seen is None else seen
    if depth > 64 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, types.FunctionType):
        yield obj
        for cell in obj.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:
                continue
            yield from _functions(contents, seen, depth + 1)
    elif isinstance(obj, functools.partial):
        for part in (obj.func, *obj.args, *obj.keywords.values()):
            yield from _functions(part, seen, depth + 1)
    elif isinstance(obj, types.MethodType):
        yield from _functions(obj.__func__, seen, depth + 1)
    elif isinstance(obj, (tuple, list)):
        for part in obj:
            yield from _functions(part, seen, depth + 1)
    elif isinstance(obj, dict):
        for part in obj.values():
            yield from _functions(part, seen, depth + 1)


def learning_rate(tx: optax.GradientTransformation, opt_state=None) -> LearningRate:
    """Where ``tx`` keeps the learning rate it applies (for ``LearningRateMonitor``).

    Looked for, in order: an ``optax.inject_hyperparams`` state with a ``learning_rate``
    hyperparameter in ``opt_state`` (the rate each update used; a schedule given to it is
    evaluated at its count); then optax's ``scale_by_learning_rate`` inside ``tx``, which every
    optax optimizer (``adam``, ``adamw``, ``sgd``...) ends with, also inside a user's own
    function, a ``chain``, ``freeze`` or ``apply_if_finite``: its schedule, evaluated at the
    schedule's step count in ``opt_state``, or its constant.

    Raises:
        ValueError: the rate cannot be read (no such part, or several that differ); the
            message says why. Nothing is guessed.
    """
    codes = _codes()
    if opt_state is not None and _injected(opt_state) is not None:
        schedule = None
        for fn in _functions(tx.update):
            if fn.__code__ is codes["inject"]:
                # (optax wraps a plain schedule as WrappedSchedule(schedule_fn); a stateful one has no history)
                schedule = getattr(_cell(fn, "sched_hps").get(_LR), "schedule_fn", None)
        return LearningRate("injected", schedule)
    if opt_state is not None and len(_states(opt_state, _INJECTED)) > 1:
        raise ValueError("the optimizer injects hyperparameters in several places")
    schedules, constants, other = [], [], 0
    lr_lambdas = set()
    for fn in _functions(tx.update):
        if fn.__code__ is codes["lr_lambda"]:
            lr_lambdas.add(id(fn))
            if not any(s is _cell(fn, "learning_rate") for s in schedules):
                schedules.append(_cell(fn, "learning_rate"))
        elif fn.__code__ is codes["scale"]:
            constants.append(abs(float(np.asarray(_cell(fn, "step_size")))))
    for fn in _functions(tx.update):
        if fn.__code__ is codes["scale_by_schedule"] and id(_cell(fn, "step_size_fn")) not in lr_lambdas:
            other += 1
    if len(schedules) == 1 and not constants and not other:
        return LearningRate("schedule", schedules[0])
    if not schedules and constants and len(set(constants)) == 1 and not other:  # (one rate, maybe in several parts)
        return LearningRate("constant", value=constants[0])
    if not schedules and not constants and not other:
        raise ValueError("the optimizer has no learning rate jaxlight can read (no optax.inject_hyperparams "
                         "learning_rate and no optax scale_by_learning_rate)")
    places = len(schedules) + len(constants) + other
    raise ValueError(f"the optimizer scales its updates in {places} places (a learning rate per part?), so no "
                     f"single rate is the one applied; wrap it with optax.inject_hyperparams to log one")


def wrap_optimizer(tx: optax.GradientTransformation, config) -> optax.GradientTransformation:
    """``tx`` with a ``TrainerConfig``'s freezing, clipping and NaN skipping, through Optax.

    Order: ``apply_if_finite(chain(clip_by_global_norm, freeze(tx)))``. Gradient accumulation is not an
    optimizer wrapper: the step itself averages a window's micro-batch gradients
    (``jaxlight.step.apply_accumulated_step``), so clipping sees the accumulated gradient (as
    Lightning clips before ``optimizer.step``), and a non-finite micro-batch gradient makes
    its window's update non-finite (skipped under ``nan_policy="skip"``).

    The result is keyed (``jaxlight.state.keyed_transformation``): the optimizer is a static
    field of the TrainState, and wrapping an equal ``tx`` with the same settings gives an equal
    object, so a new Trainer per trial reuses the compiled programs (nothing is cached here:
    a cache of optimizers would keep every trial's alive).

    Args:
        tx: the optimizer to wrap.
        config: a ``jaxlight.trainer.TrainerConfig`` (its ``freeze`` and ``numerics`` section).

    Example:
        >>> from jaxlight.trainer_config import NumericsConfig, TrainerConfig
        >>> tx = adam(1e-3)
        >>> wrap_optimizer(tx, TrainerConfig()) is tx  # nothing to add
        True
        >>> clipped = wrap_optimizer(tx, TrainerConfig(numerics=NumericsConfig(gradient_clip_norm=1.0)))
        >>> clipped == wrap_optimizer(tx, TrainerConfig(numerics=NumericsConfig(gradient_clip_norm=1.0)))  # keyed: equal wrappers
        True
    """
    if config.freeze:  # (first: the clip inside sees only the trained parameters' gradient)
        tx = keyed_transformation(freeze(tx, config.freeze))
    if config.numerics.gradient_clip_norm is None and config.numerics.nan_policy != "skip":
        return tx
    if config.numerics.gradient_clip_norm is not None:  # (each layer keyed: see keyed_transformation)
        tx = keyed_transformation(optax.chain(optax.clip_by_global_norm(config.numerics.gradient_clip_norm), tx))
    if config.numerics.nan_policy == "skip":
        tx = keyed_transformation(optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1))
    return tx


def wrap_state(state, config, wrapped: tuple | None = None):
    """``state`` with its optimizer wrapped by :func:`wrap_optimizer` and a fresh optimizer state.

    Args:
        state: a ``jaxlight.state.TrainState``; refused when it has taken steps and wrapping
            changes its optimizer (the optimizer state would restart).
        config: a ``jaxlight.trainer.TrainerConfig``.
        wrapped: ``(tx, wrapped_tx)`` of an earlier call: a state whose optimizer is that
            ``wrapped_tx`` is returned as it is (not wrapped twice).

    Returns:
        ``(state, wrapped)``: the state and the ``(tx, wrapped_tx)`` pair to pass next time.

    Example:
        >>> from jaxlight import build_model, create_train_state, tasks
        >>> from jaxlight.trainer_config import NumericsConfig, TrainerConfig
        >>> state = create_train_state(build_model("softmax"), sgd(0.1), tasks.multiclass())
        >>> clipped, pair = wrap_state(state, TrainerConfig(numerics=NumericsConfig(gradient_clip_norm=1.0)))
        >>> clipped.tx is pair[1] and wrap_state(clipped, TrainerConfig(numerics=NumericsConfig(gradient_clip_norm=1.0)), pair)[0] is clipped
        True
    """
    if wrapped is not None and state.tx is wrapped[1]:
        return state, wrapped
    tx = wrap_optimizer(state.tx, config)
    if tx is not state.tx and tx != state.tx:
        if int(state.step) != 0:
            raise ValueError(
                "freeze / numerics.gradient_clip_norm / numerics.nan_policy='skip' wrap the optimizer, "
                f"which resets its state, but this state has taken {int(state.step)} steps; pass a fresh "
                "state (and ckpt_path to resume), or build the optimizer with jaxlight.optim.wrap_optimizer")
        return state.replace(tx=tx, opt_state=tx.init(state.params)), (state.tx, tx)
    return state, wrapped

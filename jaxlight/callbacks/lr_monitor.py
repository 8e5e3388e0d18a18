"""Log the learning rate the optimizer will use next."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import optax

from jaxlight.callbacks.base import Callback

__all__ = ["LearningRateMonitor", "current_lr"]


# optax.inject_hyperparams returns the "stateful" variant since optax 0.2.3.
_INJECTED = tuple(c for c in (getattr(optax, "InjectHyperparamsState", None),
                              getattr(optax, "InjectStatefulHyperparamsState", None)) if c is not None)


def _find(tree, cls):
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]


def current_lr(opt_state, schedule: Callable | float | None = None) -> float:
    """The learning rate of the next update, read from the optimizer state.

    Optax keeps no learning rate in its state unless asked to, so this looks for, in order:
    ``optax.inject_hyperparams`` state (its ``learning_rate``); the step count of an optax
    schedule (``ScaleByScheduleState.count``, evaluated with ``schedule``); a constant
    ``schedule``. The count advances once per optimizer update
    (a window of micro-batches), as ``trainer.global_step`` does.

    Raises:
        ValueError: none of these is available.
    """
    injected = _find(opt_state, _INJECTED)
    if injected and "learning_rate" in injected[0].hyperparams:
        return float(np.asarray(injected[0].hyperparams["learning_rate"]))
    if callable(schedule):
        counts = _find(opt_state, optax.ScaleByScheduleState)
        if not counts:
            raise ValueError("LearningRateMonitor: the optimizer has no schedule state; pass the "
                             "schedule to the optimizer (make_optimizer(name, lr=schedule))")
        return float(np.asarray(schedule(counts[0].count)))
    if schedule is not None:
        return float(schedule)
    raise ValueError("LearningRateMonitor: optax keeps no learning rate in its state; pass "
                     "schedule= (the optax schedule or the constant lr) or build the optimizer "
                     "with optax.inject_hyperparams")


def _counts(opt_state) -> int | None:
    """Updates applied so far, from a schedule's or ``inject_hyperparams``'s step count."""
    found = _find(opt_state, optax.ScaleByScheduleState) or _find(opt_state, _INJECTED)
    return int(np.asarray(found[0].count)) if found else None


def _evaluate(schedule, counts: list[int]) -> list[float]:
    if not counts:
        return []
    values = np.asarray(schedule(np.asarray(counts, np.int32)), np.float64)
    if values.shape != (len(counts),):  # a schedule that is not elementwise
        values = np.array([float(np.asarray(schedule(c))) for c in counts])
    return values.tolist()


class LearningRateMonitor(Callback):
    """Log ``lr``, the learning rate each optimizer update used, at the step that made it.

    Every update is logged, also the ones inside a fused chunk of K steps (with ``schedule``,
    or an ``optax.inject_hyperparams`` optimizer run one step per call): the row for step ``s``
    holds the rate step ``s`` applied. A step is one optimizer update, a whole window of
    micro-batches under gradient accumulation.

    Args:
        schedule: the schedule given to the optimizer, or its constant learning rate; not
            needed for an ``optax.inject_hyperparams`` optimizer (which then gives the rate of
            the last update of each chunk).
        logging_interval: "step" (every update) or "epoch" (the last update of each epoch).
    """

    def __init__(self, schedule: Callable | float | None = None, logging_interval: str = "step"):
        if logging_interval not in ("step", "epoch"):
            raise ValueError(f"LearningRateMonitor: logging_interval must be 'step' or 'epoch', got {logging_interval!r}")
        self.schedule, self.logging_interval = schedule, logging_interval
        self.history: list[tuple[int, float]] = []

    def on_fit_start(self, trainer, state):
        current_lr(state.opt_state, self.schedule)  # fail before training, not after an epoch

    def used_rates(self, trainer, state, steps: int) -> list[tuple[int, float]]:
        """``[(step, lr)]`` for the updates made by the last ``steps`` steps (ending at
        ``trainer.global_step``)."""
        last = trainer.global_step
        skipped = set(trainer.skipped_steps)
        updated = [s for s in range(last - steps + 1, last + 1) if s not in skipped]
        if not updated:
            return []
        if callable(self.schedule):
            count = _counts(state.opt_state)
            if count is None:
                current_lr(state.opt_state, self.schedule)  # raises, naming what is missing
            first = count - len(updated)
            return list(zip(updated, _evaluate(self.schedule, list(range(first, count)))))
        injected = _find(state.opt_state, _INJECTED)
        if injected and "learning_rate" in injected[0].hyperparams:
            # inject_hyperparams keeps the rate its latest update used.
            return [(updated[-1], float(np.asarray(injected[0].hyperparams["learning_rate"])))]
        return [(s, current_lr(state.opt_state, self.schedule)) for s in updated]

    def _log(self, rates):
        for step, lr in rates:
            self.history.append((step, lr))
            self._trainer.log_metrics({"lr": lr}, step)

    def on_train_chunk_end(self, trainer, state, metrics):
        self._trainer = trainer
        rates = self.used_rates(trainer, state, len(metrics["loss"]))
        if self.logging_interval == "step":
            self._log(rates)
        elif rates:
            self._last = rates[-1]

    def on_epoch_end(self, trainer, state, metrics):
        self._trainer = trainer
        if self.logging_interval == "epoch" and getattr(self, "_last", None) is not None:
            self._log([self._last])
            self._last = None

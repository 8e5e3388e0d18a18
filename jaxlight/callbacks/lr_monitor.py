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
    ``schedule``. With gradient accumulation the count advances once per optimizer update
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


class LearningRateMonitor(Callback):
    """Log ``lr`` at every chunk end (``logging_interval="step"``) or epoch end ("epoch").

    Args:
        schedule: the schedule given to the optimizer, or its constant learning rate; not
            needed for an ``optax.inject_hyperparams`` optimizer.
        logging_interval: "step" or "epoch".
    """

    def __init__(self, schedule: Callable | float | None = None, logging_interval: str = "step"):
        if logging_interval not in ("step", "epoch"):
            raise ValueError(f"LearningRateMonitor: logging_interval must be 'step' or 'epoch', got {logging_interval!r}")
        self.schedule, self.logging_interval = schedule, logging_interval
        self.history: list[tuple[int, float]] = []

    def on_fit_start(self, trainer, state):
        current_lr(state.opt_state, self.schedule)  # fail before training, not after an epoch

    def _log(self, trainer, state):
        lr = current_lr(state.opt_state, self.schedule)
        self.history.append((trainer.global_step, lr))
        trainer.log_metrics({"lr": lr})

    def on_train_chunk_end(self, trainer, state, metrics):
        if self.logging_interval == "step":
            self._log(trainer, state)

    def on_epoch_end(self, trainer, state, metrics):
        if self.logging_interval == "epoch":
            self._log(trainer, state)

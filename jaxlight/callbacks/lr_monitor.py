"""Log the learning rate each optimizer update applied, read from the optimizer itself."""

from __future__ import annotations

import warnings
from typing import Callable

from jaxlight.callbacks.base import Callback
from jaxlight.optim import LearningRate, learning_rate

__all__ = ["LearningRateMonitor", "current_lr"]


def current_lr(opt_state, schedule: Callable | float | None = None, tx=None) -> float:
    """The learning rate of the next update, read from the optimizer: ``tx`` and its state as
    :func:`jaxlight.optim.learning_rate` reads them (an ``optax.inject_hyperparams`` state needs
    no ``tx``); else ``schedule`` (evaluated at the state's schedule count) or a constant.

    Raises:
        ValueError: none of these tells the rate.
    """
    source = None
    if tx is not None:
        try:
            source = learning_rate(tx, opt_state)
        except ValueError:
            pass
    source = source or LearningRate.given(schedule, opt_state)
    if source is None:
        raise ValueError("LearningRateMonitor: optax keeps no learning rate in its state; pass tx= (the "
                         "optimizer), schedule=, or build the optimizer with optax.inject_hyperparams")
    return source.next_rate(opt_state)


class LearningRateMonitor(Callback):
    """Log ``lr``, the learning rate each optimizer update applied, at the step that made it
    (Lightning's ``LearningRateMonitor``).

    The rate is read from the optimizer itself (:func:`jaxlight.optim.learning_rate`): an
    ``optax.inject_hyperparams`` hyperparameter, or the schedule or constant given to optax's
    ``scale_by_learning_rate`` (the end of ``optax.adam``, ``adamw``, ``sgd``... also inside
    your own function that builds a warmup + cosine schedule), evaluated at the optimizer's own
    step count. Every update is logged, also those inside a fused chunk of K steps; a step is
    one optimizer update (a window of micro-batches under gradient accumulation); an update
    that ``nan_policy="skip"`` dropped is not logged. Where the rate cannot be read (an
    optimizer with a rate per parameter group, say), it warns once and logs no ``lr`` column:
    it never logs a guess.

    Args:
        schedule: used only when the optimizer's rate cannot be read: the schedule given to
            the optimizer, or its constant learning rate.
        logging_interval: "step" (every update) or "epoch" (the last update of each epoch).
    """

    def __init__(self, schedule: Callable | float | None = None, logging_interval: str = "step"):
        if logging_interval not in ("step", "epoch"):
            raise ValueError(f"LearningRateMonitor: logging_interval must be 'step' or 'epoch', got {logging_interval!r}")
        self.schedule, self.logging_interval = schedule, logging_interval
        self.history: list[tuple[int, float]] = []
        self.source: LearningRate | None = None
        self._warned = False
        self._last = None

    def on_fit_start(self, trainer, state):
        self._trainer = trainer
        try:
            self.source = learning_rate(state.tx, state.opt_state)
        except ValueError as exc:
            self.source = LearningRate.given(self.schedule)
            if self.source is None and not self._warned:
                self._warned = True
                warnings.warn(f"LearningRateMonitor: {exc}; no lr column is logged", RuntimeWarning, stacklevel=2)

    def used_rates(self, trainer, state, steps: int) -> list[tuple[int, float]]:
        """``[(step, lr)]`` for the updates made by the last ``steps`` steps (ending at
        ``trainer.global_step``), those whose rate the optimizer tells."""
        if self.source is None:
            return []
        last = trainer.global_step
        skipped = set(trainer.skipped_steps)
        updated = [s for s in range(last - steps + 1, last + 1) if s not in skipped]
        rates = self.source.rates(state.opt_state, len(updated))
        return [(s, r) for s, r in zip(updated, rates) if r is not None]

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
        if self.logging_interval == "epoch" and self._last is not None:
            self._log([self._last])
            self._last = None

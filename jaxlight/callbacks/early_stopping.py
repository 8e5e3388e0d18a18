"""Stop when a monitored validation metric stops improving."""

from __future__ import annotations

import math

from jaxlight.callbacks.base import Callback

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Stop after ``patience`` validation runs without an improvement of at least ``min_delta``.

    Args:
        monitor: a metric the validation produces, e.g. "val_loss" or "val_accuracy".
        mode: "min" (lower is better) or "max".
        patience: validation runs without improvement tolerated before stopping.
        min_delta: the smallest change that counts as an improvement.

    Example:
        >>> from jaxlight import Trainer, TrainerConfig
        >>> trainer = Trainer(TrainerConfig(max_epochs=50), callbacks=[EarlyStopping("val_loss", patience=3)])
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if patience < 0 or min_delta < 0:
            raise ValueError(f"EarlyStopping: patience and min_delta must be >= 0, got {patience}, {min_delta}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.wait = 0
        self.stopped_step: int | None = None

    def identity(self) -> str:
        return f"{self.monitor},{self.mode}"

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_validation_end(self, trainer, state, metrics):
        if self.monitor not in metrics:
            raise KeyError(f"EarlyStopping: monitored metric {self.monitor!r} is not among the "
                           f"validation metrics {sorted(metrics)}")
        value = float(metrics[self.monitor])
        if not math.isfinite(value):
            self.stopped_step = trainer.global_step
            trainer.should_stop = True
            return
        if self._improved(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_step = trainer.global_step
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.stopped_step = state["best"], state["wait"], state["stopped_step"]

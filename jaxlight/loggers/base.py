"""The logger protocol: the trainer hands every logger ``{name: float}`` at a step."""

from __future__ import annotations

__all__ = ["Logger"]


class Logger:
    """Base class for metric sinks.

    The Trainer calls ``log_metrics`` with step-level metrics (``train_loss_step`` at each
    step, also for steps fused inside one compiled chunk), epoch-level ones (``train_loss_epoch``,
    ``val_loss``, ``epoch``) and callback values (``lr``); ``resume(step)`` after restoring a
    checkpoint, so that steps logged after that checkpoint by the interrupted run are dropped;
    ``flush`` at epoch ends; ``finalize`` when fit ends.
    """

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_hyperparams(self, params: dict) -> None:
        pass

    def resume(self, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def finalize(self) -> None:
        self.flush()

"""The Trainer's loggers: which ones write, and what each of them is sent when.

:class:`LoggerConnector` (as Lightning's ``_LoggerConnector`` is for its Trainer) sends metrics to
the Trainer's loggers. Only process 0 of a multi-process run writes, and ``fast_dev_run`` writes
nothing. It sends:

- the run's record (``log_hyperparams``) when a fit starts from step 0;
- every ``log_every_n_steps``-th step's metrics as ``train_<name>_step``, also for the steps
  fused inside one compiled chunk;
- each epoch's means as ``train_<name>_epoch`` (an epoch-level ``jaxlight.metrics`` metric as
  ``train_<name>``) beside ``epoch``; validation and test metrics as they come;
- ``resume(step)`` after a checkpoint is restored, ``flush`` at epoch ends, ``finalize`` when fit
  ends.
"""

from __future__ import annotations

import numpy as np

from jaxlight.loggers import Logger
from jaxlight.metrics import Metric

__all__ = ["LoggerConnector"]


class LoggerConnector:
    """The loggers of one Trainer (its ``logging`` attribute).

    Args:
        trainer: the :class:`~jaxlight.trainer.Trainer` whose ``loggers`` write.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    @property
    def active(self) -> list[Logger]:
        """The loggers that write in this process and mode."""
        t = self.trainer
        return [] if t.config.fast_dev_run > 0 or not t.is_global_zero else t.loggers

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Send the scalars of ``metrics`` at ``step`` (a confusion matrix is not sent)."""
        scalars = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
        for logger in self.active:
            logger.log_metrics(scalars, step)

    def log_hyperparams(self, record: dict) -> None:
        """The run's record with the Trainer's whole config under ``trainer``."""
        for logger in self.active:
            logger.log_hyperparams({**record, "trainer": {**self.trainer.config.record(),
                                                          **record.get("trainer", {})}})

    def log_steps(self, first: int, metrics: dict) -> None:
        """Steps ``first + 1 ...`` of a chunk, each ``log_every_n_steps``-th as ``train_<name>_step``."""
        if not self.active:
            return
        every = self.trainer.config.logging.log_every_n_steps
        columns = {f"train_{k}_step": v.tolist() for k, v in metrics.items()
                   if k != "count" and not isinstance(v, Metric)}  # (a Metric's value is the epoch's)
        for j in range(len(metrics["loss"])):
            if (first + j + 1) % every == 0:
                self.log_metrics({k: v[j] for k, v in columns.items()}, first + j + 1)

    def log_epoch(self, epoch: int, train_metrics: dict, whole: set, step: int) -> None:
        """An epoch's training means (``whole``: the epoch-level metrics, logged as ``train_<name>``)."""
        self.log_metrics({"epoch": float(epoch),
                          **{f"train_{k}" if k in whole else f"train_{k}_epoch": v
                             for k, v in train_metrics.items() if k != "count"}}, step)

    def resume(self, step: int) -> None:
        for logger in self.active:
            logger.resume(step)

    def flush(self) -> None:
        for logger in self.active:
            logger.flush()

    def finalize(self) -> None:
        for logger in self.active:
            logger.finalize()

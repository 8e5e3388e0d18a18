"""A tqdm progress bar with live loss and throughput; plain lines when not on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from jaxlight.callbacks.base import Callback

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """One bar per epoch, updated at chunk ends, showing the last step's loss and examples/s.

    When ``stream`` is not a terminal (a log file, CI) there is no bar and no carriage-return
    noise: one line per epoch (``print_epochs``) with the epoch's loss, metric, validation and
    throughput, or nothing at all.

    Args:
        stream: where to write (default ``sys.stderr``).
        print_epochs: print one summary line per epoch when not a terminal.
    """

    def __init__(self, stream: TextIO | None = None, print_epochs: bool = True):
        self.stream, self.print_epochs = stream, print_epochs
        self._bar = None
        self._tick = None
        self._examples = 0
        self._epoch_start = None

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stderr

    @property
    def is_tty(self) -> bool:
        isatty = getattr(self._out, "isatty", None)
        return bool(isatty and isatty())

    def on_fit_start(self, trainer, state):
        self._tick = self._epoch_start = time.perf_counter()
        self._examples = 0

    def on_train_chunk_end(self, trainer, state, metrics):
        now = time.perf_counter()
        steps = len(metrics["loss"])
        examples = float(sum(metrics["count"]))
        self._examples += examples
        if self.is_tty:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=trainer.num_batches, initial=trainer.batch - steps, file=self._out,
                                 desc=f"epoch {trainer.epoch + 1}/{trainer.max_epochs}", unit="step",
                                 leave=False, dynamic_ncols=True)
            self._bar.update(steps)
            self._bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4f}",
                                  ex_s=f"{examples / max(now - self._tick, 1e-9):,.0f}")
        self._tick = now

    def on_epoch_end(self, trainer, state, metrics):
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.print_epochs:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            rate = self._examples / max(now - self._epoch_start, 1e-9)
            print(f"epoch {trainer.epoch}/{trainer.max_epochs}  {shown}  {rate:,.0f} ex/s", file=self._out, flush=True)
        self._epoch_start, self._examples = now, 0

    def on_fit_end(self, trainer, state):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

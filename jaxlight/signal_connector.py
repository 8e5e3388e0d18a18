"""The Trainer's stop signals: SIGTERM and SIGINT end a fit at a chunk boundary, saved.

:class:`SignalConnector` (as Lightning's ``_SignalConnector`` is for its Trainer) installs the
handlers for the length of ``fit`` (main thread only, with ``handle_sigterm``), makes the processes
of a multi-process run agree on stopping at the same step, and saves through the first
ModelCheckpoint before the fit returns with ``trainer.interrupted`` True.

A handler only raises a flag: the fit acts on it at the next chunk end, never inside a step. A
second Ctrl-C raises ``KeyboardInterrupt`` at once (the user insists).
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from pathlib import Path

from jaxlight import checkpoint as ckpt
from jaxlight import parallel
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.state import TrainState

__all__ = ["SignalConnector"]


class SignalConnector:
    """Stop requests of one Trainer (its ``signals`` attribute).

    Attributes:
        received: a stop was requested (by a signal to this process, or agreed with another
            process that got one) and not yet acted on.

    The Trainer's ``stop_signal`` is the signal that stopped the fit (SIGTERM when another process
    of the run got it), ``interrupt_checkpoint`` the folder saved then (None when nothing could be
    saved).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.received = False

    def install(self) -> dict | None:
        """Handle SIGTERM and SIGINT until :meth:`restore`; returns the previous handlers."""
        trainer = self.trainer
        trainer.stop_signal, self.received = None, False
        if not trainer.config.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if signum == signal.SIGINT and trainer.stop_signal is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, save nothing more
            self.received = True  # acted on at the next chunk boundary, never inside a step
            trainer.stop_signal = signum
            if signum == signal.SIGINT and trainer.is_global_zero:
                print(f"\n{signal.Signals(signum).name}: stopping after the running chunk and saving; "
                      f"press Ctrl-C again to abort at once", file=sys.stderr, flush=True)

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def restore(previous: dict | None) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether any process got a stop signal. A scheduler signals processes at slightly
        different moments; if each acted on its own flag, one would enter the checkpoint barrier
        while another entered the next step's collective, and both would hang. So in a
        multi-process run the processes agree at every chunk end (one tiny all-gather) and stop
        together.

        The flag is only ever raised here, never written back: a signal whose handler runs
        while the processes agree (after the flag was read) must not be overwritten by the
        answer, or that stop request would be lost and the run would go on."""
        if self.trainer.config.handle_sigterm and parallel.any_process(self.received):  # (a no-op in one process)
            self.received = True
        return self.received

    def save_and_stop(self, state: TrainState) -> Path | None:
        """Save ``state`` through the first ModelCheckpoint and stop the fit; returns the folder
        (also ``trainer.interrupt_checkpoint``), None when no ModelCheckpoint could save it."""
        trainer = self.trainer
        trainer.stop_signal = trainer.stop_signal or signal.SIGTERM
        name = signal.Signals(trainer.stop_signal).name
        cb = next((c for c in trainer.active_callbacks if isinstance(c, ModelCheckpoint)), None)
        trainer.interrupt_checkpoint = None
        if cb is None:
            warnings.warn(f"{name} at step {trainer.global_step}: stopping without a checkpoint "
                          f"(no ModelCheckpoint callback)", RuntimeWarning, stacklevel=2)
        elif cb.saved and cb.saved[-1] == trainer.global_step:  # (saved at this step already: nothing new to keep)
            trainer.interrupt_checkpoint = ckpt.step_dir(cb.dirpath, trainer.global_step)
        else:
            trainer.interrupt_checkpoint = cb.save(trainer, state)
        trainer.should_stop = trainer.interrupted = True
        self.received = False
        return trainer.interrupt_checkpoint

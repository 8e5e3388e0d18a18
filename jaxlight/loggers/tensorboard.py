"""Scalars as TensorBoard event files, written with tensorboardX's ``SummaryWriter`` (the
PyTorch ``SummaryWriter`` API without torch or TensorFlow)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from jaxlight.loggers.base import Logger

__all__ = ["TensorBoardLogger"]

# tensorboardX names an event file by the second it opened in; two files opened in one second
# (a resume right after a fit in one process) would share a name, the second truncating the
# first. A per-process counter, zero-padded so names sort in opening order, keeps them apart.
_FILE_NUMBERS = itertools.count()


class TensorBoardLogger(Logger):
    """Write ``events.out.tfevents.*`` under ``save_dir`` that ``tensorboard --logdir`` reads.

    Each metric is a scalar tagged with its name (``train_loss_step``, ``val_loss``, ``lr``...)
    at the trainer's global step. On resume the writer reopens with ``purge_step`` one past the
    restored step: TensorBoard then drops the interrupted run's later points, so the curves do
    not double back.

    >>> import tempfile
    >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    >>> logdir = tempfile.mkdtemp()
    >>> logger = TensorBoardLogger(logdir)
    >>> logger.log_metrics({"train_loss_step": 0.5}, step=1)
    >>> logger.finalize()
    >>> events = EventAccumulator(logdir)
    >>> [(e.step, e.value) for e in events.Reload().Scalars("train_loss_step")]
    [(1, 0.5)]
    """

    def __init__(self, save_dir: str | os.PathLike):
        try:
            import tensorboardX  # noqa: F401  (checked now, not at the first log line)
        except ImportError:
            raise ImportError('TensorBoardLogger needs the tensorboardX package: '
                              'pip install "jaxlight[tensorboard]"') from None
        self.save_dir = Path(save_dir)
        self._writer = None

    @property
    def writer(self):
        """The ``tensorboardX.SummaryWriter``, opened (and ``save_dir`` made) at the first write."""
        if self._writer is None:
            self._open()
        return self._writer

    def _open(self, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        suffix = f".{os.getpid()}.{next(_FILE_NUMBERS):06d}"
        self._writer = SummaryWriter(str(self.save_dir), purge_step=purge_step, filename_suffix=suffix)

    def log_metrics(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), int(step))

    def log_hyperparams(self, params):
        """The run's config in TensorBoard's HPARAMS tab (each leaf a dotted key:
        ``model.init_args.width``), and as one ``key: value`` line per leaf in the TEXT tab
        (tag ``hparams/text_summary``, as ``SummaryWriter.add_text`` names it)."""
        from tensorboardX.summary import hparams

        flat = _flatten(json.loads(json.dumps(params, default=str)))
        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()}
        # Only the session's hparams: with no experiment summary TensorBoard offers every scalar
        # tag as a metric column, and the session has not ended yet.
        _, session_start, _ = hparams(values, {})
        self.writer.file_writer.add_summary(session_start, 0)
        self.writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in flat.items()), 0)

    def resume(self, step):
        # TensorBoard purges points at steps >= purge_step; ``step`` itself was logged before
        # the checkpoint and stays. The purge marker goes out now, in a new event file.
        self.finalize()
        self._open(purge_step=int(step) + 1)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def finalize(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _flatten(tree, prefix: str = "") -> dict:
    """``{"model": {"init_args": {"width": 8}}}`` -> ``{"model.init_args.width": 8}`` (None kept).

    >>> _flatten({"model": {"init_args": {"width": 8, "act": None}}, "seed": 0})
    {'model.init_args.width': 8, 'model.init_args.act': 'null', 'seed': 0}
    """
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree if tree is not None else "null"}

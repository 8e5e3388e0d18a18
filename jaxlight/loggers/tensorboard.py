"""Scalars as TensorBoard event files, written with the ``tensorboard`` package alone (no
TensorFlow, no torch)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from jaxlight.loggers.base import Logger

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(Logger):
    """Write ``events.out.tfevents.*`` under ``save_dir`` that ``tensorboard --logdir`` reads.

    Each metric is a scalar summary tagged with its name (``train_loss_step``, ``val_loss``,
    ``lr``...) at the trainer's global step. On resume a ``SessionLog.START`` event at the
    restored step tells TensorBoard to drop the interrupted run's later points, so the curves
    do not double back.
    """

    def __init__(self, save_dir: str | os.PathLike):
        try:
            import tensorboard  # noqa: F401  (checked now, not at the first log line)
        except ImportError:
            raise ImportError('TensorBoardLogger needs the tensorboard package: pip install "jaxlight[tensorboard]"') from None
        self.save_dir = Path(save_dir)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.save_dir.mkdir(parents=True, exist_ok=True)
            self._writer = EventFileWriter(str(self.save_dir))
        return self._writer

    def log_metrics(self, metrics, step):
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=summary_pb2.Summary(value=values)))

    def log_hyperparams(self, params):
        """The run's config in TensorBoard's HPARAMS tab (each leaf a dotted key:
        ``model.init_args.width``), and as text under the tag ``hparams``."""
        import json

        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.hparams import summary_v2

        flat = _flatten(json.loads(json.dumps(params, default=str)))
        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()}
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary_v2.hparams_pb(values)))
        text = "\n".join(f"{k}: {v}" for k, v in flat.items())
        value = summary_pb2.Summary.Value(tag="hparams", metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")))
        value.tensor.dtype = 7  # DT_STRING
        value.tensor.string_val.append(text.encode())
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary_pb2.Summary(value=[value])))

    def resume(self, step):
        from tensorboard.compat.proto import event_pb2

        # TensorBoard purges points at steps >= this event's step; ``step`` itself was logged
        # before the checkpoint and stays.
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step) + 1,
                                              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def finalize(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _flatten(tree, prefix: str = "") -> dict:
    """``{"model": {"init_args": {"width": 8}}}`` -> ``{"model.init_args.width": 8}`` (None kept)."""
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree if tree is not None else "null"}

"""The Trainer: a host-side loop around the one epoch runner, with callbacks, loggers, checkpoints.

``fit`` hands its data to ``jaxlight.loop.prepare_source`` once (which chooses the source,
checks its first batch and places it) and iterates ``jaxlight.loop.EpochRunner`` over the
source it gets back. Each chunk is K steps (Keras's ``steps_per_execution``): one compiled
call of ``jaxlight.step.train_chunk`` when the data lives on the device, K calls of
``jaxlight.step.train_step`` when it streams from the host (through the strategy's methods of
the same names). Between chunks the Trainer does the host-side work: NaN checks, logging,
callbacks, validation, checkpoints, SIGTERM. There is no second implementation of the step:
``fit`` with any K computes bit-for-bit what ``train_chunk`` computes, and K only decides how
often the host gets control (K = 1: every step; K = an epoch: once per epoch, the fastest for
dense models; the default follows ``jaxlight.step.default_steps_per_call``). Chunks also end on
the steps that validation or checkpointing asked for, so those happen exactly where requested.

Data parallelism is one config section (``parallel=ParallelConfig(strategy="pmap"|"sharded"|"fsdp",
devices=n)``): the chunk is then the strategy's ``train_chunk`` (``jaxlight.parallel``), with the same signature and the
same numbers to float32 rounding; nothing else in the loop changes. Checkpoints are written
asynchronously, each array from where it lives, and restored straight into the strategy's
layout, so a run resumes under any strategy and device count (``jaxlight.checkpoint``).

Read top to bottom: :class:`TrainerConfig` (``jaxlight.trainer_config``), then ``Trainer.fit`` (the loop over epochs and
chunks) -> ``_end_chunk`` / ``_end_epoch``. Checkpoints, stop signals and loggers are parts beside
the Trainer (``jaxlight.checkpoint_connector``, ``jaxlight.signal_connector``,
``jaxlight.logger_connector``); its optimizer wrapping is ``jaxlight.optim.wrap_state``.

Example:
    >>> from jaxlight import build_model, create_train_state, optim, tasks
    >>> from jaxlight.trainer import Trainer, TrainerConfig
    >>> from jaxlight.callbacks import EarlyStopping, ModelCheckpoint
    >>> from jaxlight.loggers import CSVLogger
    >>> state = create_train_state(build_model("mlp"), optim.adam(1e-3), tasks.multiclass())
    >>> trainer = Trainer(TrainerConfig(max_epochs=5, batch_size=64),
    ...                   callbacks=[EarlyStopping("val_loss"), ModelCheckpoint("runs/ckpt", monitor="val_loss")],
    ...                   loggers=[CSVLogger("runs/logs")])
    >>> state = trainer.fit(state, train, val)                        # doctest: +SKIP
    >>> state = trainer.fit(fresh_state, train, val, ckpt_path="last")  # resume  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlight import checkpoint as ckpt
from jaxlight import parallel
from jaxlight.callbacks import Callback, ModelCheckpoint, ProgressBar
from jaxlight.checkpoint_connector import CheckpointConnector
from jaxlight.hparams import run_record
from jaxlight.logger_connector import LoggerConnector
from jaxlight.loggers import Logger
from jaxlight.loop import EpochResult, EpochRunner, evaluate, predict, prepare_source, summarize
from jaxlight.metrics import Metric, SavedStats, revive
from jaxlight.optim import wrap_state
from jaxlight.signal_connector import SignalConnector
from jaxlight.state import TrainState
from jaxlight.step import check_not_donated
from jaxlight.trainer_config import PRECISIONS, InConfig, TrainerConfig

__all__ = ["NonFiniteLossError", "Trainer", "TrainerConfig"]


def _compute_dtype(precision: str):
    """The compute dtype a ``numerics.precision`` names (``trainer_config.PRECISIONS``)."""
    name = PRECISIONS[precision]
    return None if name is None else getattr(jnp, name)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step."""


def _callback_list(callbacks: list[Callback], progress_bar: bool) -> list[Callback]:
    """``callbacks`` (with a ProgressBar when ``progress_bar`` and none is given), those of one
    class given distinct ``state_key``s by what sets them apart (several ModelCheckpoints: their
    folders); refuses two that nothing tells apart."""
    if progress_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(ProgressBar())
    for cb in callbacks:
        if "_key_suffix" in vars(cb):
            del cb._key_suffix  # (a callback used by an earlier Trainer)
    groups: dict[str, list] = {}
    for cb in callbacks:
        groups.setdefault(cb.state_key, []).append(cb)
    for key, same in groups.items():
        if len(same) == 1:
            continue
        names = [cb.identity() for cb in same]
        if isinstance(same[0], ModelCheckpoint):
            folders = [os.path.realpath(n) for n in names]
            for i, folder in enumerate(folders):
                if folder in folders[:i]:
                    raise ValueError(f"two ModelCheckpoints save into one folder, {names[i]}: give each its own "
                                     f"dirpath (their step_* checkpoints would overwrite each other)")
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"two callbacks share a state_key ({key!r}) and nothing tells them apart; override "
                             f"state_key to name each")
        for cb, name in zip(same, names):
            cb._key_suffix = f"[{name}]"
    keys = [c.state_key for c in callbacks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two callbacks share a state_key ({keys}); override state_key to tell them apart")
    return callbacks


def _fit_sources(state: TrainState, train_data, val_data, config: TrainerConfig, strategy: parallel.Strategy):
    """The training and validation data as the epoch runner reads them
    (``jaxlight.loop.prepare_source``): checked once, cut to the batches that
    ``overfit_batches`` and ``fast_dev_run`` keep, on the devices when they fit."""
    cfg, overfit, cut = config, config.overfit_batches, config.fast_dev_run
    prepare = functools.partial(prepare_source, state, strategy=strategy, check_finite=cfg.numerics.check_finite)
    train = prepare(train_data, "training set", cfg.batch_size, first_batches=overfit or cut)
    val = None
    if val_data is not None:
        val = prepare(val_data, "validation set", cfg.eval_batch_size, mode="eval", first_batches=cut)
    if overfit:  # validated on the very batches it trains on
        val = prepare(train, "validation set", cfg.eval_batch_size, mode="eval", check=False, first_batches=cut)
        train = prepare(train, "training set", cfg.batch_size, check=False, first_batches=cut)
    return train, val


class Trainer:
    """Fit, validate, test and predict with hooks, logging and exact-resume checkpoints.

    The class is the loop; three parts beside it do one job each: ``checkpoints``
    (:class:`~jaxlight.checkpoint_connector.CheckpointConnector`: save, restore, run records),
    ``signals`` (:class:`~jaxlight.signal_connector.SignalConnector`: SIGTERM/SIGINT) and
    ``logging`` (:class:`~jaxlight.logger_connector.LoggerConnector`: what the loggers get).

    Args:
        config: a :class:`TrainerConfig`; callbacks: :class:`~jaxlight.callbacks.Callback`
            instances, called in this order; loggers: :class:`~jaxlight.loggers.Logger` instances.

    Attributes (what callbacks read):
        global_step: steps (optimizer updates) taken (== ``int(state.step)``).
        epoch: the current epoch, 0-based; at ``on_epoch_end`` the number of finished epochs.
        batch: the next step of the current epoch (the data position saved in checkpoints;
            with ``accumulate_grad_batches=n`` each step is n batches).
        num_batches: steps per epoch (batches / ``accumulate_grad_batches``, rounded up).
        max_epochs: of this fit.
        callback_metrics: the latest of every metric (``loss``, ``accuracy`` of the last
            epoch, ``val_loss``...).
        history: one :class:`~jaxlight.loop.EpochResult` per finished epoch (train and
            validation metrics), restored on resume.
        should_stop: set it to stop after the current chunk.
        interrupted: True when fit returned early because of SIGTERM or SIGINT.
        restored_from: the checkpoint this fit resumed (None: it started fresh).
    """

    # What a checkpoint records about the run and a resume compares (``jaxlight.runconfig``), and the
    # run's resolved config kept in every checkpoint and sent to the loggers: read from the config.
    run_config = InConfig("run_config")
    allow_config_change = InConfig("checkpoint.allow_config_change")
    hparams = InConfig("hparams")

    def __init__(self, config: TrainerConfig | None = None, callbacks=(), loggers=()):
        self.config = config or TrainerConfig()
        self.callbacks: list[Callback] = _callback_list(list(callbacks), self.config.logging.enable_progress_bar)
        self.loggers: list[Logger] = list(loggers)
        self._wrapped: tuple | None = None
        # Resolved now, so that a device count that does not exist fails before any data loads.
        self.strategy: parallel.Strategy = parallel.make_strategy(self.config.parallel.strategy, self.config.parallel.devices)
        self.strategy.check_batch_size(self.config.batch_size)
        self.checkpoints = CheckpointConnector(self)
        self.signals = SignalConnector(self)
        self.logging = LoggerConnector(self)
        self._reset()

    def _reset(self):
        self.global_step = self.epoch = self.batch = self.num_batches = 0
        self.max_epochs = self.config.max_epochs
        self.callback_metrics: dict[str, float] = {}
        self.history: list[EpochResult] = []
        self.should_stop = self.interrupted = False
        self.skipped_steps: list[int] = []
        self._epoch_steps: list[dict] = []  # per-step host metrics of the running epoch
        self._epoch_seconds = 0.0
        self.checkpoints.reset()
        self.restored_from: Path | None = None

    @property
    def is_global_zero(self) -> bool:
        """True in the process that writes logs and progress: process 0 of a multi-process run."""
        return jax.process_index() == 0

    @property
    def active_callbacks(self) -> list[Callback]:
        """Callbacks that run in this mode: ``fast_dev_run`` drops ModelCheckpoint; only process 0
        shows a progress bar (every process saves its own shards, with the same bookkeeping)."""
        return [c for c in self.callbacks
                if not (self.config.fast_dev_run > 0 and isinstance(c, ModelCheckpoint))
                and not (isinstance(c, ProgressBar) and not self.is_global_zero)]

    def prepare(self, state: TrainState) -> TrainState:
        """Apply the config to a fresh state: wrap its optimizer (``jaxlight.optim.wrap_state``)
        and set the compute precision. ``fit`` calls it; call it yourself to build a template for
        ``jaxlight.checkpoint.restore_checkpoint``."""
        state, self._wrapped = wrap_state(state, self.config, self._wrapped)
        return state.replace(compute_dtype=_compute_dtype(self.config.numerics.precision))

    def fit(self, state: TrainState, train_data, val_data=None,
            ckpt_path: str | Path | None = None) -> TrainState:
        """Train; returns the final state.

        Args:
            state: a fresh state from ``create_train_state`` (donated: do not reuse it).
            train_data, val_data: an ``ArrayDataset`` (on the device when it fits: fused chunks)
                or any re-iterable of batches (a generator factory, a ``DataLoader``: streamed
                from the host, one step per batch), checked once (``jaxlight.loop.prepare_source``).
            ckpt_path: resume from ``"last"`` (the newest good checkpoint of the ModelCheckpoints'
                folders), a folder of ``step_*`` checkpoints (its newest good one) or one ``step_*``
                folder: everything continues exactly where it was saved.

        Raises:
            NonFiniteLossError: the loss became NaN/Inf (``nan_policy="raise"``); nothing is
                saved for that step.
            CheckpointError: a checkpoint could not be written or no good one was found.
        """
        cfg, fast_dev = self.config, self.config.fast_dev_run > 0
        self._reset()
        check_not_donated(state)
        state = self.prepare(state)
        self._train, self._val = _fit_sources(state, train_data, val_data, self.config, self.strategy)
        self._num_examples = self._train.num_examples
        self.num_batches = nb = self._train.steps_per_epoch(cfg.accumulate_grad_batches)
        self.max_epochs = 1 if fast_dev else cfg.max_epochs
        self._max_steps = cfg.fast_dev_run if fast_dev else cfg.max_steps
        self.global_step = int(state.step)
        self.epoch, self.batch = divmod(self.global_step, nb) if nb else (0, 0)
        if ckpt_path is not None:
            state = self.checkpoints.restore(state, ckpt_path)
        self.checkpoints.hparams_record = run_record(self.config.hparams, state)  # (read from the single-device state)
        state = self.strategy.prepare_state(state)
        if self.global_step == 0:
            self.logging.log_hyperparams(self.checkpoints.hparams_record)
        previous = self.signals.install()
        self.checkpoints.fitting = True
        try:
            for cb in self.active_callbacks:
                cb.on_fit_start(self, state)
            while not self._done():  # an epoch, from batch self.batch, in chunks of the one epoch runner
                runner = EpochRunner(state, self._train, self.epoch, self.config.batch_size, self.strategy,
                                     self.config.steps_per_execution, start=self.batch,
                                     shuffle=not cfg.overfit_batches, accumulate=self.config.accumulate_grad_batches)
                runner.next_length = self._chunk_length(runner.k)
                t0 = time.perf_counter()
                for state, metrics, _ in runner:
                    host = jax.device_get(metrics)  # synchronises: the time below is real
                    self._epoch_seconds += time.perf_counter() - t0
                    self._end_chunk(state, jax.tree.map(np.asarray, host))
                    if self.signals.agreed() or self._done():
                        break
                    runner.next_length = self._chunk_length(runner.k)
                    t0 = time.perf_counter()
                if runner.finished or (self.num_batches is not None and self.batch >= self.num_batches):
                    if self.num_batches is None:
                        self.num_batches = self.batch  # learnt from the first pass over an unsized source
                    self._end_epoch(state)
                if self.signals.received:
                    self.signals.save_and_stop(state)
            if fast_dev and self._val is not None and not any(k.startswith("val_") for k in self.callback_metrics):
                self._validate(state)
            for cb in self.active_callbacks:
                cb.on_fit_end(self, state)
            self.wait_for_checkpoints()
        finally:
            self.checkpoints.finish()  # (pending saves of a failing fit; ModelCheckpoints' folder locks)
            self.signals.restore(previous)
            self.logging.finalize()
        return state

    def _done(self) -> bool:
        return (self.should_stop or self.epoch >= self.max_epochs
                or (self._max_steps is not None and self.global_step >= self._max_steps))

    def _chunk_length(self, k: int) -> int:
        """K, cut short at the epoch's end, at ``max_steps`` and on requested steps."""
        steps = k
        if self.num_batches is not None:
            steps = min(steps, self.num_batches - self.batch)
        if self._max_steps is not None:
            steps = min(steps, self._max_steps - self.global_step)
        intervals = [self.config.val_every_n_steps] + [c.step_interval() for c in self.active_callbacks]
        for n in intervals:
            if n:
                steps = min(steps, n - self.global_step % n)
        return max(steps, 1)

    def _end_chunk(self, state, metrics: dict) -> None:
        first = self.global_step  # steps first+1 .. first+K just ran
        self.skipped_steps.extend(_nonfinite_steps(metrics["loss"], first, self.epoch, self.batch,
                                                   self.config.numerics.nan_policy))
        self.global_step, self.batch = first + len(metrics["loss"]), self.batch + len(metrics["loss"])
        self._epoch_steps.append(metrics)
        self.logging.log_steps(first, metrics)
        # Validation first, so that a checkpoint saved at this step is scored on it.
        n = self.config.val_every_n_steps
        if n and self.global_step % n == 0 and self._val is not None:
            self._validate(state)
        for cb in self.active_callbacks:
            cb.on_train_chunk_end(self, state, metrics)

    def _end_epoch(self, state) -> None:
        train_metrics, whole = _epoch_means(self._epoch_steps, bool(self.skipped_steps))
        self.callback_metrics.update({**train_metrics, **{f"train_{k}": train_metrics[k] for k in whole}})
        self.epoch, self.batch = self.epoch + 1, 0
        val_every = self.config.val_every_n_epochs
        if self._val is not None and val_every and self.epoch % val_every == 0:
            self._validate(state)
        metrics = {**{k: v for k, v in train_metrics.items() if k != "count"},
                   **{k: v for k, v in self.callback_metrics.items() if k.startswith("val_")}}
        self.history.append(EpochResult(self.epoch - 1, {**train_metrics, **metrics}, self._epoch_seconds))
        self.logging.log_epoch(self.epoch, train_metrics, whole, self.global_step)
        self._epoch_steps, self._epoch_seconds = [], 0.0
        for cb in self.active_callbacks:
            cb.on_epoch_end(self, state, metrics)
        self.logging.flush()

    def _validate(self, state) -> dict:
        metrics = _evaluate(state, self._val, "val", self.strategy)
        self.callback_metrics.update(metrics)
        self.log_metrics(metrics)
        for cb in self.active_callbacks:
            cb.on_validation_end(self, state, metrics)
        return metrics

    def validate(self, state: TrainState, data, ckpt_path: str | Path | None = None) -> dict:
        """``{"val_loss", "val_<metric>"...}`` of the eval-mode model over all of ``data`` (an
        ``ArrayDataset`` or a re-iterable of batches); runs the callbacks' ``on_validation_end``
        and the loggers, as during ``fit``. ``ckpt_path``: as in :meth:`test`."""
        state = self._for_evaluation(state, ckpt_path)
        self._val = prepare_source(state, data, "validation set", self.config.eval_batch_size, self.strategy,
                                   mode="eval")
        return self._validate(state)

    def test(self, state: TrainState, data, ckpt_path: str | Path | None = None) -> dict:
        """``{"test_loss", "test_<metric>"...}`` of the eval-mode model over all of ``data``;
        logged, no hooks. ``ckpt_path``: evaluate a checkpoint's weights instead of ``state``'s
        (see :meth:`load_weights`)."""
        state = self._for_evaluation(state, ckpt_path)
        source = prepare_source(state, data, "test set", self.config.eval_batch_size, self.strategy, mode="eval")
        metrics = _evaluate(state, source, "test", self.strategy)
        self.log_metrics(metrics)
        self.logging.flush()
        return metrics

    def predict(self, state: TrainState, data, batch_size: int | None = None, predict_fn=None,
                ckpt_path: str | Path | None = None):
        """The eval-mode model's outputs for every example of ``data``, padding removed.

        Args:
            data: an ``ArrayDataset``, a pytree of equally long arrays (``{"image": ...}``),
                a re-iterable of batches, or (built-in tasks) a bare input array ``x``.
            batch_size: rows per compiled call (default ``eval_batch_size``; the last batch is
                padded); the result does not depend on it.
            predict_fn: ``predict_fn(model, batch) -> outputs``; default: the built-in task's
                outputs, or for a user's loss the value of its first ``model(...)`` call.
            ckpt_path: predict with a checkpoint's weights (see :meth:`load_weights`).

        Returns: the outputs, any pytree of ``(N, ...)`` numpy arrays.
        """
        check_not_donated(state)
        state = self._for_evaluation(state, ckpt_path)
        return predict(state, data, batch_size or self.config.eval_batch_size, self.strategy, predict_fn)

    def _for_evaluation(self, state: TrainState, ckpt_path) -> TrainState:
        """``state`` (or a checkpoint's weights in it) with the config's compute precision; unlike
        :meth:`prepare` it leaves the optimizer alone (a trained state evaluates under any config)."""
        if ckpt_path is not None:
            state = self.load_weights(state, ckpt_path)
        check_not_donated(state)
        return state.replace(compute_dtype=_compute_dtype(self.config.numerics.precision))

    def load_weights(self, state: TrainState, ckpt_path: str | Path) -> TrainState:
        """``state`` with the parameters and model statistics of a checkpoint (no optimizer
        state, no trainer position): what ``test``/``predict``/``validate`` evaluate.

        Args:
            ckpt_path: "best" (by the metric of the ModelCheckpoint that monitors one; refused,
                naming them, when several do), "last" (the newest good checkpoint of the
                ModelCheckpoints' folders), a folder of ``step_*`` checkpoints or one of them.
        """
        state, self.loaded_from = self.checkpoints.load_weights(state, ckpt_path)
        return state

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Send ``{name: float}`` to every logger at ``step`` (default: the current step); values
        that are not numbers (a confusion matrix) are not sent."""
        self.logging.log_metrics(metrics, self.global_step if step is None else step)

    def run_record(self) -> dict:
        """This fit's configuration as a checkpoint records it (see ``jaxlight.runconfig``)."""
        return self.checkpoints.run_record()

    def run_segments(self) -> list[dict]:
        """One entry per fit of this run: its configuration, steps and accepted changes."""
        return self.checkpoints.run_segments()

    def checkpoint_meta(self, saved_by: str | None = None) -> dict:
        """``meta.json``: all but the arrays that a resume needs (``saved_by``: the saving callback's key)."""
        return self.checkpoints.meta(saved_by)

    def save_checkpoint(self, state: TrainState, directory: str | Path, replace: bool = True,
                        keep_steps=None, owned=None, saved_by: str | None = None) -> Path:
        """Start saving ``state`` and the trainer's position into ``directory``: asynchronous inside
        ``fit``, complete on return outside it; every process of a multi-process run calls it
        (see :meth:`CheckpointConnector.save <jaxlight.checkpoint_connector.CheckpointConnector.save>`)."""
        return self.checkpoints.save(state, directory, replace, keep_steps, owned, saved_by)

    def checkpoint_saver(self, directory: str | Path) -> "ckpt.CheckpointSaver | None":
        """The saver writing into ``directory`` in this fit (``is_saving``: a save is pending)."""
        return self.checkpoints.saver(directory)

    def wait_for_checkpoints(self) -> None:
        """Block until every pending save is complete (``fit`` calls it before it returns); a failed
        save raises ``CheckpointWriteError`` (earlier checkpoints are intact)."""
        self.checkpoints.wait()


def _evaluate(state: TrainState, source, prefix: str, strategy: parallel.Strategy) -> dict:
    metrics = evaluate(state, source, strategy=strategy)
    return {f"{prefix}_{k}": v for k, v in metrics.items() if k != "count"}


def _nonfinite_steps(losses: np.ndarray, first: int, epoch: int, batch: int, nan_policy: str) -> list[int]:
    """The steps (1-based, after ``first``) of a chunk whose loss is NaN/Inf: skipped under
    ``nan_policy="skip"``; under "raise" a :class:`NonFiniteLossError` naming the first one."""
    bad = ~np.isfinite(losses)
    if bad.any() and nan_policy == "raise":
        i = int(np.argmax(bad))
        raise NonFiniteLossError(
            f"training loss is {losses[i]} at step {first + i + 1} (epoch {epoch + 1}, "
            f"batch {batch + i + 1}); training stopped and no checkpoint was written for it. "
            f"Lower the learning rate, set gradient_clip_norm, or nan_policy='skip'")
    return [int(first + j + 1) for j in np.flatnonzero(bad)]


def _epoch_means(epoch_steps: list[dict], skipped: bool) -> tuple[dict, set]:
    """An epoch's metrics from its chunks' per-step host metrics (``jaxlight.loop.summarize``),
    and the names of the epoch-level ones (``jaxlight.metrics``: logged as ``train_<name>``,
    their value being the epoch's)."""
    stacked = jax.tree.map(lambda *chunks: np.concatenate(chunks), *revive(epoch_steps))
    if skipped:  # skipped steps have non-finite losses: leave them out of the means
        finite = np.isfinite(stacked["loss"])
        stacked = jax.tree.map(lambda v: v[finite], stacked)
    whole = {k for k, v in epoch_steps[-1].items() if isinstance(v, (Metric, SavedStats))}
    return summarize(stacked), whole

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

Data parallelism is one config section (``parallel=ParallelConfig(strategy="pmap"|"sharded"|"fsdp", devices=n)``): the chunk
is then the strategy's ``train_chunk`` (``jaxlight.parallel``), with the same signature and the
same numbers to float32 rounding; nothing else in the loop changes. Checkpoints are written
asynchronously, each array from where it lives, and restored straight into the strategy's
layout, so a run resumes under any strategy and device count (``jaxlight.checkpoint``).

Read top to bottom: ``TrainerConfig`` (``jaxlight.trainer_config``), then ``Trainer.fit`` -> ``_run_epoch`` ->
``_end_chunk`` / ``_end_epoch``.

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

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlight import checkpoint as ckpt
from jaxlight import parallel, runconfig
from jaxlight.callbacks import Callback, ModelCheckpoint, ProgressBar
from jaxlight.hparams import run_record
from jaxlight.loggers import Logger
from jaxlight.loop import EpochResult, EpochRunner, evaluate, predict, prepare_source, summarize
from jaxlight.metrics import Metric, SavedStats, from_json, revive, to_json
from jaxlight.report import library_versions
from jaxlight.state import TrainState, keyed_transformation
from jaxlight.step import check_not_donated
from jaxlight.trainer_config import TrainerConfig, compared_fields

__all__ = ["NonFiniteLossError", "Trainer", "TrainerConfig", "wrap_optimizer"]

PRECISIONS = {"float32": None, "bf16": jnp.bfloat16}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step."""


def wrap_optimizer(tx: optax.GradientTransformation, config: TrainerConfig) -> optax.GradientTransformation:
    """``tx`` with the config's freezing, clipping and NaN skipping, through Optax.

    Order: ``apply_if_finite(chain(clip_by_global_norm, freeze(tx)))``. Gradient accumulation is not an
    optimizer wrapper: the step itself averages a window's micro-batch gradients
    (``jaxlight.step.apply_accumulated_step``), so clipping sees the accumulated gradient (as
    Lightning clips before ``optimizer.step``), and a non-finite micro-batch gradient makes
    its window's update non-finite (skipped under ``nan_policy="skip"``).

    The result is keyed (``jaxlight.state.keyed_transformation``): the optimizer is a static
    field of the TrainState, and wrapping an equal ``tx`` with the same settings gives an equal
    object, so a new Trainer per trial reuses the compiled programs (nothing is cached here:
    a cache of optimizers would keep every trial's alive).
    """
    if config.freeze:  # (first: the clip inside sees only the trained parameters' gradient)
        from jaxlight.optim import freeze

        tx = keyed_transformation(freeze(tx, config.freeze))
    if config.numerics.gradient_clip_norm is None and config.numerics.nan_policy != "skip":
        return tx
    if config.numerics.gradient_clip_norm is not None:  # (each layer keyed: see keyed_transformation)
        tx = keyed_transformation(optax.chain(optax.clip_by_global_norm(config.numerics.gradient_clip_norm), tx))
    if config.numerics.nan_policy == "skip":
        tx = keyed_transformation(optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1))
    return tx


def _distinct_keys(callbacks) -> None:
    """Give callbacks of one class distinct ``state_key``s by what sets them apart (several
    ModelCheckpoints: their folders); refuse two that nothing tells apart."""
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


def _plain(tree):
    """``tree`` with its numpy arrays (a confusion matrix's value) as lists, for JSON."""
    return jax.tree.map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v, tree)


def _parse_meta(meta: dict) -> dict:
    """What a resume reads from a checkpoint's ``meta.json``, parsed; ``KeyError``/``TypeError``/
    ``ValueError`` when it is malformed (``jaxlight.checkpoint`` then treats it as corrupt)."""
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"]["batch_size"], int):
        raise ValueError("no config with a batch_size")
    parsed = {
        "epoch": int(meta["epoch"]), "batch": int(meta["batch"]), "step": int(meta["step"]),
        "num_examples": meta["num_examples"],
        "epoch_steps": [{k: from_json(v) or np.asarray(v) for k, v in m.items()} for m in meta["epoch_steps"]],
        "epoch_seconds": float(meta["epoch_seconds"]),
        "callback_metrics": dict(meta["callback_metrics"]),
        "history": [EpochResult(**r) for r in meta["history"]],
        "skipped_steps": list(meta["skipped_steps"]),
        "callbacks": dict(meta["callbacks"]),
    }
    for key in ("run", "trainer", "segments"):
        if meta.get(key) is not None and not isinstance(meta[key], (dict, list)):
            raise TypeError(f"{key} is a {type(meta[key]).__name__}")
    return parsed


class _InConfig:
    """A Trainer attribute read from its config (``path`` in :class:`TrainerConfig`); setting it
    is refused, naming the config key, since a value set after construction would go unseen."""

    def __init__(self, path: str):
        self.path = path

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, trainer, owner=None):
        if trainer is None:
            return self
        return functools.reduce(getattr, self.path.split("."), trainer.config)

    def __set__(self, trainer, value):
        raise AttributeError(f"Trainer.{self.name} is the config's trainer.{self.path}: build the Trainer with "
                             f"TrainerConfig({self.path.split('.')[0]}=...)")


class Trainer:
    """Fit, validate, test and predict with hooks, logging and exact-resume checkpoints.

    Args:
        config: a :class:`TrainerConfig`.
        callbacks: :class:`~jaxlight.callbacks.Callback` instances, called in this order.
        loggers: :class:`~jaxlight.loggers.Logger` instances.

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
        interrupted: True when fit returned early because of SIGTERM.
    """

    def __init__(self, config: TrainerConfig | None = None, callbacks=(), loggers=()):
        self.config = config or TrainerConfig()
        self.callbacks: list[Callback] = list(callbacks)
        if self.config.logging.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in self.callbacks):
            self.callbacks.append(ProgressBar())
        self.loggers: list[Logger] = list(loggers)
        _distinct_keys(self.callbacks)
        self._wrapped: tuple | None = None
        # Resolved now, so that a device count that does not exist fails before any data loads.
        self.strategy: parallel.Strategy = parallel.make_strategy(self.config.parallel.strategy, self.config.parallel.devices)
        self.strategy.check_batch_size(self.config.batch_size)
        self._savers: dict[str, ckpt.CheckpointSaver] = {}  # pending async saves, by folder
        self._fitting = False
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
        self._sigterm = False
        self.restored_from: Path | None = None

    # -- what runs ----------------------------------------------------------------------------

    @property
    def _fast_dev(self) -> bool:
        return self.config.fast_dev_run > 0

    @property
    def is_global_zero(self) -> bool:
        """True in the process that writes (checkpoints, logs, progress): process 0 of a
        multi-process run, always in a single-process one."""
        return jax.process_index() == 0

    @property
    def active_callbacks(self) -> list[Callback]:
        """Callbacks that run in this mode (``fast_dev_run`` drops checkpointing; processes other
        than 0 show no progress bar). Every process runs ModelCheckpoint: every process saves its own
        shards (:meth:`save_checkpoint`), and all keep the same bookkeeping."""
        return [c for c in self.callbacks
                if not (self._fast_dev and isinstance(c, ModelCheckpoint))
                and not (isinstance(c, ProgressBar) and not self.is_global_zero)]

    @property
    def active_loggers(self) -> list[Logger]:
        return [] if self._fast_dev or not self.is_global_zero else self.loggers

    def prepare(self, state: TrainState) -> TrainState:
        """Apply the config to a fresh state: wrap its optimizer (:func:`wrap_optimizer`) and set
        the compute precision. ``fit`` calls it; call it yourself to build a template for
        ``jaxlight.checkpoint.restore_checkpoint``."""
        dtype = PRECISIONS[self.config.numerics.precision]
        if self._wrapped is not None and state.tx is self._wrapped[1]:
            return state.replace(compute_dtype=dtype)
        tx = wrap_optimizer(state.tx, self.config)
        if tx is not state.tx and tx != state.tx:
            if int(state.step) != 0:
                raise ValueError(
                    "gradient_clip_norm / nan_policy='skip' wrap the optimizer, "
                    f"which resets its state, but this state has taken {int(state.step)} steps; pass a fresh "
                    "state (and ckpt_path to resume), or build the optimizer with jaxlight.trainer.wrap_optimizer")
            self._wrapped = (state.tx, tx)
            state = state.replace(tx=tx, opt_state=tx.init(state.params))
        return state.replace(compute_dtype=dtype)

    def _for_evaluation(self, state: TrainState) -> TrainState:
        """``state`` with the config's compute precision; unlike :meth:`prepare` it leaves the
        optimizer alone (a trained state evaluates under any clipping/accumulation config)."""
        check_not_donated(state)
        return state.replace(compute_dtype=PRECISIONS[self.config.numerics.precision])

    def _sources(self, state: TrainState, train_data, val_data):
        """The training and validation data as the epoch runner reads them
        (``jaxlight.loop.prepare_source``): checked once, cut to the batches that
        ``overfit_batches`` and ``fast_dev_run`` keep, on the devices when they fit."""
        cfg, overfit, cut = self.config, self.config.overfit_batches, self.config.fast_dev_run
        prepare = functools.partial(prepare_source, state, strategy=self.strategy,
                                    check_finite=cfg.numerics.check_finite)
        train = prepare(train_data, "training set", cfg.batch_size, first_batches=overfit or cut)
        val = None
        if val_data is not None:
            val = prepare(val_data, "validation set", cfg.eval_batch_size, mode="eval", first_batches=cut)
        if overfit:  # validated on the very batches it trains on
            val = prepare(train, "validation set", cfg.eval_batch_size, mode="eval", check=False, first_batches=cut)
            train = prepare(train, "training set", cfg.batch_size, check=False, first_batches=cut)
        return train, val

    # -- fit ------------------------------------------------------------------------------------

    def fit(self, state: TrainState, train_data, val_data=None,
            ckpt_path: str | Path | None = None) -> TrainState:
        """Train; returns the final state.

        Args:
            state: a fresh state from ``create_train_state`` (donated: do not reuse it).
            train_data, val_data: an ``ArrayDataset`` (put on the device when it fits: fused
                chunks) or any re-iterable of batches (a generator factory, a ``DataLoader``, a
                ``grain`` loader: streamed from the host, one step per batch). Checked once
                before training (``jaxlight.loop.prepare_source``).
            ckpt_path: resume from a checkpoint: ``"last"`` (the newest good checkpoint of the
                ModelCheckpoints' folders), a folder of ``step_*`` checkpoints (the newest good
                one), or one ``step_*`` folder. Params, optimizer state, step, data position,
                callback state and history continue exactly where they were saved.

        Raises:
            NonFiniteLossError: the loss became NaN/Inf (``nan_policy="raise"``); nothing is
                saved for that step.
            CheckpointError: a checkpoint could not be written or no good one was found.
        """
        cfg = self.config
        self._reset()
        check_not_donated(state)
        state = self.prepare(state)
        self._train, self._val = self._sources(state, train_data, val_data)
        self._shuffle = not cfg.overfit_batches
        self._num_examples = self._train.num_examples
        self.num_batches = nb = self._train.steps_per_epoch(cfg.accumulate_grad_batches)
        self.max_epochs = 1 if self._fast_dev else cfg.max_epochs
        self._max_steps = cfg.fast_dev_run if self._fast_dev else cfg.max_steps
        self.global_step = int(state.step)
        self.epoch, self.batch = divmod(self.global_step, nb) if nb else (0, 0)
        if ckpt_path is not None:
            state = self._restore(state, ckpt_path)
        self._hparams = run_record(self.config.hparams, state)  # (read from the single-device state)
        state = self.strategy.prepare_state(state)
        if self.global_step == 0:
            for logger in self.active_loggers:
                logger.log_hyperparams({**self._hparams, "trainer": {**cfg.record(),
                                                                     **self._hparams.get("trainer", {})}})
        previous = self._install_sigterm()
        self._fitting = True
        try:
            for cb in self.active_callbacks:
                cb.on_fit_start(self, state)
            while not self._done():
                state = self._run_epoch(state)
            if self._fast_dev and self._val is not None and not any(
                    k.startswith("val_") for k in self.callback_metrics):
                self._validate(state)
            for cb in self.active_callbacks:
                cb.on_fit_end(self, state)
            self.wait_for_checkpoints()
        finally:
            self._fitting = False
            if self._savers:  # (fit is failing already: finish the pending saves, report that error)
                with contextlib.suppress(ckpt.CheckpointError):
                    self.wait_for_checkpoints()
            self._restore_sigterm(previous)
            for cb in self.callbacks:  # (the folder lock ModelCheckpoint took in on_fit_start)
                if isinstance(cb, ModelCheckpoint):
                    cb.release_lock()
            for logger in self.active_loggers:
                logger.finalize()
        return state

    def _done(self) -> bool:
        return (self.should_stop or self.epoch >= self.max_epochs
                or (self._max_steps is not None and self.global_step >= self._max_steps))

    def _run_epoch(self, state: TrainState) -> TrainState:
        """The rest of epoch ``self.epoch`` from batch ``self.batch``, in chunks of the one
        epoch runner (``jaxlight.loop.EpochRunner``)."""
        runner = EpochRunner(state, self._train, self.epoch, self.config.batch_size, self.strategy,
                             self.config.steps_per_execution, start=self.batch, shuffle=self._shuffle,
                             accumulate=self.config.accumulate_grad_batches)
        runner.next_length = self._chunk_length(runner.k)
        t0 = time.perf_counter()
        for state, metrics, _ in runner:
            host = jax.device_get(metrics)  # synchronises: the time below is real
            self._epoch_seconds += time.perf_counter() - t0
            self._end_chunk(state, jax.tree.map(np.asarray, host))
            if self._sigterm_agreed() or self._done():
                break
            runner.next_length = self._chunk_length(runner.k)
            t0 = time.perf_counter()
        if runner.finished or (self.num_batches is not None and self.batch >= self.num_batches):
            if self.num_batches is None:
                self.num_batches = self.batch  # learnt from the first pass over an unsized source
            self._end_epoch(state)
        if self._sigterm:
            self._save_on_sigterm(state)
        return state

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
        bad = ~np.isfinite(metrics["loss"])
        if bad.any():
            i = int(np.argmax(bad))
            if self.config.numerics.nan_policy == "raise":
                raise NonFiniteLossError(
                    f"training loss is {metrics['loss'][i]} at step {first + i + 1} (epoch {self.epoch + 1}, "
                    f"batch {self.batch + i + 1}); training stopped and no checkpoint was written for it. "
                    f"Lower the learning rate, set gradient_clip_norm, or nan_policy='skip'")
            self.skipped_steps.extend(int(first + j + 1) for j in np.flatnonzero(bad))
        self.global_step += len(metrics["loss"])
        self.batch += len(metrics["loss"])
        self._epoch_steps.append(metrics)
        if self.active_loggers:
            every = self.config.logging.log_every_n_steps
            columns = {f"train_{k}_step": v.tolist() for k, v in metrics.items()
                       if k != "count" and not isinstance(v, Metric)}  # (a Metric's value is the epoch's)
            for j in range(len(metrics["loss"])):
                if (first + j + 1) % every == 0:
                    self.log_metrics({k: v[j] for k, v in columns.items()}, first + j + 1)
        # Validation first, so that a checkpoint saved at this step is scored on it.
        n = self.config.val_every_n_steps
        if n and self.global_step % n == 0 and self._val is not None:
            self._validate(state)
        for cb in self.active_callbacks:
            cb.on_train_chunk_end(self, state, metrics)

    def _epoch_metrics(self) -> dict:
        steps = revive(self._epoch_steps)
        stacked = jax.tree.map(lambda *chunks: np.concatenate(chunks), *steps)
        if self.skipped_steps:  # skipped steps have non-finite losses: leave them out of the means
            finite = np.isfinite(stacked["loss"])
            stacked = jax.tree.map(lambda v: v[finite], stacked)
        return summarize(stacked)

    def _end_epoch(self, state) -> None:
        train_metrics = self._epoch_metrics()
        # Epoch-level metrics (jaxlight.metrics) are logged as train_<name>, their value being the epoch's.
        whole = {k for k, v in self._epoch_steps[-1].items() if isinstance(v, (Metric, SavedStats))}
        self.callback_metrics.update(train_metrics)
        self.callback_metrics.update({f"train_{k}": train_metrics[k] for k in whole})
        self.epoch, self.batch = self.epoch + 1, 0
        val_every = self.config.val_every_n_epochs
        if self._val is not None and val_every and self.epoch % val_every == 0:
            self._validate(state)
        metrics = {**{k: v for k, v in train_metrics.items() if k != "count"},
                   **{k: v for k, v in self.callback_metrics.items() if k.startswith("val_")}}
        self.history.append(EpochResult(self.epoch - 1, {**train_metrics, **metrics}, self._epoch_seconds))
        self.log_metrics({"epoch": float(self.epoch),
                          **{f"train_{k}" if k in whole else f"train_{k}_epoch": v
                             for k, v in train_metrics.items() if k != "count"}})
        self._epoch_steps, self._epoch_seconds = [], 0.0
        for cb in self.active_callbacks:
            cb.on_epoch_end(self, state, metrics)
        for logger in self.active_loggers:
            logger.flush()

    # -- evaluation -----------------------------------------------------------------------------

    def _evaluate(self, state, source, prefix: str) -> dict:
        metrics = evaluate(state, source, strategy=self.strategy)
        return {f"{prefix}_{k}": v for k, v in metrics.items() if k != "count"}

    def _validate(self, state) -> dict:
        metrics = self._evaluate(state, self._val, "val")
        self.callback_metrics.update(metrics)
        self.log_metrics(metrics)
        for cb in self.active_callbacks:
            cb.on_validation_end(self, state, metrics)
        return metrics

    def validate(self, state: TrainState, data, ckpt_path: str | Path | None = None) -> dict:
        """``{"val_loss", "val_<metric>"...}`` of the eval-mode model over all of ``data`` (an
        ``ArrayDataset`` or a re-iterable of batches); runs the callbacks' ``on_validation_end``
        and the loggers, as during ``fit``. ``ckpt_path``: as in :meth:`test`."""
        if ckpt_path is not None:
            state = self.load_weights(state, ckpt_path)
        state = self._for_evaluation(state)
        self._val = prepare_source(state, data, "validation set", self.config.eval_batch_size, self.strategy,
                                   mode="eval")
        return self._validate(state)

    def test(self, state: TrainState, data, ckpt_path: str | Path | None = None) -> dict:
        """``{"test_loss", "test_<metric>"...}`` of the eval-mode model over all of ``data``;
        logged, no hooks. ``ckpt_path``: evaluate a checkpoint's weights instead of ``state``'s
        (see :meth:`load_weights`)."""
        if ckpt_path is not None:
            state = self.load_weights(state, ckpt_path)
        state = self._for_evaluation(state)
        source = prepare_source(state, data, "test set", self.config.eval_batch_size, self.strategy, mode="eval")
        metrics = self._evaluate(state, source, "test")
        self.log_metrics(metrics)
        for logger in self.active_loggers:
            logger.flush()
        return metrics

    def predict(self, state: TrainState, data, batch_size: int | None = None, predict_fn=None,
                ckpt_path: str | Path | None = None):
        """The eval-mode model's outputs for every example of ``data``, padding removed.

        Args:
            data: an ``ArrayDataset``, a pytree of equally long arrays (``{"image": ...}``),
                a re-iterable of batches, or (built-in tasks) a bare input array ``x``.
            batch_size: rows per compiled call (default ``eval_batch_size``); the last batch is
                padded, so one program serves any N, and the result does not depend on it
                (eval mode: every row is computed on its own).
            predict_fn: ``predict_fn(model, batch) -> outputs``; default: the built-in task's
                model outputs, or for a user's loss the value of the first ``model(...)`` call
                inside ``loss_fn`` (which then must run on the batch).
            ckpt_path: predict with a checkpoint's weights instead of ``state``'s (see
                :meth:`load_weights`).

        Returns:
            The outputs, any pytree of ``(N, ...)`` numpy arrays.
        """
        check_not_donated(state)
        if ckpt_path is not None:
            state = self.load_weights(state, ckpt_path)
        state = self._for_evaluation(state)
        return predict(state, data, batch_size or self.config.eval_batch_size, self.strategy, predict_fn)

    def load_weights(self, state: TrainState, ckpt_path: str | Path) -> TrainState:
        """``state`` with the parameters and model statistics of a checkpoint (no optimizer
        state, no trainer position): what ``test``/``predict``/``validate`` evaluate.

        Args:
            ckpt_path: "best" (the best checkpoint by the monitored metric of the ModelCheckpoint
                that monitors one; refused, naming them, when several do), "last" (the newest
                good checkpoint of the ModelCheckpoints' folders), a folder of ``step_*``
                checkpoints (its newest good one) or one ``step_*`` folder.
        """
        callbacks = [c for c in self.callbacks if isinstance(c, ModelCheckpoint)]
        if str(ckpt_path) == "best":
            path = ckpt.resolve_checkpoint(self._best_callback(callbacks).dirpath, "best")
        elif str(ckpt_path) == "last":
            path = ckpt.resolve_checkpoint(self._last_folder(callbacks), "last")
        else:
            path = ckpt.resolve_checkpoint(ckpt_path, "last")
        from flax import nnx

        model = ckpt.load_model(path, state.module(train=False))
        _, params, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
        self.loaded_from = path
        return state.replace(params=params, model_state=model_state)

    # -- logging --------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Send ``{name: float}`` to every logger at ``step`` (default: the current step); values
        that are not numbers (a confusion matrix) are not sent."""
        step = self.global_step if step is None else step
        scalars = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
        for logger in self.active_loggers:
            logger.log_metrics(scalars, step)

    # -- checkpoints ----------------------------------------------------------------------------

    # What a checkpoint records about the run and a resume compares (``jaxlight.runconfig``), and the
    # run's resolved config kept in every checkpoint and sent to the loggers: all read from the config.
    run_config = _InConfig("run_config")
    allow_config_change = _InConfig("checkpoint.allow_config_change")
    hparams = _InConfig("hparams")
    _hparams: dict | None = None

    def run_record(self) -> dict:
        """This fit's configuration as a checkpoint records it (see ``jaxlight.runconfig``)."""
        return {"run": dict(self.config.run_config or {}), "trainer": compared_fields(self.config)}

    def run_segments(self) -> list[dict]:
        """One entry per fit of this run (a resumed run has several): its configuration, the
        steps it covered, and the configuration differences it accepted on resume."""
        resumed = self.restored_from is not None
        previous = [dict(s) for s in self._resumed_segments] if resumed else []
        if previous:
            previous[-1]["to_step"] = self._segment_start
        current = {**self.run_record(), "from_step": self._segment_start if resumed else 0,
                   "to_step": self.global_step, "accepted_changes": self._accepted_changes if resumed else []}
        return previous + [current]

    def checkpoint_meta(self, saved_by: str | None = None) -> dict:
        """Everything besides the arrays that a resumed fit needs (JSON); ``saved_by``: the
        ``state_key`` of the ModelCheckpoint that writes it."""
        return {
            "saved_by": saved_by,
            **self.run_record(),
            "segments": self.run_segments(),
            "epoch": self.epoch,
            "batch": self.batch,
            "num_examples": self._num_examples,
            "epoch_steps": [{k: to_json(v) if isinstance(v, (Metric, SavedStats)) else v.tolist() for k, v in m.items()}
                            for m in self._epoch_steps],
            "epoch_seconds": self._epoch_seconds,
            "callback_metrics": _plain(self.callback_metrics),
            "history": [_plain(dataclasses.asdict(r)) for r in self.history],
            "skipped_steps": self.skipped_steps,
            "callbacks": {c.state_key: c.state_dict() for c in self.callbacks},
            "config": self.config.record(),
            "hparams": self._hparams if self._hparams is not None else run_record(self.config.hparams),
            "versions": library_versions("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"),
        }

    def save_checkpoint(self, state: TrainState, directory: str | Path, replace: bool = True,
                        keep_steps=None, owned=None, saved_by: str | None = None) -> Path:
        """Start saving ``state`` and the trainer's position now (see ``jaxlight.checkpoint``).

        Asynchronous inside ``fit``: training goes on while the arrays are written; the next save
        into ``directory`` and the end of ``fit`` wait for it (:meth:`wait_for_checkpoints`).
        Outside ``fit`` it returns once the checkpoint is complete. Each
        array is saved from where it lives: in a multi-process run every process must call this
        and writes the shards its devices hold (the folder must be on a file system all
        processes see); nothing is gathered to one host. The checkpoint restores under any
        strategy and device count. ``replace``, ``keep_steps``, ``owned``: see
        ``jaxlight.checkpoint.CheckpointSaver.save``. ``saved_by``: the ModelCheckpoint saving
        (its ``state_key``), recorded so that ``"best"`` reads that callback's scores.
        """
        key = os.path.realpath(directory)
        if key not in self._savers:
            self._savers[key] = ckpt.CheckpointSaver(directory)
        path = self._savers[key].save(state, self.checkpoint_meta(saved_by), replace=replace, keep_steps=keep_steps,
                                      owned=owned)
        if not self._fitting:  # (called outside fit: nothing else would wait for it)
            self.wait_for_checkpoints()
        return path

    def checkpoint_saver(self, directory: str | Path) -> "ckpt.CheckpointSaver | None":
        """The saver writing into ``directory`` in this fit (``is_saving``: a save is pending)."""
        return self._savers.get(os.path.realpath(directory))

    def wait_for_checkpoints(self) -> None:
        """Block until every pending save is complete (``fit`` calls it before it returns).

        Raises:
            CheckpointWriteError: a pending save failed; earlier checkpoints are intact.
        """
        savers, self._savers = list(self._savers.values()), {}
        errors = []
        for saver in savers:
            try:
                saver.close()
            except ckpt.CheckpointError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _checkpoint_callback(self) -> ModelCheckpoint | None:
        return next((c for c in self.active_callbacks if isinstance(c, ModelCheckpoint)), None)

    def _checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        return [c for c in self.active_callbacks if isinstance(c, ModelCheckpoint)]

    def _last_folder(self, callbacks: list[ModelCheckpoint]) -> Path:
        """The folder holding the newest checkpoint among the ModelCheckpoints' folders."""
        if not callbacks:
            raise ValueError("ckpt_path='last' needs a ModelCheckpoint callback (its folder is searched)")
        newest = [(ckpt.list_checkpoints(c.dirpath)[-1:], -i, c.dirpath) for i, c in enumerate(callbacks)]
        steps = [(int(found[0].name.split("_")[1]), order, folder) for found, order, folder in newest if found]
        return max(steps)[2] if steps else callbacks[0].dirpath

    def _best_callback(self, callbacks: list[ModelCheckpoint]) -> ModelCheckpoint:
        """The ModelCheckpoint ``ckpt_path="best"`` reads: the one that monitors a metric (the only
        one there is, when none does); refused when that is ambiguous."""
        if not callbacks:
            raise ValueError("ckpt_path='best' needs a ModelCheckpoint callback (its folder is searched)")
        monitoring = [c for c in callbacks if c.monitor is not None]
        if len(monitoring) == 1 or len(callbacks) == 1:
            return (monitoring or callbacks)[0]
        which = monitoring or callbacks
        names = ", ".join(f"{c.dirpath} ({'monitors ' + c.monitor if c.monitor else 'monitors no metric'})"
                          for c in which)
        raise ValueError(f"ckpt_path='best' is ambiguous: {len(which)} ModelCheckpoints "
                         f"{'monitor a metric' if monitoring else 'and none monitors a metric'} ({names}); pass one "
                         f"of their folders' best checkpoint, e.g. ckpt_path=callback.best_model_path")

    def _restore(self, state: TrainState, ckpt_path) -> TrainState:
        if str(ckpt_path) == "last":
            ckpt_path = self._last_folder(self._checkpoint_callbacks())
        path = Path(ckpt_path)
        try:
            with warnings.catch_warnings(record=True) as skipped:  # (said below, unless a config change explains them)
                warnings.simplefilter("always")
                shardings = self.strategy.state_shardings(state)  # (read straight into this layout)
                if (path / "manifest.json").exists() or (path / "meta.json").exists():
                    state, meta = ckpt.restore_checkpoint(path, state, _parse_meta, shardings)
                else:
                    state, meta, path = ckpt.restore_latest(path, state, _parse_meta, shardings)
        except ckpt.IncompatibleCheckpointError as exc:
            changed = [] if exc.saved_optimizer else self._changed_since(path)
            if changed:
                raise runconfig.ConfigMismatchError(
                    f"{path} was written by a run configured differently: {'; '.join(changed)}. Its arrays do not "
                    f"fit this run's state, so no resume can continue it, with allow_config_change or without: "
                    f"resume with the checkpoint's settings, or start a new run in another folder") from None
            for w in skipped:
                warnings.warn(w.message, w.category, stacklevel=2)
            if not exc.saved_optimizer:
                raise
            now = (self.config.run_config or {}).get("optimizer", "another one")
            raise runconfig.ConfigMismatchError(
                f"{path} was saved with optimizer {exc.saved_optimizer}, this run uses {now}: their optimizer "
                f"states hold different arrays, so --allow-config-change cannot accept this change (the saved state "
                f"has no place in the new one); resume with the checkpoint's optimizer, or start a new run") from None
        for w in skipped:
            warnings.warn(w.message, w.category, stacklevel=2)
        saved_accumulate = meta["config"].get("accumulate_grad_batches", 1)
        if saved_accumulate != self.config.accumulate_grad_batches:
            raise ckpt.CheckpointError(
                f"{path} was saved with accumulate_grad_batches {saved_accumulate}; this fit has "
                f"{self.config.accumulate_grad_batches}: its step count and data position count windows of "
                f"{saved_accumulate} batches")
        self._check_run(path, meta, state)
        parsed = _parse_meta(meta)
        self.global_step = int(state.step)
        self.epoch, self.batch = parsed["epoch"], parsed["batch"]
        self._epoch_steps = parsed["epoch_steps"]
        self._epoch_seconds = parsed["epoch_seconds"]
        self.callback_metrics = parsed["callback_metrics"]
        self.history = parsed["history"]
        self.skipped_steps = parsed["skipped_steps"]
        for cb in self.callbacks:
            saved = cb.find_state(parsed["callbacks"])
            if saved is not None:
                cb.load_state_dict(saved)
        for cb in self.callbacks:  # (several ModelCheckpoints: each one's own save at this step)
            if isinstance(cb, ModelCheckpoint):
                cb.catch_up(self.global_step, path)
        for logger in self.active_loggers:
            logger.resume(self.global_step)
        self.restored_from = path
        return state

    def _changed_since(self, path: Path) -> list[str]:
        """The configuration fields in which this fit differs from the newest readable
        checkpoint at ``path`` (a folder of them, or one): what explains arrays that do not fit."""
        candidates = [path] if (path / "meta.json").exists() else list(reversed(ckpt.list_checkpoints(path)))
        for candidate in candidates:
            try:
                meta = json.loads((candidate / "meta.json").read_text())
                saved = {k: meta.get(k) for k in ("run", "trainer")}
            except (OSError, ValueError, AttributeError):
                continue
            return runconfig.differences(saved, self.run_record())
        return []

    def _check_run(self, path: Path, meta: dict, state: TrainState) -> None:
        """Refuse a checkpoint written with another configuration or already past max_epochs."""
        saved = {k: meta.get(k) for k in ("run", "trainer", "optimizer_chain")}
        diffs = runconfig.differences(saved, {**self.run_record(), "optimizer_chain": ckpt.optimizer_chain(state.opt_state)})
        saved_batch = meta["config"]["batch_size"]
        # The saved position counts batches of the saved size over the saved examples: it means
        # the same batches again only at an epoch's start, where it is (epoch, 0).
        moved = saved_batch != self.config.batch_size or meta["num_examples"] != self._num_examples
        what = (f"batch_size {saved_batch} on {meta['num_examples']} training examples; this fit has batch_size "
                f"{self.config.batch_size} on {self._num_examples}" + (f" ({'; '.join(diffs)})" if diffs else ""))
        if moved and not self.config.checkpoint.allow_config_change:
            raise runconfig.ConfigMismatchError(
                f"{path} was saved with {what}: the saved data position would not mean the same batches. Resume "
                f"with the same settings, or accept the change at an epoch's end (--allow-config-change)")
        if diffs and not self.config.checkpoint.allow_config_change:
            raise runconfig.ConfigMismatchError(
                f"{path} was written by a run configured differently: {'; '.join(diffs)}. Resume with the "
                f"same settings, or accept the change (--allow-config-change, trainer.checkpoint.allow_config_change)")
        if moved and meta["batch"] != 0:
            raise runconfig.ConfigMismatchError(
                f"{path} stopped inside epoch {meta['epoch'] + 1} (batch {meta['batch']}) and was saved with {what}: "
                f"--allow-config-change accepts that only at an epoch's end, since a position inside an epoch "
                f"would not mean the same batches; resume from an epoch-end checkpoint or with the same settings")
        if diffs:
            warnings.warn(f"resuming {path} with a changed configuration: {'; '.join(diffs)}", RuntimeWarning,
                          stacklevel=3)
        if meta["epoch"] > self.max_epochs or (meta["epoch"] == self.max_epochs and meta["batch"] > 0):
            raise runconfig.ConfigMismatchError(
                f"{path} is already at epoch {meta['epoch']} batch {meta['batch']} (step {meta['step']}), past "
                f"max_epochs={self.max_epochs} (--epochs): nothing to train; ask for more epochs to continue it")
        self._accepted_changes, self._segment_start = diffs, int(meta["step"])
        self._resumed_segments = meta.get("segments") or [{k: v for k, v in saved.items() if k != "optimizer_chain"}
                                                          | {"from_step": 0}]

    # -- SIGTERM --------------------------------------------------------------------------------

    def _install_sigterm(self):
        """SIGTERM and SIGINT (Ctrl-C) both stop the fit at the next chunk end, saved; a second
        SIGINT raises KeyboardInterrupt at once (the user insists). Returns the previous handlers."""
        self.stop_signal: int | None = None
        if not self.config.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if signum == signal.SIGINT and self.stop_signal is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, save nothing more
            self._sigterm = True  # acted on at the next chunk boundary, never inside a step
            self.stop_signal = signum
            if signum == signal.SIGINT and self.is_global_zero:
                print(f"\n{signal.Signals(signum).name}: stopping after the running chunk and saving; "
                      f"press Ctrl-C again to abort at once", file=sys.stderr, flush=True)

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _sigterm_agreed(self) -> bool:
        """Whether any process got SIGTERM. A scheduler signals processes at slightly different
        moments; if each acted on its own flag, one would enter the checkpoint barrier while
        another entered the next step's collective, and both would hang. So in a multi-process
        run the processes agree at every chunk end (one tiny all-gather) and stop together.

        The flag is only ever raised here, never written back: a signal whose handler runs
        while the processes agree (after the flag was read) must not be overwritten by the
        answer, or that stop request would be lost and the run would go on."""
        if self.config.handle_sigterm and parallel.any_process(self._sigterm):  # (a no-op in one process)
            self._sigterm = True
        return self._sigterm

    def _restore_sigterm(self, previous) -> None:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)

    def _save_on_sigterm(self, state) -> None:
        """Save through the first ModelCheckpoint and stop; ``interrupted`` is then True,
        ``stop_signal`` the signal (SIGTERM when another process of the run got it), and
        ``interrupt_checkpoint`` the saved folder (None when nothing could be saved)."""
        self.stop_signal = self.stop_signal or signal.SIGTERM
        name = signal.Signals(self.stop_signal).name
        cb = self._checkpoint_callback()
        self.interrupt_checkpoint = None
        if cb is None:
            warnings.warn(f"{name} at step {self.global_step}: stopping without a checkpoint "
                          f"(no ModelCheckpoint callback)", RuntimeWarning, stacklevel=2)
        elif cb.saved and cb.saved[-1] == self.global_step:  # (saved at this step already: nothing new to keep)
            self.interrupt_checkpoint = ckpt.step_dir(cb.dirpath, self.global_step)
        else:
            self.interrupt_checkpoint = cb.save(self, state)
        self.should_stop = self.interrupted = True
        self._sigterm = False

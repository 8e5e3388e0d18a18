"""The Trainer's checkpoints: what a save records beside the arrays, and how a resume continues it.

:class:`CheckpointConnector` is the one part of a :class:`~jaxlight.trainer.Trainer` that talks to
``jaxlight.checkpoint`` (as Lightning's ``_CheckpointConnector`` is for its Trainer). It

- saves: starts an asynchronous ``CheckpointSaver`` per folder, writes ``meta.json`` (the
  trainer's position, the running epoch's metrics, the callbacks' state, the run record and its
  segments, the resolved hparams, library versions) and waits for pending saves;
- restores: resolves ``"last"``/``"best"``/folder/step paths, refuses a checkpoint this fit
  cannot continue (another configuration, batch size or data, accumulation window, optimizer,
  a position past ``max_epochs``), and puts the saved position back into the Trainer, its
  callbacks and loggers;
- keeps the run's record: which configuration each fit of a resumed run used, over which steps,
  and which changes a resume accepted (``jaxlight.runconfig``).

The connector owns no training state: the position (``global_step``, ``epoch``, ``batch``...)
stays on the Trainer, where callbacks read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np

from jaxlight import checkpoint as ckpt
from jaxlight import runconfig
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.hparams import run_record
from jaxlight.loop import EpochResult
from jaxlight.metrics import Metric, SavedStats, from_json, to_json
from jaxlight.report import library_versions
from jaxlight.state import TrainState
from jaxlight.trainer_config import compared_fields

__all__ = ["CheckpointConnector"]


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


class CheckpointConnector:
    """Saves, restores and records the runs of one Trainer (its ``checkpoints`` attribute).

    Args:
        trainer: the :class:`~jaxlight.trainer.Trainer` whose position, callbacks and loggers
            are saved and restored.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.savers: dict[str, ckpt.CheckpointSaver] = {}  # pending async saves, by folder
        self.fitting = False  # inside fit: saves are awaited at the next save or fit's end
        self.hparams_record: dict | None = None  # kept in meta.json (``jaxlight.hparams.run_record``), per fit
        self.reset()

    def reset(self) -> None:
        """Forget the previous fit's resume (a fit that does not resume is one segment)."""
        self.accepted_changes: list[str] = []
        self.segment_start = 0
        self.resumed_segments: list[dict] = []

    # -- what a checkpoint records --------------------------------------------------------------

    def run_record(self) -> dict:
        """The fit's configuration as a checkpoint records it (see ``jaxlight.runconfig``)."""
        trainer = self.trainer
        return {"run": dict(trainer.config.run_config or {}), "trainer": compared_fields(trainer.config)}

    def run_segments(self) -> list[dict]:
        """One entry per fit of the run (a resumed run has several): its configuration, the steps
        it covered, and the configuration differences it accepted on resume."""
        resumed = self.trainer.restored_from is not None
        previous = [dict(s) for s in self.resumed_segments] if resumed else []
        if previous:
            previous[-1]["to_step"] = self.segment_start
        current = {**self.run_record(), "from_step": self.segment_start if resumed else 0,
                   "to_step": self.trainer.global_step, "accepted_changes": self.accepted_changes if resumed else []}
        return previous + [current]

    def meta(self, saved_by: str | None = None) -> dict:
        """``meta.json``: everything besides the arrays that a resumed fit needs."""
        t = self.trainer
        return {
            "saved_by": saved_by,
            **self.run_record(),
            "segments": self.run_segments(),
            "epoch": t.epoch,
            "batch": t.batch,
            "num_examples": t._num_examples,
            "epoch_steps": [{k: to_json(v) if isinstance(v, (Metric, SavedStats)) else v.tolist() for k, v in m.items()}
                            for m in t._epoch_steps],
            "epoch_seconds": t._epoch_seconds,
            "callback_metrics": _plain(t.callback_metrics),
            "history": [_plain(dataclasses.asdict(r)) for r in t.history],
            "skipped_steps": t.skipped_steps,
            "callbacks": {c.state_key: c.state_dict() for c in t.callbacks},
            "config": t.config.record(),
            "hparams": self.hparams_record if self.hparams_record is not None else run_record(t.config.hparams),
            "versions": library_versions("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"),
        }

    # -- saving ---------------------------------------------------------------------------------

    def save(self, state: TrainState, directory: str | Path, replace: bool = True, keep_steps=None, owned=None,
             saved_by: str | None = None) -> Path:
        """Start saving ``state`` and the trainer's position now (:meth:`meta`; see ``jaxlight.checkpoint``).

        Asynchronous inside ``fit``: training goes on while the arrays are written; the next save
        into ``directory`` and the end of ``fit`` wait for it (:meth:`wait`). Outside ``fit`` it
        returns once the checkpoint is complete. Each array is saved from where it lives: in a
        multi-process run every process must call this and writes the shards its devices hold
        (the folder must be on a file system all processes see); nothing is gathered to one host.
        The checkpoint restores under any strategy and device count. ``replace``, ``keep_steps``,
        ``owned``: see ``jaxlight.checkpoint.CheckpointSaver.save``. ``saved_by``: the
        ModelCheckpoint saving (its ``state_key``), recorded so that ``"best"`` reads that
        callback's scores.
        """
        key = os.path.realpath(directory)
        if key not in self.savers:
            self.savers[key] = ckpt.CheckpointSaver(directory)
        path = self.savers[key].save(state, self.meta(saved_by), replace=replace, keep_steps=keep_steps, owned=owned)
        if not self.fitting:  # (called outside fit: nothing else would wait for it)
            self.wait()
        return path

    def saver(self, directory: str | Path) -> "ckpt.CheckpointSaver | None":
        """The saver writing into ``directory`` in this fit."""
        return self.savers.get(os.path.realpath(directory))

    def wait(self) -> None:
        """Block until every pending save is complete; raise the first one's error."""
        savers, self.savers = list(self.savers.values()), {}
        errors = []
        for saver in savers:
            try:
                saver.close()
            except ckpt.CheckpointError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def finish(self) -> None:
        """When a fit ends: finish the saves still pending (the fit is failing already: its error is
        the one reported) and release the folder locks the ModelCheckpoints took in ``on_fit_start``."""
        self.fitting = False
        if self.savers:
            try:
                self.wait()
            except ckpt.CheckpointError:
                pass
        for cb in self.trainer.callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.release_lock()

    # -- which checkpoint -----------------------------------------------------------------------

    @staticmethod
    def last_folder(callbacks: list[ModelCheckpoint]) -> Path:
        """The folder holding the newest checkpoint among the ModelCheckpoints' folders."""
        if not callbacks:
            raise ValueError("ckpt_path='last' needs a ModelCheckpoint callback (its folder is searched)")
        newest = [(ckpt.list_checkpoints(c.dirpath)[-1:], -i, c.dirpath) for i, c in enumerate(callbacks)]
        steps = [(int(found[0].name.split("_")[1]), order, folder) for found, order, folder in newest if found]
        return max(steps)[2] if steps else callbacks[0].dirpath

    @staticmethod
    def best_callback(callbacks: list[ModelCheckpoint]) -> ModelCheckpoint:
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

    def weights_path(self, ckpt_path: str | Path) -> Path:
        """The one checkpoint ``"best"``, ``"last"``, a folder or a ``step_*`` folder names."""
        callbacks = [c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)]
        if str(ckpt_path) == "best":
            return ckpt.resolve_checkpoint(self.best_callback(callbacks).dirpath, "best")
        if str(ckpt_path) == "last":
            return ckpt.resolve_checkpoint(self.last_folder(callbacks), "last")
        return ckpt.resolve_checkpoint(ckpt_path, "last")

    def load_weights(self, state: TrainState, ckpt_path: str | Path) -> tuple[TrainState, Path]:
        """``state`` with the parameters and model statistics of the checkpoint ``ckpt_path``
        names (:meth:`weights_path`), and that checkpoint's folder."""
        from flax import nnx

        path = self.weights_path(ckpt_path)
        model = ckpt.load_model(path, state.module(train=False))
        _, params, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
        return state.replace(params=params, model_state=model_state), path

    # -- resuming -------------------------------------------------------------------------------

    def restore(self, state: TrainState, ckpt_path) -> TrainState:
        """``state`` continued from ``ckpt_path`` (see ``Trainer.fit``), read straight into the
        strategy's layout; the Trainer, its callbacks and loggers continue at the saved position."""
        t = self.trainer
        if str(ckpt_path) == "last":
            ckpt_path = self.last_folder([c for c in t.active_callbacks if isinstance(c, ModelCheckpoint)])
        path = Path(ckpt_path)
        try:
            with warnings.catch_warnings(record=True) as skipped:  # (said below, unless a config change explains them)
                warnings.simplefilter("always")
                shardings = t.strategy.state_shardings(state)  # (read straight into this layout)
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
            now = (t.config.run_config or {}).get("optimizer", "another one")
            raise runconfig.ConfigMismatchError(
                f"{path} was saved with optimizer {exc.saved_optimizer}, this run uses {now}: their optimizer "
                f"states hold different arrays, so --allow-config-change cannot accept this change (the saved state "
                f"has no place in the new one); resume with the checkpoint's optimizer, or start a new run") from None
        for w in skipped:
            warnings.warn(w.message, w.category, stacklevel=2)
        saved_accumulate = meta["config"].get("accumulate_grad_batches", 1)
        if saved_accumulate != t.config.accumulate_grad_batches:
            raise ckpt.CheckpointError(
                f"{path} was saved with accumulate_grad_batches {saved_accumulate}; this fit has "
                f"{t.config.accumulate_grad_batches}: its step count and data position count windows of "
                f"{saved_accumulate} batches")
        self._check_run(path, meta, state)
        parsed = _parse_meta(meta)
        t.global_step = int(state.step)
        t.epoch, t.batch = parsed["epoch"], parsed["batch"]
        t._epoch_steps = parsed["epoch_steps"]
        t._epoch_seconds = parsed["epoch_seconds"]
        t.callback_metrics = parsed["callback_metrics"]
        t.history = parsed["history"]
        t.skipped_steps = parsed["skipped_steps"]
        for cb in t.callbacks:
            saved = cb.find_state(parsed["callbacks"])
            if saved is not None:
                cb.load_state_dict(saved)
        for cb in t.callbacks:  # (several ModelCheckpoints: each one's own save at this step)
            if isinstance(cb, ModelCheckpoint):
                cb.catch_up(t.global_step, path)
        t.logging.resume(t.global_step)
        t.restored_from = path
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
        t = self.trainer
        config = t.config
        saved = {k: meta.get(k) for k in ("run", "trainer", "optimizer_chain")}
        diffs = runconfig.differences(saved, {**self.run_record(), "optimizer_chain": ckpt.optimizer_chain(state.opt_state)})
        saved_batch = meta["config"]["batch_size"]
        # The saved position counts batches of the saved size over the saved examples: it means
        # the same batches again only at an epoch's start, where it is (epoch, 0).
        moved = saved_batch != config.batch_size or meta["num_examples"] != t._num_examples
        what = (f"batch_size {saved_batch} on {meta['num_examples']} training examples; this fit has batch_size "
                f"{config.batch_size} on {t._num_examples}" + (f" ({'; '.join(diffs)})" if diffs else ""))
        if moved and not t.config.checkpoint.allow_config_change:
            raise runconfig.ConfigMismatchError(
                f"{path} was saved with {what}: the saved data position would not mean the same batches. Resume "
                f"with the same settings, or accept the change at an epoch's end (--allow-config-change)")
        if diffs and not t.config.checkpoint.allow_config_change:
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
        if meta["epoch"] > t.max_epochs or (meta["epoch"] == t.max_epochs and meta["batch"] > 0):
            raise runconfig.ConfigMismatchError(
                f"{path} is already at epoch {meta['epoch']} batch {meta['batch']} (step {meta['step']}), past "
                f"max_epochs={t.max_epochs} (--epochs): nothing to train; ask for more epochs to continue it")
        self.accepted_changes, self.segment_start = diffs, int(meta["step"])
        self.resumed_segments = meta.get("segments") or [{k: v for k, v in saved.items() if k != "optimizer_chain"}
                                                         | {"from_step": 0}]

"""Save checkpoints during training; keep the best k by a monitored metric and the latest."""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from pathlib import Path

from jaxlight.callbacks.base import Callback
from jaxlight.checkpoint import (CheckpointError, CheckpointWarning, CorruptCheckpointError, list_checkpoints,
                                 lock_folder, step_dir, verify_checkpoint)

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(Callback):
    """Checkpoint every ``every_n_epochs`` epochs and/or every ``every_n_steps`` steps, and at
    the end of ``fit`` if the last step was not saved yet. Saves are asynchronous (training goes
    on while one is written; the next save and the end of ``fit`` wait for it) and sharded:
    every process writes the shards its devices hold.

    Kept on disk: the ``save_top_k`` best checkpoints by ``monitor`` (when given) and the
    ``keep_last`` most recent ones (at least 2, so that a corrupt latest checkpoint always has a
    good predecessor to fall back to; see ``jaxlight.checkpoint``). The other checkpoints this
    run wrote are deleted once each new save's arrays are complete (by the Orbax
    ``CheckpointManager``'s preservation policy, told which steps the run owns); checkpoints it did not write are never
    touched. Each run carries a ``run_id`` (kept across resumes), so a checkpoint already at a
    step being saved is replaced only when it is this run's; an intact checkpoint of another
    run (or a ``step_*`` symlink) stops the save with a ``CheckpointWriteError`` naming it, and
    a corrupt one is moved aside to ``corrupt-step_...`` (with a warning), never deleted. The Trainer also saves through this callback on SIGTERM and SIGINT, and
    ``Trainer.fit(..., ckpt_path="last")`` resumes from its folder.

    Safe folders: while ``fit`` runs, the folder is locked (``jaxlight.checkpoint.lock_folder``;
    by process 0 alone in a multi-process run), so a second run on it is refused naming the
    holder. A fit that does not resume refuses a folder that already holds checkpoints (another
    run's, which its saves would mix with and overwrite) unless ``overwrite=True``; those old
    checkpoints are then deleted once this run has saved its first one.

    Args:
        dirpath: the folder of ``step_*`` checkpoints.
        monitor: a metric in ``trainer.callback_metrics`` ("val_loss", "val_accuracy", "loss").
        mode: "min" or "max" for ``monitor``.
        save_top_k: how many best checkpoints to keep (needs ``monitor``).
        keep_last: how many of the most recent checkpoints to keep (>= 2).
        every_n_epochs: save at the end of every n-th epoch (None: never at epoch ends).
        every_n_steps: save every n optimizer steps (the trainer ends its compiled chunks on
            these steps).
        overwrite: let a fit that does not resume start in a folder that holds checkpoints.

    Attributes:
        best_model_path: the best checkpoint's folder (None until one with a score exists).
        last_model_path: the latest checkpoint's folder.
    """

    def __init__(self, dirpath: str | Path, monitor: str | None = None, mode: str = "min",
                 save_top_k: int = 1, keep_last: int = 2, every_n_epochs: int | None = 1,
                 every_n_steps: int | None = None, overwrite: bool = False):
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint: mode must be 'min' or 'max', got {mode!r}")
        if keep_last < 2:
            raise ValueError(f"ModelCheckpoint: keep_last must be >= 2 (a corrupt latest checkpoint "
                             f"needs a predecessor), got {keep_last}")
        if save_top_k < 0:
            raise ValueError(f"ModelCheckpoint: save_top_k must be >= 0, got {save_top_k}")
        for name, n in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if n is not None and n < 1:
                raise ValueError(f"ModelCheckpoint: {name} must be >= 1 or None, got {n}")
        self.dirpath = Path(dirpath)
        self.monitor, self.mode, self.save_top_k, self.keep_last = monitor, mode, save_top_k, keep_last
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.overwrite = overwrite
        self.saved: list[int] = []          # steps of the checkpoints on disk, oldest first
        self.scores: dict[int, float] = {}  # step -> monitored value
        self._lock = None
        self._foreign: set[int] = set()     # checkpoints of another run that overwrite=True replaces
        self.run_id: str | None = None      # this run's, across resumes (in every checkpoint it writes)

    def on_fit_start(self, trainer, state):
        self._foreign = set()
        if trainer.restored_from is None or self.run_id is None:
            self.run_id = uuid.uuid4().hex
        if trainer.is_global_zero and self._lock is None:
            self._lock = lock_folder(self.dirpath)
        found = {_step(p) for p in list_checkpoints(self.dirpath)} - set(self.saved)
        if trainer.restored_from is None and found:
            if not self.overwrite:
                raise CheckpointError(
                    f"{self.dirpath} already holds checkpoints (step_{max(found):09d}...) and this fit does not "
                    f"resume: resume them (--resume, ckpt_path='last'), choose another folder, or replace them "
                    f"(--overwrite, ModelCheckpoint(overwrite=True))")
            self._foreign = found

    def release_lock(self) -> None:
        """Drop the folder lock taken in ``on_fit_start`` (the Trainer calls it when fit ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def step_interval(self) -> int | None:
        return self.every_n_steps

    def on_train_chunk_end(self, trainer, state, metrics):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not self._epoch_save_follows(trainer):
            self.save(trainer, state)

    def _epoch_save_follows(self, trainer) -> bool:
        """Whether this chunk ended an epoch whose end saves anyway (moments later, after
        validation, with the later position): the step is then saved once, not twice."""
        ends_epoch = trainer.num_batches is not None and trainer.batch >= trainer.num_batches
        return bool(ends_epoch and self.every_n_epochs and (trainer.epoch + 1) % self.every_n_epochs == 0)

    def on_epoch_end(self, trainer, state, metrics):
        if self.every_n_epochs and trainer.epoch % self.every_n_epochs == 0:
            self.save(trainer, state)

    def on_fit_end(self, trainer, state):
        # A fit that ended between scheduled saves (max_steps, early stopping mid-epoch) still
        # leaves its final state on disk, so that it can be continued or evaluated.
        if not self.saved or self.saved[-1] != trainer.global_step:
            self.save(trainer, state)

    def _best(self) -> list[int]:
        ranked = sorted(self.scores, key=lambda s: self.scores[s] if self.mode == "min" else -self.scores[s])
        return ranked[: self.save_top_k]

    def save(self, trainer, state) -> Path:
        """Start a save (asynchronous: see ``Trainer.save_checkpoint``) that prunes the run's own
        older checkpoints once complete; the bookkeeping is updated first so the checkpoint
        records itself."""
        step = trainer.global_step
        before = (list(self.saved), dict(self.scores))
        replace = step in set(self.saved) | self._foreign  # (a folder this run wrote, or --overwrite's)
        if not replace and trainer.is_global_zero:
            replace = self._may_replace(step_dir(self.dirpath, step))
        owned = set(self.saved) | {step} | self._foreign
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(value):
                self.scores[step] = float(value)
        self.saved = [s for s in self.saved if s != step] + [step]
        keep = set(self.saved[-self.keep_last:]) | set(self._best())
        self.saved = [s for s in self.saved if s in keep]
        self.scores = {s: v for s, v in self.scores.items() if s in keep}
        try:
            # (the other checkpoints this run owns are deleted once this one's arrays are complete)
            path = trainer.save_checkpoint(state, self.dirpath, replace=replace, keep_steps=keep, owned=owned,
                                           saved_by=self.state_key)
        except Exception:
            self.saved, self.scores = before
            raise
        self._foreign = set()
        return path

    def _may_replace(self, final: Path) -> bool:
        """Whether the save may replace ``final``, a folder its bookkeeping does not list: yes
        when it is this run's (the same ``run_id``: written after the checkpoint this fit resumed
        from) or when nothing is there; a corrupt one is moved aside first. No for an intact
        checkpoint of another run and for a symlink (``save_checkpoint`` then refuses)."""
        if final.is_symlink() or not final.exists():
            return not final.is_symlink()
        try:
            verify_checkpoint(final)
            meta = json.loads((final / "meta.json").read_text())
            return (self.find_state(meta["callbacks"]) or {}).get("run_id") == self.run_id
        except CorruptCheckpointError:
            n, aside = 0, final.with_name(f"corrupt-{final.name}")
            while aside.exists() or aside.is_symlink():
                n += 1
                aside = final.with_name(f"corrupt-{final.name}.{n}")
            os.rename(final, aside)
            warnings.warn(f"{final} is corrupt and stands where this run saves: moved aside to {aside.name} "
                          f"(not deleted)", CheckpointWarning, stacklevel=3)
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    @property
    def best_model_path(self) -> Path | None:
        best = self._best()
        return self.dirpath / f"step_{best[0]:09d}" if best else None

    @property
    def last_model_path(self) -> Path | None:
        found = list_checkpoints(self.dirpath)
        return found[-1] if found else None

    def identity(self) -> str:
        return str(self.dirpath)

    def find_state(self, states: dict) -> dict | None:
        """Its own state: by ``state_key``, else the ModelCheckpoint state saved for the same
        folder (a run resumed with more or fewer ModelCheckpoints than it was saved with)."""
        if self.state_key in states:
            return states[self.state_key]
        mine = [v for k, v in states.items() if k.split("[")[0] == "ModelCheckpoint" and isinstance(v, dict)
                and v.get("dirpath") is not None and os.path.realpath(v["dirpath"]) == os.path.realpath(self.dirpath)]
        return mine[0] if len(mine) == 1 else None

    def catch_up(self, step: int, restored: Path) -> None:
        """After a resume from ``restored`` (another folder's checkpoint at ``step``), take this
        callback's state from its own checkpoint at ``step`` when this run wrote one: two
        ModelCheckpoints saving at one step each record the other's state before its save."""
        own = step_dir(self.dirpath, step)
        if not own.is_dir() or os.path.realpath(own) == os.path.realpath(restored):
            return
        try:
            verify_checkpoint(own)
            state = self.find_state(json.loads((own / "meta.json").read_text())["callbacks"])
        except (CorruptCheckpointError, OSError, ValueError, KeyError, TypeError):
            return
        if isinstance(state, dict) and state.get("run_id") == self.run_id and self.run_id is not None:
            self.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"saved": self.saved, "scores": {str(k): v for k, v in self.scores.items()}, "run_id": self.run_id,
                "monitor": self.monitor, "mode": self.mode, "dirpath": str(self.dirpath)}

    def load_state_dict(self, state: dict) -> None:
        self.saved = list(state["saved"])
        self.scores = {int(k): v for k, v in state["scores"].items()}
        self.run_id = state.get("run_id")


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])

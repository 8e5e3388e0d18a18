"""A short training run that the resume tests kill with real signals and then resume.

softmax on the first 640 MNIST training images (10 batches of 64 per epoch), 3 epochs,
ModelCheckpoint every 3 steps and at every epoch end. Writes the final parameters to
``--out`` (npz) and the trainer's history next to it (json).

    python tests/trainer_jobs/resume_job.py --data DIR --ckpt DIR --out FILE
        [--resume] [--kill-at-step N] [--kill-at-epoch-end E] [--kill-during-save N]
        [--kill-while-saving N] [--sigterm-at-step N] [--steps-per-execution K]

``--kill-at-step`` and ``--kill-at-epoch-end`` kill once the checkpoint just started is
complete. ``--kill-during-save N``: SIGKILL once step N's arrays and meta.json are complete, before its
manifest. ``--kill-while-saving N``: SIGKILL from the training thread right after step N's
asynchronous save started, while it is still being written (its manifest is held back, so the
save cannot finish first); ``<out>.killed.json`` records what the folder held at that moment.
"""

import argparse
import json
import os
import signal
import threading
from pathlib import Path

import jax
import numpy as np

from jaxlight import build_model, checkpoint, create_train_state, optim, tasks
from jaxlight.callbacks import Callback, ModelCheckpoint
from jaxlight.data import ArrayDataset, load_mnist
from jaxlight.trainer import Trainer, TrainerConfig


class Killer(Callback):
    def __init__(self, args):
        self.args = args

    def _saved(self, trainer):
        """Wait until the save just started is complete: these kills come after a checkpoint."""
        saver = trainer.checkpoint_saver(self.args.ckpt)
        if saver is not None:
            saver.wait()

    def on_train_chunk_end(self, trainer, state, metrics):
        if self.args.kill_at_step and trainer.global_step >= self.args.kill_at_step:
            self._saved(trainer)
            os.kill(os.getpid(), signal.SIGKILL)
        n = self.args.kill_while_saving
        if n and trainer.global_step == n:  # (ModelCheckpoint, first in the list, has just started its save)
            saver = trainer.checkpoint_saver(self.args.ckpt)
            names = sorted(p.name for p in Path(self.args.ckpt).iterdir())
            with open(self.args.out + ".killed.json", "w") as f:
                json.dump({"saving": bool(saver and saver.is_saving), "step": trainer.global_step,
                           "names": names}, f)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.args.sigterm_at_step and trainer.global_step == self.args.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_epoch_end(self, trainer, state, metrics):
        if self.args.kill_at_epoch_end and trainer.epoch == self.args.kill_at_epoch_end:
            self._saved(trainer)
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    p = argparse.ArgumentParser()
    for flag in ("--data", "--ckpt", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--resume", action="store_true")
    for flag in ("--kill-at-step", "--kill-at-epoch-end", "--kill-during-save", "--kill-while-saving",
                 "--sigterm-at-step", "--steps-per-execution"):
        p.add_argument(flag, type=int)
    args = p.parse_args()

    if args.kill_during_save:
        write_manifest = checkpoint._write_manifest

        def dying_write_manifest(folder):
            # The arrays and meta.json are on disk (renamed into place), the manifest is not.
            if json.loads((folder / "meta.json").read_text())["step"] == args.kill_during_save:
                os.kill(os.getpid(), signal.SIGKILL)
            write_manifest(folder)

        checkpoint._write_manifest = dying_write_manifest
    if args.kill_while_saving:
        write_manifest = checkpoint._write_manifest

        def held_write_manifest(folder):
            # Step N's save stays unfinished until the training thread kills the process.
            if json.loads((folder / "meta.json").read_text())["step"] == args.kill_while_saving:
                threading.Event().wait()
            write_manifest(folder)

        checkpoint._write_manifest = held_write_manifest

    train, _ = load_mnist(args.data)
    data = ArrayDataset(train.images[:640], train.labels[:640])
    state = create_train_state(build_model("softmax", 0), optim.adam(1e-2), tasks.multiclass(), seed=0)
    trainer = Trainer(TrainerConfig(max_epochs=3, batch_size=64, steps_per_execution=args.steps_per_execution,
                                    logging={"enable_progress_bar": False}),
                      callbacks=[ModelCheckpoint(args.ckpt, every_n_steps=3, keep_last=2), Killer(args)])
    state = trainer.fit(state, data, ckpt_path="last" if args.resume else None)
    leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    np.savez(args.out, **leaves)
    with open(args.out + ".json", "w") as f:
        json.dump({"step": int(state.step), "interrupted": trainer.interrupted,
                   "restored_from": str(trainer.restored_from),
                   "history": [r.metrics for r in trainer.history]}, f)


if __name__ == "__main__":
    main()

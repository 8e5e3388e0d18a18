"""One process of a Trainer run that checkpoints every 3 steps, for the multi-process kill/resume
test in tests/test_checkpoint.py. Started by ``jaxlight.launch`` (several processes) or alone
(one process, ``XLA_FLAGS`` giving it 1 or 8 CPU devices).

The mlp on the first 256 MNIST training images, batch 32 (8 steps per epoch), 2 epochs, with the
``--strategy`` (default ``fsdp``: parameters and moments split over the devices) over every
process's devices; ``ModelCheckpoint(<ckpt>, every_n_steps=3)``.
``--resume``: continue from the newest complete checkpoint there. ``--kill-process P
--kill-at-step K``: process P sends itself SIGKILL after step K's chunk (its save of step K, when
there is one, has just started). Every process writes ``<out>/process-<i>.json`` (its position
and, for each checkpoint it saved, the files its own manifest lists); process 0 writes the
final parameters to ``<out>/params.npz``.

    python -m jaxlight.launch --nproc 2 --local-devices 4 -- tests/trainer_jobs/multiprocess_ckpt_job.py \\
        --data DIR --ckpt DIR --out DIR [--resume] [--kill-process P --kill-at-step K]
"""

import argparse
import json
import os
import signal
from pathlib import Path

from jaxlight import parallel

parser = argparse.ArgumentParser()
for flag in ("--data", "--ckpt", "--out"):
    parser.add_argument(flag, required=True)
parser.add_argument("--strategy", default="fsdp")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--kill-process", type=int, default=-1)
parser.add_argument("--kill-at-step", type=int, default=-1)
args = parser.parse_args()

if os.environ.get(parallel.ENV_NUM_PROCESSES):
    # (a process killed on purpose is noticed by the launcher, which stops the others after
    # its grace; a long heartbeat keeps a slow, loaded machine from failing a healthy run)
    parallel.initialize(heartbeat_timeout_seconds=60)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlight import build_model, create_train_state, optim, tasks  # noqa: E402
from jaxlight.callbacks import Callback, ModelCheckpoint  # noqa: E402
from jaxlight.data import ArrayDataset, load_mnist  # noqa: E402
from jaxlight.trainer import Trainer, TrainerConfig  # noqa: E402

pid = jax.process_index()
out, ckpt_dir = Path(args.out), Path(args.ckpt)
out.mkdir(parents=True, exist_ok=True)


class Killer(Callback):
    def on_train_chunk_end(self, trainer, state, metrics):
        if pid == args.kill_process and trainer.global_step == args.kill_at_step:
            print(f"worker {pid}: SIGKILL after step {trainer.global_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


train, _ = load_mnist(args.data, download=False)
data = ArrayDataset(train.images[:256], train.labels[:256].astype(np.int32))
state = create_train_state(build_model("mlp", 0), optim.adam(1e-3), tasks.multiclass(), 0)
checkpoints = ModelCheckpoint(ckpt_dir, every_n_steps=3, every_n_epochs=None, keep_last=3)
trainer = Trainer(TrainerConfig(max_epochs=2, batch_size=32, steps_per_execution=1,
                                parallel={"strategy": args.strategy}, logging={"enable_progress_bar": False}),
                  callbacks=[checkpoints, Killer()])
state = trainer.fit(state, data, ckpt_path="last" if args.resume else None)

own = "manifest.json" if pid == 0 else f"manifest.process_{pid}.json"
manifests = {p.name: sorted(json.loads((p / own).read_text())["files"]) for p in sorted(ckpt_dir.glob("step_*"))
             if (p / own).is_file()}
(out / f"process-{pid}.json").write_text(json.dumps({
    "processes": jax.process_count(), "devices": jax.device_count(), "step": int(state.step),
    "restored_from": str(trainer.restored_from), "saved": checkpoints.saved, "manifests": manifests}))
from jax.experimental import multihost_utils  # noqa: E402

params = [np.asarray(multihost_utils.process_allgather(leaf, tiled=True)) if parallel.is_multiprocess()
          else np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]
if pid == 0:
    np.savez(out / "params.npz", **{str(i): p for i, p in enumerate(params)})
parallel.barrier("job-done")  # (both leave together: JAX's shutdown barrier then waits for no one)

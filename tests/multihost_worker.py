"""One process of a multi-process run, for tests/test_multihost.py (started by jaxlight.launch).

Trains the mlp on the first ``--n`` MNIST training examples with the ``sharded`` (or ``pmap``,
``fsdp``) strategy over every process's devices. Process 0 writes the final parameters to
``<out>/params.npz`` and the epoch metrics to ``<out>/metrics.json``; every process writes
``<out>/process-<i>.json`` with the rows of each global batch it fed (its own shard).
``--die-process P --die-at-step K`` makes process P exit abruptly (code 3) after K steps.
``--trainer`` trains through ``jaxlight.Trainer`` instead of ``loop.train_epoch``, saving
checkpoints in ``<out>/ckpt`` and resuming from the newest one there (``--max-steps`` stops early;
``--sigterm-process P --sigterm-at-step K`` sends SIGTERM to process P alone after step K).
"""

import argparse
import json
import os
import time
from pathlib import Path

from jaxlight import parallel

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--data-dir", required=True)
parser.add_argument("--strategy", default="sharded")
parser.add_argument("--path", choices=["host", "fused"], default="host")
parser.add_argument("--n", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--die-process", type=int, default=-1)
parser.add_argument("--die-at-step", type=int, default=-1)
parser.add_argument("--heartbeat", type=int, default=5)
parser.add_argument("--trainer", action="store_true")
parser.add_argument("--max-steps", type=int)
parser.add_argument("--sigterm-process", type=int, default=-1)
parser.add_argument("--sigterm-at-step", type=int, default=-1)
args = parser.parse_args()

parallel.initialize(heartbeat_timeout_seconds=args.heartbeat)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlight import build_model, create_train_state, loop, optim, tasks  # noqa: E402
from jaxlight.data import ArrayDataset, load_mnist  # noqa: E402

pid = jax.process_index()
out = Path(args.out)
train, _ = load_mnist(args.data_dir, download=False)
strategy = parallel.make_strategy(args.strategy)
rows = strategy.process_rows(args.batch_size)
data = ArrayDataset(train.images[:args.n], train.labels[:args.n].astype(np.int32))

steps = [0]


def on_chunk(done, metrics):
    steps[0] = done
    if pid == args.die_process and done >= args.die_at_step:
        print(f"worker {pid}: dying on purpose after step {done}", flush=True)
        os._exit(3)


(out / f"process-{pid}.json").write_text(json.dumps({
    "process": pid, "processes": jax.process_count(), "local_devices": jax.local_device_count(),
    "devices": jax.device_count(), "rows": [rows.start, rows.stop]}))
state = create_train_state(build_model("mlp", 0), optim.adam(1e-3), tasks.multiclass(), 0)
t0 = time.time()
if args.path == "fused":
    data = strategy.prepare_data(data)  # the whole subset replicated on every device
history = []
if args.trainer:
    import signal

    from jaxlight.callbacks import Callback, ModelCheckpoint
    from jaxlight.trainer import Trainer, TrainerConfig

    if args.path == "host":
        ArrayDataset.fits_on_device = lambda self, *a, **k: False

    class SigtermOneProcess(Callback):
        def on_train_chunk_end(self, trainer, state, metrics):
            if pid == args.sigterm_process and trainer.global_step == args.sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)

    ckpt = ModelCheckpoint(out / "ckpt", every_n_epochs=None)
    trainer = Trainer(TrainerConfig(max_epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, steps_per_execution=1 if args.sigterm_process >= 0 else None,
                                    parallel={"strategy": args.strategy}, logging={"enable_progress_bar": False}),
                      callbacks=[ckpt, SigtermOneProcess()])
    resume = "last" if list((out / "ckpt").glob("step_*")) else None
    state = trainer.fit(state, data, ckpt_path=resume)
    history = [r.metrics for r in trainer.history]
    print(f"worker {pid}: trainer resumed from {trainer.restored_from}, saved {ckpt.saved}, "
          f"interrupted {trainer.interrupted}", flush=True)
else:
    for epoch in range(args.epochs):
        state, stacked = loop.train_epoch(state, data, args.batch_size, epoch,
                                          1 if args.die_at_step >= 0 else None, on_chunk, strategy)
        history.append(loop.summarize(stacked))
host = parallel.to_host_state(state)
if pid == 0:
    leaves = {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(host.params))}
    np.savez(out / "params.npz", **leaves)
    (out / "metrics.json").write_text(json.dumps({"history": history,
                                                  "step": int(host.step), "seconds": time.time() - t0}))
print(f"worker {pid}: done, step {int(host.step)}", flush=True)

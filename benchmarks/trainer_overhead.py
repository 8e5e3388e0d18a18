"""Trainer overhead: epoch time of ``Trainer.fit`` against a hand-written loop over the same
fused ``train_chunk`` calls, measured in one process, interleaved, medians.

Three loops over full MNIST (60k images, batch 64, K = the default steps per call):

- ``hand``:    ``idx = batch_indices(...); state, m = train_chunk(...); summarize(m)`` per epoch;
- ``bare``:    ``Trainer.fit`` with no callbacks, no loggers, no progress bar;
- ``full``:    ``Trainer.fit`` with a CSV logger (every step's loss), LearningRateMonitor and
               the progress bar (one line per epoch when not a TTY).

The three run interleaved, one epoch each in turn; a Trainer epoch is timed from
``on_fit_start`` to ``on_epoch_end`` (hooks, logging and the NaN check inside the measurement);
the first epoch of each is dropped (compilation). Checkpoint
writes are timed separately (``save_checkpoint`` of the same state), since they are I/O.

    PYTHONPATH=. python benchmarks/trainer_overhead.py --model mlp --epochs 6 [--out results.json]

The load average before and after is printed and, with ``--out``, written with every epoch time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from jaxlight import build_model, create_train_state, optim, tasks
from jaxlight.callbacks import Callback, LearningRateMonitor
from jaxlight.checkpoint import save_checkpoint
from jaxlight.data import ArrayDataset, batch_indices, load_mnist, num_batches
from jaxlight.loggers import CSVLogger
from jaxlight.loop import summarize
from jaxlight.step import default_steps_per_call, train_chunk
from jaxlight.trainer import Trainer, TrainerConfig


class EpochTimer(Callback):
    def __init__(self):
        self.times = []

    def on_fit_start(self, trainer, state):
        self._t = time.perf_counter()

    def on_epoch_end(self, trainer, state, metrics):
        now = time.perf_counter()
        self.times.append(now - self._t)
        self._t = now


def hand_loop(state, data, epochs, batch_size, k, first_epoch=0):
    times = []
    nb = num_batches(len(data), batch_size)
    for epoch in range(first_epoch, first_epoch + epochs):
        t0 = time.perf_counter()
        idx, mask = batch_indices(jax.random.fold_in(state.rng, epoch), len(data), batch_size, True)
        chunks = []
        for start in range(0, nb, k):
            state, m = train_chunk(state, data.data, idx, mask, min(k, nb - start), start)
            chunks.append(m)
        summarize(jax.tree.map(lambda *m: jax.numpy.concatenate(m), *chunks))  # synchronises
        times.append(time.perf_counter() - t0)
    return state, times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6, help="timed epochs per loop (after one to compile)")
    p.add_argument("--steps-per-execution", type=int)
    p.add_argument("--out", help="write the measurements and the load average to this JSON file")
    args = p.parse_args()
    load_before = os.getloadavg()

    train, _ = load_mnist(args.data_dir)
    data = ArrayDataset(train.images, train.labels).to_device()
    tx = optim.adam(1e-3)  # one object: the optimizer is static, a new one would recompile

    def fresh():
        return create_train_state(build_model(args.model, 0), tx, tasks.multiclass(), seed=0)

    nb = num_batches(len(data), args.batch_size)
    k = args.steps_per_execution or default_steps_per_call(fresh(), nb)
    # Interleaved epoch by epoch (hand, bare, full, hand, ...) so that load from other processes
    # hits all three alike: each Trainer.fit call continues its state for exactly one epoch
    # (fit resumes at epoch = step // steps_per_epoch) and is timed from on_fit_start to
    # on_epoch_end, i.e. the epoch with every hook, log call and check, without fit's one-off
    # setup (dataset check, device transfer).
    results = {"hand": [], "bare": [], "full": []}
    host = {"bare": [], "full": []}
    states = {name: fresh() for name in results}
    csv_logger = CSVLogger(tempfile.mkdtemp(prefix="jaxlight-bench-"))
    for epoch in range(args.epochs + 1):
        states["hand"], times = hand_loop(states["hand"], data, 1, args.batch_size, k, first_epoch=epoch)
        results["hand"] += times
        for name in ("bare", "full"):
            timer = EpochTimer()
            config = TrainerConfig(max_epochs=epoch + 1, batch_size=args.batch_size, steps_per_execution=k,
                                   enable_progress_bar=(name == "full"))
            extra = [LearningRateMonitor(1e-3)] if name == "full" else []
            loggers = [csv_logger] if name == "full" else []
            trainer = Trainer(config, callbacks=[*extra, timer], loggers=loggers)
            states[name] = trainer.fit(states[name], data)
            results[name] += timer.times
            # The epoch minus the time spent inside the compiled calls (and their sync): what
            # the Trainer adds on the host. Less exposed to other processes' load than a ratio.
            host[name].append(timer.times[-1] - trainer.history[-1].seconds)
    results = {name: times[1:] for name, times in results.items()}  # epoch 0 compiles
    same = [[x.tobytes() for x in map(np.asarray, jax.tree.leaves(st.params))] for st in states.values()]
    identical = all(s == same[0] for s in same)

    state = fresh()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for i in range(3):
            save_checkpoint(d, state.replace(step=state.step + i))
        ckpt_s = (time.perf_counter() - t0) / 3

    load_after = os.getloadavg()
    hand = statistics.median(results["hand"])
    print(f"load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, after "
          f"{tuple(round(v, 2) for v in load_after)}, {os.cpu_count()} cores")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), model {args.model}, "
          f"batch {args.batch_size}, {nb} steps/epoch, K = {k}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:5s} median epoch {med:.3f} s  (n={len(times)}, min {min(times):.3f}, max {max(times):.3f})"
              + ("" if name == "hand" else f"  overhead {100 * (med / hand - 1):+.2f}%, host work outside "
                 f"the compiled calls {1e3 * statistics.median(host[name][1:]):.1f} ms/epoch"))
    print(f"final parameters of the three loops bitwise identical: {identical}")
    print(f"checkpoint save (params + Adam state, manifest): {ckpt_s:.3f} s each")
    if args.out:
        record = {
            "command": " ".join(["python", *sys.argv]),
            "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})", "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "jax": jax.__version__,
            "load_before": load_before, "load_after": load_after,
            "model": args.model, "batch_size": args.batch_size, "steps_per_epoch": nb, "steps_per_call": k,
            "epoch_seconds": results, "host_seconds": {n: h[1:] for n, h in host.items()},
            "final_params_identical": identical, "checkpoint_save_seconds": ckpt_s,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Step time while an asynchronous checkpoint is written, against no save; the save's wall time.

A wide MLP (784 -> 8192 -> 8192 -> 1536 -> 10, ~86M float32 parameters) with Adam: parameters
plus the two moments are ~1 GB, saved by ``jaxlight.checkpoint.CheckpointSaver`` (Orbax's
``CheckpointManager``, asynchronous) while the same jitted train step keeps running.

Measured in one process, in this order:

- ``no_save``: ``--steps`` train steps, each timed to ``block_until_ready``;
- ``during_save``: a save started, then train steps timed the same way for as long as the
  save is pending (at least one); the save's ``blocking`` seconds (what ``save`` held the
  training thread: the on-device copy and Orbax's start) and ``total`` seconds (until its
  manifest is written) come from ``CheckpointSaver.last_save_seconds``;
- ``sync_save``: ``save_checkpoint`` (the same save, waited for) -- what a synchronous save
  would stall training by.

Repeated ``--repeats`` times; medians reported. Run it on a quiet machine:

    python -m benchmarks.checkpoint_async [--steps 8] [--repeats 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.hardware import describe, versions
from jaxlight import checkpoint, create_train_state, tasks
from jaxlight.step import train_step

OUT = Path(__file__).parent / "results" / "cpu-2core-intel-xeon" / "checkpoint-async"


class WideMLP(nnx.Module):
    def __init__(self, widths=(784, 8192, 8192, 1536, 10), *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def _nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree) if hasattr(a, "dtype"))


def _timed_step(state, batch):
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a temp folder)")
    args = p.parse_args(argv)

    info = describe()
    state = create_train_state(WideMLP(rngs=nnx.Rngs(0)), optax.adam(1e-4), tasks.multiclass(), seed=0)
    state = jax.device_put(state, jax.devices()[0])
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.integers(0, 256, (args.batch, 28, 28), dtype=np.uint8)),
             "y": jnp.asarray(rng.integers(0, 10, args.batch).astype(np.int32))}
    params = sum(a.size for a in jax.tree.leaves(state.params))
    state_bytes = _nbytes((state.params, state.opt_state))
    for _ in range(2):  # compile, warm up
        state, _ = _timed_step(state, batch)

    root = args.dir or Path(tempfile.mkdtemp(prefix="jaxlight-ckpt-bench-"))
    runs = []
    try:
        for r in range(args.repeats):
            no_save = []
            for _ in range(args.steps):
                state, dt = _timed_step(state, batch)
                no_save.append(dt)
            saver = checkpoint.CheckpointSaver(root / f"async-{r}")
            saver.save(state)
            during = []
            while saver.is_saving or not during:
                state, dt = _timed_step(state, batch)
                during.append(dt)
            saver.close()
            t0 = time.perf_counter()
            checkpoint.save_checkpoint(root / f"sync-{r}", state)
            sync = time.perf_counter() - t0
            runs.append({"load_after": list(os.getloadavg()), "no_save_step_s": no_save, "during_save_step_s": during,
                         "save_blocking_s": saver.last_save_seconds["blocking"],
                         "save_total_s": saver.last_save_seconds["total"], "sync_save_s": sync})
            shutil.rmtree(root / f"async-{r}", ignore_errors=True)
            shutil.rmtree(root / f"sync-{r}", ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    summary = {
        "no_save_step_s": med([med(r["no_save_step_s"]) for r in runs]),
        "during_save_step_s": med([med(r["during_save_step_s"]) for r in runs]),
        "save_blocking_s": med([r["save_blocking_s"] for r in runs]),
        "save_total_s": med([r["save_total_s"] for r in runs]),
        "sync_save_s": med([r["sync_save_s"] for r in runs]),
    }
    summary["during_over_no_save"] = summary["during_save_step_s"] / summary["no_save_step_s"]
    result = {
        "what": "train step time during an async checkpoint save vs none; the save's wall time",
        "model": "MLP 784-8192-8192-1536-10, Adam", "params": int(params), "state_bytes": int(state_bytes),
        "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
        "hardware": info, "load_average_at_end": list(os.getloadavg()), "versions": versions(),
        "summary": summary, "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"params": params, "state_GB": state_bytes / 1e9, **summary}, indent=1))
    return result


if __name__ == "__main__":
    main()

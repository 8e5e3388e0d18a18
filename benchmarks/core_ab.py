"""The fused epoch of two jaxlight versions in one process: the current checkout against an older
one copied as the package ``jaxlight_old`` (``PYTHONPATH`` must reach it).

    python -m benchmarks.core_ab --models mlp,cnn,lstm --data-dir ../shared/data

Times ``train_chunk`` over the same K batches (one compiled ``lax.scan``, as a fused epoch
runs it) for each model in both versions, alternating A B B A, and prints the median ms per
step, the ratio new/old and the load average: a check that a change to the core costs the
fused path nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

STEPS = {"mlp": 400, "cnn": 40, "lstm": 80}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn,lstm")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)

    import jax
    import jaxlight_old as old

    import jaxlight as new

    train, _ = new.load_mnist(args.data_dir, download=False)
    x, y = jax.device_put(train.images), jax.device_put(train.labels.astype("int32"))
    idx, mask = new.data.batch_indices(jax.random.key(0), len(y), 64, True)
    print(f"load at start {os.getloadavg()}")
    for model in args.models.split(","):
        k = STEPS[model]
        lr = {"mlp": 1e-2, "cnn": 1e-3, "lstm": 2e-3}[model]
        runs = {
            "old": (old.create_train_state(old.build_model(model), old.optim.adam(lr), old.tasks.multiclass()),
                    lambda s: old.step.train_chunk(s, x, y, idx, mask, k, 0)),
            "new": (new.create_train_state(new.build_model(model), new.optim.adam(lr), new.tasks.multiclass()),
                    lambda s: new.step.train_chunk(s, {"x": x, "y": y}, idx, mask, k, 0)),
        }
        states = {name: state for name, (state, _) in runs.items()}
        times = {name: [] for name in runs}
        for name, (_, chunk) in runs.items():  # compile and settle
            for _ in range(2):
                states[name], m = chunk(states[name])
                jax.block_until_ready(m)
        for rep in range(args.repeats):
            for name in (["old", "new"] if rep % 2 == 0 else ["new", "old"]):
                t0 = time.perf_counter()
                states[name], m = runs[name][1](states[name])
                jax.block_until_ready(m)
                times[name].append((time.perf_counter() - t0) / k * 1e3)
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"{model}: old {med['old']:.3f} ms/step, new {med['new']:.3f} ms/step, new/old {med['new'] / med['old']:.3f} "
              f"(min {min(times['old']):.3f} / {min(times['new']):.3f}); load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()

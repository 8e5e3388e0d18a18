"""A/B one model's training step, each version of it against the current code, in one process.

``python -m benchmarks.ab cnn [--steps 40] [--repeats 7] [--batch-size 64]`` builds the model
with the same weights in each of its versions, from the 2f4a885 baseline through the
intermediate stages (``benchmarks.baselines.STAGES``) to the library's current code, and times
``jaxlight.step.train_chunk`` over the same ``--steps`` batches (one compiled ``lax.scan``, as a
fused epoch runs it), alternating A B C C B A ... so that a drifting machine load hits all alike.
Prints the median and the minimum ms per step, the process CPU time per step, and the load
average before and after: on a shared machine the minimum and the CPU time are the steadier
guides, and only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

__all__ = ["main", "time_variants"]


def _state(model, lr):
    from jaxlight import create_train_state, make_optimizer, tasks

    return create_train_state(model, make_optimizer("adam", lr), tasks.multiclass(), 0)


def time_variants(builders: dict, batch_size: int, steps: int, repeats: int, lr: float, data) -> dict:
    """``{name: (wall seconds per step list, cpu seconds per step list)}`` for each builder."""
    import jax

    from jaxlight.data import batch_indices
    from jaxlight.step import train_chunk

    x, y = data
    idx, mask = batch_indices(jax.random.key(0), len(y), batch_size, True)
    states = {name: _state(build(), lr) for name, build in builders.items()}
    for name in states:  # compile, then settle
        for _ in range(2):
            states[name], m = train_chunk(states[name], {"x": x, "y": y}, idx, mask, steps, 0)
            jax.block_until_ready(m)
    out = {name: ([], []) for name in states}
    for rep in range(repeats):
        order = list(states) if rep % 2 == 0 else list(reversed(states))
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            states[name], m = train_chunk(states[name], {"x": x, "y": y}, idx, mask, steps, 0)
            jax.block_until_ready(m)
            out[name][0].append((time.perf_counter() - w0) / steps)
            out[name][1].append((time.process_time() - c0) / steps)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("mlp", "cnn", "lstm"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    import jax.numpy as jnp

    from benchmarks.baselines import STAGES, build_baseline
    from jaxlight.data import load_mnist
    from jaxlight.models import build_model
    from jaxlight.recipes import recipe_for

    train, _ = load_mnist(args.data_dir, download=False)
    data = (jnp.asarray(train.images), jnp.asarray(train.labels.astype("int32")))
    load0 = os.getloadavg()
    stages = STAGES.get(args.model, (("2f4a885", None),))
    builders = {label: (lambda i=i: build_baseline(args.model, stage=i)) for i, (label, _) in enumerate(stages)}
    res = time_variants({**builders, "current": lambda: build_model(args.model)},
                        args.batch_size, args.steps, args.repeats, recipe_for(args.model).lr, data)
    load1 = os.getloadavg()
    base = None
    for name, (wall, cpu) in res.items():
        med, low, c = statistics.median(wall) * 1e3, min(wall) * 1e3, statistics.median(cpu) * 1e3
        base = base or (med, low, c)
        print(f"{args.model} B={args.batch_size} {name:22s} median {med:7.2f} ms/step  min {low:7.2f}  "
              f"cpu {c:7.2f}  (x baseline: median {base[0] / med:.2f}, min {base[1] / low:.2f}, cpu {base[2] / c:.2f})")
    print(f"load average before {tuple(round(v, 2) for v in load0)}, after {tuple(round(v, 2) for v in load1)}, "
          f"{os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())

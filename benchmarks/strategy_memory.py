"""Memory per device and step time of a wide MLP under single, sharded and fsdp; one JSON.

The model is an MLP 784-4096-4096-10 (20.0 M float32 parameters, 80 MB; with Adam's two
moments 240 MB of parameters and optimizer state) trained with Adam on random MNIST-shaped
batches. For each strategy on N devices (``single`` on 1; ``sharded`` and ``fsdp`` on every
device, and on 1 too where there are more) it records:

- ``state_bytes_per_device``: bytes of parameters + optimizer state on each device, summed
  over the state's ``addressable_shards`` (what the strategy's layout keeps on each device);
- ``memory_analysis``: the compiled train step's own accounting per device (XLA's
  ``memory_analysis()``: argument, output, temporary and alias bytes), for one step on a
  batch of ``--batch-size``;
- ``peak_bytes_in_use``: the device's allocator peak after the timed steps, where the backend
  reports one (``device.memory_stats()``: GPUs and TPUs, not the CPU);
- ``step_s``: the median of ``--steps`` timed host-streamed steps after ``--warmup``
  synchronised ones (``block_until_ready``), unless ``--no-timing``.

On fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) the memory columns
are real (each fake device's buffers are its own) and the times are not (the 8 "devices" share
the machine's cores), so run the CPU with ``--no-timing``::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python benchmarks/strategy_memory.py --no-timing --out benchmarks/results/<hw>/strategies-fsdp

On one GPU (``benchmarks/gpu_all.sh`` runs it) every strategy runs on that one device, so the
memory per device is the single-device figure under all three: the 1/N saving of ``fsdp`` needs
N > 1 devices. What one GPU shows is the step time and that the three programs agree.

Writes ``<out>/strategy_memory.json``: ``{"environment": {...}, "model": {...}, "runs": [...]}``
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxlight

WIDTHS = (784, 4096, 4096, 10)


def wide_mlp(widths, seed: int):
    """``Linear -> ReLU -> ... -> Linear`` over ``widths`` (input ``(B, 28, 28)`` flattened)."""
    from flax import nnx

    from jaxlight.models.linear import dense

    class WideMLP(nnx.Module):
        def __init__(self, rngs):
            self.input_shape = (28, 28)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                setattr(self, f"fc{i}", dense(a, b, rngs))

        def __call__(self, x):
            x = x.reshape((x.shape[0], -1))  # (the task has scaled the uint8 images to [0, 1])
            last = len(widths) - 2
            for i in range(last):
                x = nnx.relu(getattr(self, f"fc{i}")(x))
            return getattr(self, f"fc{last}")(x)

    return WideMLP(nnx.Rngs(params=seed))


def state_bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def bytes_per_device(tree, devices) -> list[int]:
    import jax

    totals = {d: 0 for d in devices}
    for a in jax.tree.leaves(tree):
        for shard in a.addressable_shards:
            totals[shard.device] += shard.data.nbytes
    return [totals[d] for d in devices]


def run_one(name: str, devices: int, batch: dict, args) -> dict:
    widths = tuple(args.widths)
    import jax

    from jaxlight import create_train_state, optim, parallel, tasks

    strategy = parallel.make_strategy(name, devices if name != "single" else None)
    state = create_train_state(wide_mlp(widths, 0), optim.adam(1e-3), tasks.multiclass(), 0)
    state = strategy.prepare_state(state)
    per_device = bytes_per_device((state.params, state.opt_state), strategy.devices)
    analysis = strategy.lower_train_step(state, batch).compile().memory_analysis()
    memory = None
    if analysis is not None:
        memory = {key: int(getattr(analysis, f"{key}_size_in_bytes")) for key in
                  ("argument", "output", "temp", "alias", "generated_code")}
    step_s = None
    if not args.no_timing:
        for _ in range(args.warmup):
            state, metrics = strategy.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = strategy.train_step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
    stats = strategy.devices[0].memory_stats() or {}
    return {
        "strategy": name,
        "devices": strategy.num_devices,
        "layout": parallel.layout_of(state),
        "state_bytes_per_device": per_device,
        "memory_analysis": memory,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "step_s": step_s,
    }


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def table(result: dict) -> str:
    total = result["model"]["params_and_opt_state_bytes"]
    rows = ["| strategy | devices | params + Adam state per device, MB | of single | step arguments, MB | "
            "step temporaries, MB | step outputs, MB | device peak, MB | step, ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in result["runs"]:
        per = max(run["state_bytes_per_device"])
        m = run["memory_analysis"] or {}
        ms = "-" if run["step_s"] is None else f"{run['step_s'] * 1e3:.2f}"
        rows.append(f"| {run['strategy']} | {run['devices']} | {_mb(per)} | {per / total:.3f} | "
                    f"{_mb(m.get('argument'))} | {_mb(m.get('temp'))} | {_mb(m.get('output'))} | "
                    f"{_mb(run['peak_bytes_in_use'])} | {ms} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for strategy_memory.json")
    parser.add_argument("--strategies", nargs="+", default=["single", "sharded", "fsdp"])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS),
                        help="the MLP's layer widths, input 784 first (default: 784 4096 4096 10)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-timing", action="store_true",
                        help="memory only (fake CPU devices share the cores: their times mean nothing)")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from jaxlight import create_train_state, optim, tasks

    rng = np.random.default_rng(0)
    batch = {"x": rng.integers(0, 256, (args.batch_size, 28, 28), dtype=np.uint8),
             "y": rng.integers(0, 10, args.batch_size).astype(np.int32)}
    if len(args.widths) < 2 or args.widths[0] != 784:
        parser.error(f"--widths must start with the input width 784 and hold at least 2 widths, got {args.widths}")
    widths = tuple(args.widths)
    abstract = jax.eval_shape(lambda: create_train_state(wide_mlp(widths, 0), optim.adam(1e-3), tasks.multiclass(), 0))
    n = jax.device_count()
    result = {
        "environment": {
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "device_count": n,
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "timed": not args.no_timing,
        },
        "model": {
            "widths": list(widths),
            "optimizer": "adam",
            "batch_size": args.batch_size,
            "params_bytes": state_bytes(abstract.params),
            "params_and_opt_state_bytes": state_bytes((abstract.params, abstract.opt_state)),
        },
        "runs": [],
    }
    print(f"{n} x {result['environment']['device_kind']} ({result['environment']['backend']}), "
          f"MLP {'-'.join(map(str, widths))}: params + Adam state {_mb(result['model']['params_and_opt_state_bytes'])} MB",
          flush=True)
    for name in args.strategies:
        for count in ([1] if name == "single" else sorted({1, n})):
            if args.batch_size % count:
                print(f"skip {name} on {count} devices: batch {args.batch_size} does not divide")
                continue
            run = run_one(name, count, batch, args)
            result["runs"].append(run)
            memory = run["memory_analysis"] or {}
            step = "-" if run["step_s"] is None else f"{run['step_s'] * 1e3:.2f} ms"
            print(f"{name:8s} x{count}  per device {_mb(max(run['state_bytes_per_device']))} MB  "
                  f"step args {_mb(memory.get('argument'))} MB  temp {_mb(memory.get('temp'))} MB  "
                  f"step {step}", flush=True)
    print(table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "strategy_memory.json").write_text(json.dumps(result, indent=2))
    (out / "strategy_memory.md").write_text(table(result) + "\n")
    print(f"wrote {out / 'strategy_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

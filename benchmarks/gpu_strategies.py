"""Train mlp and cnn under the single, pmap, sharded and fsdp strategies; write one JSON of results.

On the GPU machine (one short run, a few minutes; the first epoch includes compilation):

    python benchmarks/gpu_strategies.py --out benchmarks/results/gpu-strategies

On a CPU, tiny (a 1024-example subset, a few seconds per run plus compilation):

    python benchmarks/gpu_strategies.py --tiny --out /tmp/strategies

Each run trains ``--epochs`` epochs (default 3) on MNIST; epoch 1 includes compilation, the
last epoch is the steady-state time (``steady_epoch_s``, and ``examples_per_s`` from it).
``compiles_after_first_epoch`` counts XLA compilations after epoch 1: anything but 0 means the
steady epoch timed a compiler, not training. Every
strategy runs on 1 device and, where more exist, on all of them. ``max_abs_param_diff`` is the
largest difference of the final parameters from the ``single`` run of the same model: the
strategies compute the same thing, so it should stay around 1e-5 or below.

Writes ``<out>/strategies.json``: ``{"environment": {...}, "runs": [...]}`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxlight


def device_counts(available: int) -> list[int]:
    return sorted({1, available})


def run_one(model: str, strategy_name: str, devices: int, train, test, epochs: int,
            batch_size: int) -> tuple[dict, list]:
    import jax
    import numpy as np

    from jaxlight import build_model, create_train_state, loop, optim, parallel, recipe_for, tasks

    recipe = recipe_for(model)
    strategy = parallel.make_strategy(strategy_name, devices if strategy_name != "single" else None)
    state = create_train_state(build_model(model, 0), optim.make_optimizer(recipe.optimizer, recipe.lr),
                               tasks.multiclass(), 0)
    compiles, epoch_ends = [], []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        t0 = time.perf_counter()
        state, history = loop.fit(state, train, epochs, batch_size, strategy=strategy,
                                  on_epoch=lambda r: epoch_ends.append(len(compiles)))
        total = time.perf_counter() - t0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    metrics = loop.evaluate(state, strategy.prepare_data(test), strategy=strategy)
    params = [np.asarray(p) for p in jax.tree.leaves(parallel.to_host_state(state).params)]
    steady = history[-1].seconds
    return {
        "model": model,
        "strategy": strategy_name,
        "devices": strategy.num_devices,
        "epochs": epochs,
        "batch_size": batch_size,
        "train_examples": len(train),
        "first_epoch_s": history[0].seconds,
        "steady_epoch_s": steady,
        "examples_per_s": len(train) / steady,
        "total_train_s": total,
        "compiles_after_first_epoch": epoch_ends[-1] - epoch_ends[0],
        "train_loss": history[-1].metrics["loss"],
        "train_accuracy": history[-1].metrics["accuracy"],
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
    }, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for strategies.json")
    parser.add_argument("--tiny", action="store_true", help="a 1024/500-example subset (CPU smoke run)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--strategies", nargs="+", default=["single", "pmap", "sharded", "fsdp"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", default=os.environ.get("JAXLIGHT_DATA"))
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from jaxlight.data import ArrayDataset, load_mnist

    train_split, test_split = load_mnist(args.data_dir)
    train = ArrayDataset(train_split.images, train_split.labels.astype(np.int32))
    test = ArrayDataset(test_split.images, test_split.labels.astype(np.int32))
    if args.tiny:
        train, test = train.take(1024), test.take(500)
    env = {
        "load_average_before": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "tiny": args.tiny,
    }
    print(f"{env['device_count']} x {env['device_kind']} ({env['backend']}), jax {env['jax']}", flush=True)
    runs = []
    for model in args.models:
        reference = None
        for name in args.strategies:
            for n in ([1] if name == "single" else device_counts(jax.device_count())):
                if args.batch_size % n:
                    print(f"skip {model} {name} on {n} devices: batch {args.batch_size} does not divide")
                    continue
                result, params = run_one(model, name, n, train, test, args.epochs, args.batch_size)
                if name == "single":
                    reference = params
                if reference is not None:
                    result["max_abs_param_diff"] = max(float(np.abs(a - b).max())
                                                       for a, b in zip(params, reference))
                runs.append(result)
                print(f"{model:4s} {name:8s} x{n}  first epoch {result['first_epoch_s']:7.2f} s  "
                      f"steady {result['steady_epoch_s']:7.3f} s  {result['examples_per_s']:10.0f} ex/s  "
                      f"test acc {result['test_accuracy']:.4f}  "
                      f"max|dp| {result.get('max_abs_param_diff', float('nan')):.2e}  "
                      f"recompiles {result['compiles_after_first_epoch']}", flush=True)
    env["load_average_after"] = os.getloadavg()
    print(f"load average before {tuple(round(v, 2) for v in env['load_average_before'])}, after "
          f"{tuple(round(v, 2) for v in env['load_average_after'])}, {env['cpu_count']} cores")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "strategies.json").write_text(json.dumps({"environment": env, "runs": runs}, indent=2))
    print(f"wrote {out / 'strategies.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

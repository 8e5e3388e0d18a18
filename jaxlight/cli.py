"""``jaxlight train`` and ``jaxlight compare``: thin on purpose; the work is in the library.

``torch-ref train`` (``torch_ref/cli.py``) takes the same flags from :func:`train_parser` and
prints and writes the same format (``jaxlight.report``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jaxlight.recipes import RECIPES, Recipe, recipe_for

__all__ = ["main", "train_parser", "recipe_from_args", "summary_payload"]


def train_parser(sub: argparse._SubParsersAction, framework: str) -> argparse.ArgumentParser:
    """The ``train`` flags both command lines share."""
    p = sub.add_parser("train", help=f"train a model with {framework} and write <out>/metrics.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(RECIPES), default="mlp")
    p.add_argument("--epochs", type=int, help="default: the model's recipe (jaxlight.recipes)")
    p.add_argument("--batch-size", type=int, help="default: the model's recipe")
    p.add_argument("--lr", type=float, help="default: the model's recipe")
    p.add_argument("--optimizer", choices=["adam", "sgd", "adamw"], help="default: the model's recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="a folder holding MNIST/raw/ (default: $JAXLIGHT_DATA, then the cache)")
    p.add_argument("--out", help="output folder (default: runs/<framework>-<model>)")
    return p


def parallel_flags(p: argparse.ArgumentParser) -> None:
    """``--strategy``, ``--devices``, ``--distributed`` (``jaxlight.parallel``); JAX only."""
    p.add_argument("--strategy", choices=["single", "pmap", "sharded"], default="single",
                   help="data parallelism: one device, jax.pmap, or jit over a device mesh")
    p.add_argument("--devices", type=int,
                   help="devices to split each batch over (default: 1 for single, all otherwise); "
                        "on the CPU this many fake devices are created")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run first (jax.distributed.initialize; see "
                        "python -m jaxlight.launch and docs/parallel.md)")


def _fake_cpu_devices(count: int | None) -> None:
    # Must run before JAX starts its backends; only the CPU platform reads this flag, so it is
    # harmless where the devices are GPUs or TPUs.
    flags = os.environ.get("XLA_FLAGS", "")
    if count and count > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    for flag in ("epochs", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise SystemExit(f"error: --lr must be > 0, got {args.lr}")
    return recipe_for(args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      optimizer=args.optimizer, seed=args.seed)


def summary_payload(framework: str, recipe: Recipe, results, test_metrics: dict, versions: dict,
                    extra: dict) -> dict:
    """The contents of ``metrics.json``; the same keys from both frameworks."""
    payload = {
        "framework": framework,
        "model": recipe.model,
        "task": recipe.task,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "optimizer": recipe.optimizer,
        "lr": recipe.lr,
        "seed": recipe.seed,
    }
    if "accuracy" in test_metrics:
        payload["test_accuracy"] = test_metrics["accuracy"]
    else:
        payload["test_mse"] = test_metrics["mse"]
    payload["test_loss"] = test_metrics["loss"]
    payload["epoch_seconds"] = [r.seconds for r in results]
    payload["history"] = [{"epoch": r.epoch + 1, **{k: v for k, v in r.metrics.items() if k != "count"}}
                          for r in results]
    payload.update(extra)
    payload["versions"] = versions
    return payload


def run_train(args: argparse.Namespace) -> dict:
    _fake_cpu_devices(getattr(args, "devices", None))
    import jax
    import numpy as np

    from jaxlight import parallel, report
    from jaxlight.data import load_task_data
    from jaxlight.loop import evaluate, fit
    from jaxlight.models import build_model
    from jaxlight.optim import make_optimizer
    from jaxlight.state import create_train_state
    from jaxlight.tasks import TASKS

    recipe = recipe_from_args(args)
    if getattr(args, "distributed", False):
        parallel.initialize()
    strategy = parallel.make_strategy(getattr(args, "strategy", "single"), getattr(args, "devices", None))
    lead = jax.process_index() == 0  # one process prints progress and writes metrics.json
    train, test, truth = load_task_data(recipe.dataset, args.data_dir, recipe.seed)
    tx = make_optimizer(recipe.optimizer, recipe.lr, **recipe.optimizer_kwargs())
    state = create_train_state(build_model(recipe.model, recipe.seed), tx, TASKS[recipe.task](), recipe.seed)
    print(f"jaxlight: {recipe.model} on {recipe.dataset}, {recipe.optimizer} lr {recipe.lr}, "
          f"batch {recipe.batch_size}, {recipe.epochs} epochs, {jax.default_backend()}, "
          f"{strategy.name} on {strategy.num_devices} device(s)"
          + (f", process {jax.process_index()} of {jax.process_count()}" if jax.process_count() > 1 else ""),
          flush=True)
    state, results = fit(
        state, train, recipe.epochs, recipe.batch_size,
        on_epoch=lambda r: print(report.epoch_line(r.epoch, recipe.epochs, r.metrics, r.seconds), flush=True),
        progress=report.progress_bar(recipe.epochs) if lead else None,
        strategy=strategy,
    )
    test_metrics = evaluate(state, strategy.prepare_data(test), strategy=strategy)
    extra = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
             "strategy": strategy.name, "devices": strategy.num_devices, "processes": jax.process_count()}
    if truth:
        layer = state.params["linear"]
        extra["weight_error"] = float(np.abs(np.asarray(layer["kernel"][...]) - truth["weight"]).max())
        extra["bias_error"] = float(np.abs(np.asarray(layer["bias"][...]) - truth["bias"]).max())
    summary = summary_payload("jaxlight", recipe, results, test_metrics,
                              report.library_versions("jax", "jaxlib", "flax", "optax", "numpy"), extra)
    print(report.final_line(summary))
    if not lead:
        return summary
    out = Path(args.out or f"runs/jaxlight-{recipe.model}")
    print(f"wrote {report.write_json(out / 'metrics.json', summary)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxlight", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    parallel_flags(train_parser(sub, "JAX"))
    from jaxlight.compare import compare_parser, run_compare

    compare_parser(sub)
    args = parser.parse_args(argv)
    from jaxlight.data import MNISTError
    from jaxlight.parallel import ParallelError
    from jaxlight.step import BatchError

    try:
        (run_compare if args.command == "compare" else run_train)(args)
    except (MNISTError, BatchError, ParallelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

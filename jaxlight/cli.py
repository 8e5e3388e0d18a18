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

__all__ = ["main", "train_parser", "recipe_from_args", "summary_payload", "add_trainer_flags", "trainer_from_args", "fit_with_trainer"]


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
                        "python -m jaxlight.launch and the README)")


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
    from jaxlight.loop import evaluate
    from jaxlight.models import build_model
    from jaxlight.optim import make_optimizer
    from jaxlight.state import create_train_state
    from jaxlight.tasks import TASKS

    recipe = recipe_from_args(args)
    if getattr(args, "distributed", False):
        parallel.initialize()
    # Built before minutes of data loading: it refuses impossible devices and batch sizes.
    trainer = trainer_from_args(args, recipe)
    strategy = trainer.strategy
    train, test, truth = load_task_data(recipe.dataset, args.data_dir, recipe.seed)
    tx = make_optimizer(recipe.optimizer, recipe.lr, **recipe.optimizer_kwargs())
    state = create_train_state(build_model(recipe.model, recipe.seed), tx, TASKS[recipe.task](), recipe.seed)
    print(f"jaxlight: {recipe.model} on {recipe.dataset}, {recipe.optimizer} lr {recipe.lr}, "
          f"batch {recipe.batch_size}, {recipe.epochs} epochs, {jax.default_backend()}, "
          f"{strategy.name} on {strategy.num_devices} device(s)"
          + (f", process {jax.process_index()} of {jax.process_count()}" if jax.process_count() > 1 else ""),
          flush=True)
    state, results = fit_with_trainer(args, recipe, trainer, state, train)
    if results is None:  # stopped by SIGTERM after saving a checkpoint
        return {}
    test_metrics = evaluate(state, strategy.prepare_data(test), strategy=strategy)
    extra = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    if strategy.name != "single":  # (a single-device metrics.json keeps torch-ref's keys)
        extra.update(strategy=strategy.name, devices=strategy.num_devices, processes=jax.process_count())
    if truth:
        layer = state.params["linear"]
        extra["weight_error"] = float(np.abs(np.asarray(layer["kernel"][...]) - truth["weight"]).max())
        extra["bias_error"] = float(np.abs(np.asarray(layer["bias"][...]) - truth["bias"]).max())
    summary = summary_payload("jaxlight", recipe, results, test_metrics,
                              report.library_versions("jax", "jaxlib", "flax", "optax", "numpy"), extra)
    print(report.final_line(summary))
    if not trainer.is_global_zero:  # one process writes metrics.json
        return summary
    out = Path(args.out or f"runs/jaxlight-{recipe.model}")
    print(f"wrote {report.write_json(out / 'metrics.json', summary)}")
    return summary


def add_trainer_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``jaxlight train`` flags that ``torch-ref train`` does not share (the Trainer's)."""
    g = p.add_argument_group("trainer (jaxlight only)")
    g.add_argument("--val-split", type=float, default=0.0,
                   help="hold out this fraction of the training set (seeded by --seed) and validate on it each epoch")
    g.add_argument("--ckpt-dir", help="save a checkpoint at every epoch end (and every --ckpt-every steps) here")
    g.add_argument("--ckpt-every", type=int, help="also checkpoint every N steps")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in --ckpt-dir up to --epochs in total")
    g.add_argument("--logger", choices=["none", "csv", "tensorboard"], default="none")
    g.add_argument("--log-dir", help="where the logger writes (default: <out>/logs)")
    g.add_argument("--steps-per-execution", type=int,
                   help="steps per compiled call (default: the whole epoch, 1 for convolutions on the CPU)")
    return p


def check_trainer_flags(args: argparse.Namespace) -> None:
    """Reject bad Trainer flags before any data is loaded."""
    if args.resume and not args.ckpt_dir:
        raise SystemExit("error: --resume needs --ckpt-dir (the folder to resume from)")
    if not 0.0 <= args.val_split < 1.0:
        raise SystemExit(f"error: --val-split must be in [0, 1), got {args.val_split}")
    for flag in ("ckpt_every", "steps_per_execution"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")


def trainer_from_args(args: argparse.Namespace, recipe: Recipe):
    """The Trainer ``jaxlight train`` runs: config, checkpointing, logger and the epoch lines."""
    from jaxlight import report
    from jaxlight.callbacks import Callback, ModelCheckpoint, ProgressBar
    from jaxlight.loggers import LOGGERS
    from jaxlight.trainer import Trainer, TrainerConfig

    check_trainer_flags(args)

    class EpochLines(Callback):  # the report's epoch line, the format torch-ref prints too
        def on_fit_start(self, trainer, state):
            if trainer.restored_from is not None:
                print(f"resumed from {trainer.restored_from} (epoch {trainer.epoch + 1}, batch "
                      f"{trainer.batch}, step {trainer.global_step})", flush=True)

        def on_epoch_end(self, trainer, state, metrics):
            if not trainer.is_global_zero:  # (one process of a multi-process run speaks)
                return
            r = trainer.history[-1]
            print(report.epoch_line(r.epoch, recipe.epochs, r.metrics, r.seconds), flush=True)

    callbacks = [EpochLines(), ProgressBar(print_epochs=False)]
    if args.ckpt_dir:
        monitor = "val_loss" if args.val_split else None
        callbacks.insert(0, ModelCheckpoint(args.ckpt_dir, monitor=monitor, every_n_steps=args.ckpt_every))
    loggers = []
    if args.logger != "none":
        out = Path(args.out or f"runs/jaxlight-{recipe.model}")
        loggers.append(LOGGERS[args.logger](args.log_dir or out / "logs"))
    config = TrainerConfig(max_epochs=recipe.epochs, batch_size=recipe.batch_size,
                           steps_per_execution=args.steps_per_execution,
                           strategy=getattr(args, "strategy", "single"), devices=getattr(args, "devices", None))
    return Trainer(config, callbacks=callbacks, loggers=loggers)


def fit_with_trainer(args: argparse.Namespace, recipe: Recipe, trainer, state, train):
    """Run ``jaxlight train``'s training through ``trainer`` (from :func:`trainer_from_args`);
    ``(state, epoch results)``, or ``(state, None)`` when SIGTERM stopped it (a checkpoint was
    saved if --ckpt-dir is set)."""
    val = None
    if args.val_split:
        train, val = train.split(args.val_split, recipe.seed)
    resume = args.resume and any(Path(args.ckpt_dir).glob("step_*"))
    if args.resume and not resume:
        print(f"no checkpoint in {args.ckpt_dir} yet: starting from scratch", flush=True)
    state = trainer.fit(state, train, val, ckpt_path="last" if resume else None)
    if trainer.interrupted:
        print(f"stopped by SIGTERM at step {trainer.global_step}"
              + (f"; resume with --resume --ckpt-dir {args.ckpt_dir}" if args.ckpt_dir else ""), flush=True)
        return state, None
    return state, trainer.history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxlight", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_trainer_flags(train_parser(sub, "JAX"))
    parallel_flags(sub.choices["train"])
    from jaxlight.compare import compare_parser, run_compare

    compare_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "train":
        check_trainer_flags(args)
    from jaxlight.checkpoint import CheckpointError
    from jaxlight.data import MNISTError
    from jaxlight.parallel import ParallelError
    from jaxlight.step import BatchError
    from jaxlight.trainer import NonFiniteLossError

    try:
        (run_compare if args.command == "compare" else run_train)(args)
    except (MNISTError, BatchError, ParallelError, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

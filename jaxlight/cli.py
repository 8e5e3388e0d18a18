"""``jaxlight train``, ``jaxlight compare`` and ``jaxlight port``: thin on purpose; the work is in the library.

``torch-ref train`` (``torch_ref/cli.py``) takes the same flags from :func:`train_parser` and
prints and writes the same format (``jaxlight.report``).

Exit codes (both command lines; docs/reliability.md says which failure gives which):

====  =====================================================================================
0     finished, metrics.json written
1     failed while running (a checkpoint or metrics.json could not be written: full disk...)
2     refused before training: a usage error (argparse's convention), a bad path or data
      folder, a checkpoint folder in use or holding another run, a resume whose
      configuration differs from the checkpoint's; ``port``: an op it cannot port
3     training diverged: the loss became NaN or Inf (the message names the step); ``port``:
      the port's parity report does not hold (``jaxlight.bridge.porting.cli``)
130   stopped by SIGINT (Ctrl-C): saved first when --ckpt-dir is set; a second Ctrl-C aborts
143   stopped by SIGTERM: likewise
====  =====================================================================================

Signals at any moment: :func:`main` installs its SIGINT/SIGTERM handlers before anything heavy
is imported (``jaxlight/__init__.py`` imports lazily), also where the parent left SIGINT
ignored (``nohup cmd &``). Outside ``Trainer.fit`` they print one line and end the process at
once with ``os._exit`` (nothing is half-written: every file a run writes is renamed into
place), so a signal during imports, data loading or compilation never unwinds through a
half-initialised library; inside ``fit`` the Trainer's handlers finish the chunk and save.

Every error is one line on stderr; the details (tracebacks, background threads' logs) go to
``<out>/train.log``, or to stderr with ``--verbose``.
"""

from __future__ import annotations

# Only what main() needs to install its signal handlers is imported here; the rest (argparse,
# logging, the recipes, then JAX) is imported where it is used, behind those handlers.
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jaxlight.commands import (  # noqa: F401  (re-exported: the command lines' shared pieces)
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_USAGE,
    MAX_SEED,
    Interrupted,
    UsageError,
    install_signal_handlers,
    log_details,
    prepare_output_dir,
    recipe_from_args,
    restore_signal_handlers,
    run_cli,
)

if TYPE_CHECKING:
    import argparse

    from jaxlight.recipes import Recipe

__all__ = ["EXIT_DIVERGED", "EXIT_FAILED", "EXIT_USAGE", "TRAIN_FLAGS", "UsageError", "main", "train_parser",
           "recipe_from_args", "summary_payload", "add_trainer_flags", "train_config", "fit_with_trainer",
           "prepare_output_dir", "prepare_outputs", "log_details", "run_config", "run_cli", "install_signal_handlers",
           "restore_signal_handlers", "warn_batch_size"]


def train_parser(sub: argparse._SubParsersAction, framework: str) -> argparse.ArgumentParser:
    """The ``train`` flags both command lines share."""
    import argparse

    from jaxlight.optim import OPTIMIZERS
    from jaxlight.recipes import RECIPES

    p = sub.add_parser("train", help=f"train a model with {framework} and write <out>/metrics.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(RECIPES), default="mlp")
    p.add_argument("--epochs", type=int, help="default: the model's recipe (jaxlight.recipes)")
    p.add_argument("--batch-size", type=int, help="default: the model's recipe")
    p.add_argument("--lr", type=float, help="default: the model's recipe")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="default: the model's recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="a folder holding MNIST/raw/ (default: $JAXLIGHT_DATA, then the cache)")
    p.add_argument("--out", help="output folder (default: runs/<framework>-<model>)")
    p.add_argument("--verbose", action="store_true",
                   help="print details (tracebacks, library logs) to stderr instead of <out>/train.log")
    return p


def parallel_flags(p: argparse.ArgumentParser) -> None:
    """``--strategy``, ``--devices``, ``--distributed`` (``jaxlight.parallel``); JAX only."""
    from jaxlight.parallel import STRATEGIES

    p.add_argument("--strategy", choices=STRATEGIES, default="single",
                   help="data parallelism: one device, jax.pmap, jit over a device mesh with the "
                        "state replicated (sharded), or with parameters and optimizer state split "
                        "over the devices too (fsdp)")
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


def run_config(recipe: Recipe, args: argparse.Namespace) -> dict:
    """What a checkpoint records about the run and a resume must match (``jaxlight.runconfig``):
    everything in the recipe but the epoch count (a resume may extend a run), plus the schedule
    and the validation split (which decides the training examples)."""
    import dataclasses

    config = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "epochs"}
    return {**config, "lr_schedule": "constant", "val_split": getattr(args, "val_split", 0.0)}


def summary_payload(framework: str, recipe: Recipe, results, test_metrics: dict, versions: dict,
                    extra: dict) -> dict:
    """The contents of ``metrics.json``; the same keys from both frameworks. ``segments`` (in
    ``extra``; default: this run alone) lists the configuration of each part of a resumed run."""
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
    import argparse

    payload.setdefault("segments", [{"run": run_config(recipe, argparse.Namespace()), "from_step": 0}])
    payload["versions"] = versions
    return payload


def _default_out(args: argparse.Namespace, framework: str) -> Path:
    return Path(args.out or f"runs/{framework}-{args.model}")


def prepare_outputs(args: argparse.Namespace, framework: str, lock: bool = True) -> Path:
    """Check and create the output folders; lock ``--out`` (``lock``: process 0 of a run) as a
    checkpoint folder is locked, so that two runs never write one ``metrics.json``."""
    out = prepare_output_dir(_default_out(args, framework), "--out")
    if lock:
        from jaxlight.checkpoint import lock_folder

        args.out_lock = lock_folder(out, "output folder --out")  # (released when run_cli returns)
    if (out / "metrics.json").is_dir():
        raise UsageError(f"--out {out}: {out / 'metrics.json'} is a folder, metrics.json cannot be written")
    if getattr(args, "ckpt_dir", None):
        prepare_output_dir(args.ckpt_dir, "--ckpt-dir")
    if getattr(args, "logger", "none") != "none":
        prepare_output_dir(args.log_dir or out / "logs", "--log-dir")
    return out


# ``jaxlight train``'s flags and the config keys they set: the command is ``jaxlight fit --config
# <model>`` with these keys (``--resume`` is fit's ``--ckpt_path last``); docs/config.md.
TRAIN_FLAGS = {
    "epochs": ("trainer.max_epochs",), "batch_size": ("trainer.batch_size",), "lr": ("optimizer.init_args.lr",),
    "optimizer": ("optimizer.class_path",), "seed": ("seed", "data.init_args.seed"),
    "data_dir": ("data.init_args.data_dir",), "val_split": ("data.init_args.val_split",), "out": ("trainer.out",),
    "ckpt_dir": ("trainer.checkpoint.dirpath",), "ckpt_every": ("trainer.checkpoint.every_n_steps",),
    "overwrite": ("trainer.checkpoint.overwrite",), "allow_config_change": ("trainer.checkpoint.allow_config_change",),
    "logger": ("trainer.logging.logger",), "log_dir": ("trainer.logging.log_dir",),
    "steps_per_execution": ("trainer.steps_per_execution",), "strategy": ("trainer.parallel.strategy",),
    "devices": ("trainer.parallel.devices",),
}


def train_config(args: argparse.Namespace, recipe: Recipe) -> dict:
    """The config ``jaxlight train`` runs: the model's built-in config (``jaxlight fit --config
    <model>``) with the recipe the flags ask for and every flag set on its key (:data:`TRAIN_FLAGS`).

    Raises:
        UsageError: ``--resume`` or ``--overwrite`` without ``--ckpt-dir``, or both together.
    """
    import copy

    from jaxlight.config import _load_yaml

    if args.resume and not args.ckpt_dir:
        raise UsageError("--resume needs --ckpt-dir (the folder to resume from: trainer.checkpoint.dirpath)")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run or replace it")
    config = copy.deepcopy(_load_yaml(args.model))
    values = {**vars(args), "epochs": recipe.epochs, "batch_size": recipe.batch_size, "lr": recipe.lr,
              "seed": recipe.seed, "optimizer": f"jaxlight.optim.{recipe.optimizer}",
              "out": str(_default_out(args, "jaxlight"))}
    config["optimizer"] = {"init_args": recipe.optimizer_kwargs()}  # (the recipe's optimizer, whole)
    for flag, keys in TRAIN_FLAGS.items():
        if flag not in values:  # (torch-ref's namespace has no trainer flags)
            continue
        for key in keys:
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = values[flag]
    return config


def _flag_of(key: str) -> str | None:
    return next((f"--{flag.replace('_', '-')}" for flag, keys in TRAIN_FLAGS.items() if key in keys), None)


def run_train(args: argparse.Namespace) -> dict:
    _fake_cpu_devices(getattr(args, "devices", None))
    import dataclasses

    import jax
    import numpy as np

    from jaxlight import config as config_mod
    from jaxlight import parallel, report
    from jaxlight.config import ConfigError
    from jaxlight.configcli import build_trainer
    from jaxlight.data import load_task_data
    from jaxlight.loop import evaluate
    from jaxlight.state import create_train_state

    recipe = recipe_from_args(args)
    if getattr(args, "distributed", False):
        parallel.initialize()
    try:
        plain = config_mod.parse("fit", [], train_config(args, recipe))[2]
        run = config_mod.build_run(plain, load_data=False)
    except ConfigError as exc:  # (the flag that set the key, where one did)
        flag = _flag_of(exc.key or "")
        raise UsageError(f"{flag} ({exc})" if flag else str(exc)) from None
    out = prepare_outputs(args, "jaxlight", lock=jax.process_index() == 0)
    args.log_file = log_details(out, args.verbose)
    if args.ckpt_dir and jax.process_index() == 0:  # (one lock per run: process 0's)
        _claim_checkpoint_folder(args)
    # Built before minutes of data loading: it refuses impossible devices and batch sizes.
    config = dataclasses.replace(run.trainer_config, run_config=run_config(recipe, args), hparams=plain)
    trainer = build_trainer(config, [*_epoch_lines(recipe), *run.callbacks], out=out,
                            monitor="val_loss" if args.val_split else None)
    strategy = trainer.strategy
    try:
        train, val, test = config_mod.build_data(plain)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    truth = load_task_data(recipe.dataset, args.data_dir, recipe.seed)[2] if recipe.task == "regression" else None
    state = create_train_state(run.model, run.tx, run.loss_fn, run.seed)
    print(f"jaxlight: {recipe.model} on {recipe.dataset}, {recipe.optimizer} lr {recipe.lr}, "
          f"batch {recipe.batch_size}, {recipe.epochs} epochs, {jax.default_backend()}, "
          f"{strategy.name} on {strategy.num_devices} device(s)"
          + (f", process {jax.process_index()} of {jax.process_count()}" if jax.process_count() > 1 else ""),
          flush=True)
    state, results = fit_with_trainer(args, recipe, trainer, state, train, val)
    if results is None:  # stopped by SIGTERM/SIGINT (after saving a checkpoint if it could)
        raise Interrupted(trainer.stop_signal)
    test_metrics = evaluate(state, strategy.prepare_data(test), strategy=strategy)
    extra = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    extra["segments"] = trainer.run_segments()
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
    print(f"wrote {report.write_json(out / 'metrics.json', summary)}")
    return summary


def _claim_checkpoint_folder(args: argparse.Namespace) -> None:
    """Lock --ckpt-dir for this process and refuse another run's checkpoints there, before any
    data loads. The lock is held until run_cli returns (the Trainer takes it again, re-entrantly)."""
    from jaxlight import checkpoint

    args.ckpt_lock = checkpoint.lock_folder(args.ckpt_dir)
    found = checkpoint.list_checkpoints(args.ckpt_dir)
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"--ckpt-dir {args.ckpt_dir} already holds checkpoints ({found[-1].name}...): add "
                         f"--resume to continue that run, --overwrite to replace it, or choose another folder")


def add_trainer_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``jaxlight train`` flags that ``torch-ref train`` does not share (the Trainer's; each
    sets a config key: :data:`TRAIN_FLAGS`)."""
    from jaxlight.loggers import LOGGERS

    g = p.add_argument_group("trainer (jaxlight only)")
    g.add_argument("--val-split", type=float, default=0.0,
                   help="hold out this fraction of the training set (seeded by --seed) and validate on it each epoch")
    g.add_argument("--ckpt-dir", help="save a checkpoint at every epoch end (and every --ckpt-every steps) here")
    g.add_argument("--ckpt-every", type=int, help="also checkpoint every N steps")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in --ckpt-dir up to --epochs in total")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --ckpt-dir that holds checkpoints; they are deleted once this "
                        "run has saved its first one")
    g.add_argument("--allow-config-change", action="store_true",
                   help="resume although the checkpoint was written with other settings: lr, seed, the "
                        "optimizer's hyperparameters, adam<->adamw; --batch-size and --val-split only from an "
                        "epoch-end checkpoint (inside an epoch the saved position would mean other batches); never "
                        "an optimizer whose state holds other arrays (adam->sgd). Recorded in metrics.json's segments")
    g.add_argument("--logger", choices=["none", *LOGGERS], default="none")
    g.add_argument("--log-dir", help="where the logger writes (default: <out>/logs)")
    g.add_argument("--steps-per-execution", type=int,
                   help="steps per compiled call (default: the whole epoch, 1 for convolutions on the CPU)")
    return p


def _epoch_lines(recipe: Recipe):
    """The report's epoch line (the format torch-ref prints too), and a resume's first line."""
    from jaxlight import report
    from jaxlight.callbacks import Callback, ProgressBar

    class EpochLines(Callback):
        def on_fit_start(self, trainer, state):
            if trainer.restored_from is not None:
                where = (f"after epoch {trainer.epoch}" if trainer.batch == 0 else
                         f"epoch {trainer.epoch + 1}, batch {trainer.batch}")
                done = "; all epochs are done, nothing to train" if trainer.epoch >= recipe.epochs else ""
                print(f"resumed from {trainer.restored_from} ({where}, step {trainer.global_step}){done}",
                      flush=True)

        def on_epoch_end(self, trainer, state, metrics):
            if not trainer.is_global_zero:  # (one process of a multi-process run speaks)
                return
            r = trainer.history[-1]
            print(report.epoch_line(r.epoch, recipe.epochs, r.metrics, r.seconds), flush=True)

    return EpochLines(), ProgressBar(print_epochs=False)


def fit_with_trainer(args: argparse.Namespace, recipe: Recipe, trainer, state, train, val=None):
    """Run ``jaxlight train``'s training through ``trainer`` (from ``jaxlight.configcli.build_trainer``);
    ``(state, epoch results)``, or ``(state, None)`` when SIGTERM or SIGINT stopped it (a
    checkpoint was saved if --ckpt-dir is set)."""
    if args.val_split and (not len(val) or not len(train)):
        raise UsageError(f"--val-split {args.val_split} of {len(train) + len(val)} examples leaves "
                         f"{len(train)} for training and {len(val)} for validation: the dataset would be empty")
    warn_batch_size(recipe.batch_size, len(train))
    resume = args.resume and any(Path(args.ckpt_dir).glob("step_*"))
    if args.resume and not resume:
        print(f"no checkpoint in {args.ckpt_dir} yet: starting from scratch", flush=True)
    state = trainer.fit(state, train, val, ckpt_path="last" if resume else None)
    if trainer.interrupted:
        from jaxlight.commands import stopped_line

        print(stopped_line(trainer, f"Resume with the same command and --resume --ckpt-dir {args.ckpt_dir}",
                           "no --ckpt-dir"), file=sys.stderr, flush=True)
        return state, None
    return state, trainer.history


def warn_batch_size(batch_size: int, examples: int) -> None:
    """A batch larger than the training set is legal (one padded batch per epoch) but rarely meant."""
    if batch_size > examples:
        print(f"warning: --batch-size {batch_size} is larger than the training set ({examples} examples): "
              f"every epoch is one padded batch", file=sys.stderr, flush=True)


CONFIG_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    previous = install_signal_handlers("jaxlight")
    try:
        return _main(argv)
    finally:
        restore_signal_handlers(previous)


def _main(argv: list[str] | None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in CONFIG_COMMANDS:  # a run from a config file (jaxlight.configcli)
        from jaxlight.configcli import main as config_main

        return config_main(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="jaxlight", description=__doc__.splitlines()[0],
                                     epilog="also: jaxlight fit|validate|test|predict --config run.yaml "
                                            "(a model from a config file; jaxlight fit --help, docs/config.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_trainer_flags(train_parser(sub, "JAX"))
    parallel_flags(sub.choices["train"])
    from jaxlight.bridge.compare import compare_parser, run_compare

    compare_parser(sub)
    from jaxlight.bridge.porting.cli import ParityFailed, port_parser, run_port

    port_parser(sub)
    args = parser.parse_args(argv)  # (exits 2 on a malformed flag)
    from jaxlight.checkpoint import CheckpointError, CheckpointWriteError
    from jaxlight.config import ConfigError
    from jaxlight.data import MNISTError
    from jaxlight.parallel import ParallelError
    from jaxlight.step import BatchError
    from jaxlight.trainer import NonFiniteLossError

    def run(args):
        if args.command == "train":
            return run_train(args)
        if args.command == "port":
            return run_port(args)
        return run_compare(args)

    return run_cli("jaxlight", run, args, {
        NonFiniteLossError: EXIT_DIVERGED,
        FloatingPointError: EXIT_DIVERGED,  # (compare: either framework's run diverged)
        ParityFailed: EXIT_DIVERGED,  # (port: the port does not compute what the torch module does)
        CheckpointWriteError: EXIT_FAILED,
        OSError: EXIT_FAILED,  # (metrics.json or a log could not be written)
        UsageError: EXIT_USAGE, ConfigError: EXIT_USAGE, MNISTError: EXIT_USAGE, BatchError: EXIT_USAGE, ParallelError: EXIT_USAGE,
        CheckpointError: EXIT_USAGE,  # (refused before training: locked, another run's, corrupt, mismatched)
        **_port_errors(args),
    })


def _port_errors(args) -> dict:
    """``jaxlight port`` and ``compare --ported``: an op it cannot port is a usage error (exit 2),
    raised before any output."""
    if getattr(args, "command", None) != "port" and not getattr(args, "ported", None):
        return {}
    from jaxlight.bridge.porting import PortError

    return {PortError: EXIT_USAGE}


if __name__ == "__main__":
    sys.exit(main())

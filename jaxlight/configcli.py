"""``jaxlight fit | validate | test | predict --config run.yaml``: a run from a config file.

The config's parts, parsing and checks are in :mod:`jaxlight.config`; this module runs them:

- ``fit`` trains (``--ckpt_path last|PATH`` resumes), tests on the data's test set when there
  is one, and writes ``<out>/config.yaml`` (the resolved config) and ``<out>/metrics.json``;
- ``validate`` / ``test`` evaluate the data's validation / test set and write
  ``<out>/<command>_metrics.json``; ``predict`` writes the model's outputs on the test set (the
  validation set when there is none) to ``<out>/predictions.npz``. With ``--ckpt_path
  best|last|PATH`` they evaluate that checkpoint (best/last: in ``trainer.checkpoint.dirpath``), else
  the freshly built model.

Exit codes are ``jaxlight train``'s (``jaxlight.cli``): 0 done, 1 failed while running, 2 a
config refused before anything was written (one line naming the key), 3 diverged.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["COMMANDS", "build_trainer", "main", "resume_fields", "run_command"]

COMMANDS = ("fit", "validate", "test", "predict")


def _epoch_lines(max_epochs: int):
    """A callback printing ``epoch 2/5  loss 0.3120  accuracy 0.91  val_loss 0.35  1.20 s``."""
    from jaxlight.callbacks import Callback

    class EpochLines(Callback):
        def on_epoch_end(self, trainer, state, metrics):
            if not trainer.is_global_zero:
                return
            r = trainer.history[-1]
            extra = "  ".join(f"{k} {v:.4f}" for k, v in r.metrics.items()
                              if k not in ("loss", "count") and isinstance(v, float))
            print(f"epoch {r.epoch + 1}/{max_epochs}  loss {r.metrics['loss']:.4f}  {extra}  {r.seconds:.2f} s",
                  flush=True)

    return EpochLines()


def _out_dir(run) -> Path:
    out = run.trainer_config.out
    return Path(out) if out else Path("runs") / type(run.model).__name__.lower()


def build_trainer(config, callbacks=(), *, out: Path, monitor: str | None = None, lr_monitor: bool = False):
    """The one builder from a :class:`~jaxlight.trainer_config.TrainerConfig` to a Trainer (what
    ``jaxlight train`` and ``jaxlight fit`` run): ``callbacks`` plus what the config's sections
    ask for: a :class:`~jaxlight.callbacks.ModelCheckpoint` in ``checkpoint.dirpath`` and the
    ``logging.logger`` (writing to ``logging.log_dir``, default ``out/logs``).

    Args:
        out: the run's output folder.
        monitor: the checkpoint's monitored metric when ``checkpoint.monitor`` is None.
        lr_monitor: with a logger, also log the learning rate (a
            :class:`~jaxlight.callbacks.LearningRateMonitor`, unless one is given).

    Raises:
        ConfigError: ``trainer.logging.logger`` names a logger whose package is missing.
    """
    from jaxlight.callbacks import LearningRateMonitor, ModelCheckpoint
    from jaxlight.config import ConfigError
    from jaxlight.loggers import LOGGERS
    from jaxlight.trainer import Trainer

    ck, log = config.checkpoint, config.logging
    callbacks = list(callbacks)
    if ck.dirpath:
        callbacks.insert(0, ModelCheckpoint(ck.dirpath, monitor=ck.monitor or monitor, mode=ck.mode,
                                            every_n_steps=ck.every_n_steps, overwrite=ck.overwrite))
    loggers = []
    if log.logger not in (None, "none"):
        try:
            loggers.append(LOGGERS[log.logger](log.log_dir or Path(out) / "logs"))
        except ImportError as exc:
            raise ConfigError(f"trainer.logging.logger: {exc}", key="trainer.logging.logger") from None
        # (the rate is read from the optimizer itself: an argument named learning_rate may not be it)
        if lr_monitor and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor())
    return Trainer(config, callbacks=callbacks, loggers=loggers)


def _fit_trainer(run, command: str):
    """``build_trainer`` for a config command: the epoch lines and progress bar when fitting,
    the run's resolved config recorded (``hparams``) and compared on resume (``run_config``)."""
    import dataclasses

    from jaxlight.callbacks import ProgressBar
    from jaxlight.config import ConfigError

    callbacks = [*run.callbacks]
    if command == "fit":
        callbacks += [_epoch_lines(run.trainer_config.max_epochs), ProgressBar(print_epochs=False)]
    config = dataclasses.replace(run.trainer_config, hparams=run.config, run_config=resume_fields(run.config))
    try:
        return build_trainer(config, callbacks, out=_out_dir(run), monitor="val_loss" if run.val is not None else "loss",
                             lr_monitor=command == "fit")
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"trainer: {exc}") from None


def resume_fields(config: dict) -> dict:
    """The config as dotted keys (``model.init_args.width``) that a resume must match
    (``jaxlight.runconfig``): everything but the trainer section, whose fields that change the
    numbers are compared by the Trainer itself (``jaxlight.trainer_config.compared_fields``)."""
    def flat(tree, prefix=""):
        if isinstance(tree, dict) and tree:
            out = {}
            for k, v in tree.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
            return out
        return {prefix: tree}

    return {k: v for k, v in flat(config).items() if not k.startswith("trainer.")}


def _flag(argv: list[str], name: str) -> str | None:
    """The value of the last ``name VALUE`` / ``name=VALUE`` in ``argv``."""
    found = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def _ckpt_dir(argv: list[str]) -> str | None:
    """``trainer.checkpoint.dirpath`` as the config files and flags give it (the last wins)."""
    from jaxlight.config import _flag_value, _load_yaml

    found, i = None, 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in ("--config", "--trainer.checkpoint.dirpath"):
            value, i = _flag_value(argv, i)
            if name == "--trainer.checkpoint.dirpath":
                found = value
            elif value is not None:
                section = (_load_yaml(value).get("trainer") or {}).get("checkpoint")
                found = section.get("dirpath", found) if isinstance(section, dict) else found
            continue
        i += 1
    return found


# Trainer settings a checkpoint's record does not get to choose: where this command writes.
_NOT_FROM_A_RECORD = {"out": None, "logging": ("log_dir", "logger"), "checkpoint": ("dirpath",)}


def checkpoint_code(command: str, argv: list[str]):
    """``(code policy, base config)`` of a command: where its class paths may come from.

    - ``validate|test|predict --ckpt_path PATH`` with no ``--config`` and no ``--model``: the
      run's config is the checkpoint's record (``meta.json``'s ``hparams``), overridden by the
      flags. Its class paths are a checkpoint's: imported from the installed environment only
      and each checked for the kind its place expects before any call
      (``jaxlight.config.recorded_kind``), unless ``--trust_code``. The record does not choose
      where the command writes (``trainer.out``, ``trainer.logging.log_dir`` and ``logger``,
      ``trainer.checkpoint.dirpath``).
    - With a config of yours, its class paths are yours; ``--trust_code`` also imports code
      saved with the checkpoint (searched first: a generated model module).
    """
    from jaxlight.checkpoint import recorded_hparams, resolve_checkpoint
    from jaxlight.config import PARTS, CodePolicy, ConfigError, nest_moved_keys
    from jaxlight.trust import code_folders

    ckpt = _flag(argv, "--ckpt_path")
    trust = command != "fit" and "--trust_code" in argv
    named = any(a.split("=", 1)[0] in ("--config", "--model", "--model.class_path") for a in argv)
    if command == "fit" or ckpt is None or (ckpt in ("best", "last") and not trust) or (named and not trust):
        return CodePolicy(), None  # (your own code: nothing to resolve early)
    if ckpt in ("best", "last"):
        where = _ckpt_dir(argv)
        if where is None:
            return CodePolicy(trust_code=trust), None  # (the command refuses best/last without ckpt_dir)
        step = resolve_checkpoint(where, ckpt)
    else:
        step = resolve_checkpoint(ckpt, "last")
    policy = CodePolicy(code_folders(step), trust_code=trust, recorded=not named)
    if named:
        return policy, None
    record = recorded_hparams(step)
    missing = [part for part in ("model", "data", "optimizer") if not isinstance(record.get(part), dict)]
    if missing:
        raise ConfigError(f"--ckpt_path {ckpt}: {step} records no {missing[0]} config (a run trained from Python "
                          f"records its model only): give the run with --config")
    base = {k: record[k] for k in PARTS if k in record}
    trainer = base.get("trainer") or {}
    if not isinstance(trainer, dict):
        raise ConfigError(f"--ckpt_path {ckpt}: {step} records trainer as a {type(trainer).__name__}, not a mapping")
    trainer = nest_moved_keys(trainer)  # (a record written before the trainer sections)
    for key, names in _NOT_FROM_A_RECORD.items():
        if names is None:
            trainer.pop(key, None)
        elif isinstance(trainer.get(key), dict):
            trainer[key] = {k: v for k, v in trainer[key].items() if k not in names}
    base["trainer"] = trainer
    if "--print_config" not in argv:
        print(f"jaxlight {command}: the run's config recorded in {step / 'meta.json'}", flush=True)
    return policy, base


def run_command(command: str, argv: list[str], args=None) -> dict | None:
    """Parse, build and run one command; returns its metrics (None for ``--print_config``).

    ``args`` (``run_cli``'s namespace): ``args.log_file`` is set to ``<out>/train.log`` once the
    output folder exists; library logs and background threads' tracebacks go there (stderr with
    ``args.verbose``), as in ``jaxlight train``.
    """
    from jaxlight import config as config_mod

    policy, base = checkpoint_code(command, argv)
    with config_mod.code_policy(policy):
        return _run_command(command, argv, base, args)


def _run_command(command: str, argv: list[str], base: dict | None, args=None) -> dict | None:
    import numpy as np

    from jaxlight import config as config_mod
    from jaxlight import report
    from jaxlight.config import ConfigError

    parser, ns, plain, paths = config_mod.parse(command, argv, base)
    if ns.print_config:
        # Every class and function is checked before the config is printed: what prints runs.
        config_mod.build_run(plain, load_data=False)
        sys.stdout.write(config_mod.dump(plain))
        return None
    run = config_mod.build_run(plain)
    trainer = _fit_trainer(run, command)
    ckpt_path = ns.ckpt_path
    if ckpt_path in ("best", "last") and not run.trainer_config.checkpoint.dirpath:
        raise ConfigError(f"--ckpt_path {ckpt_path}: needs trainer.checkpoint.dirpath (the folder it searches)")
    if command in ("validate",) and run.val is None:
        raise ConfigError(f"data: {plain['data']['class_path']} returned no validation set; validate needs one")
    if command in ("test",) and run.test is None:
        raise ConfigError(f"data: {plain['data']['class_path']} returned no test set; test needs one")
    from jaxlight.state import create_train_state

    ckpt_dir = run.trainer_config.checkpoint.dirpath
    if command == "fit" and ckpt_dir and ckpt_path is None and not run.trainer_config.checkpoint.overwrite:
        from jaxlight.checkpoint import list_checkpoints

        found = list_checkpoints(ckpt_dir)
        if found:
            raise ConfigError(f"trainer.checkpoint.dirpath: {ckpt_dir} already holds checkpoints ({found[-1].name}...): "
                              f"add --ckpt_path last to continue that run, --trainer.checkpoint.overwrite true to "
                              f"replace it, or "
                              f"choose another folder")
    state = create_train_state(run.model, run.tx, run.loss_fn, run.seed)
    # The loss on the first batch of each split, before anything is written (BatchError names
    # the leaf); cheap: no NaN scan here (the Trainer does it once, in fit).
    from jaxlight.loop import Source

    for name, part, size in (("training set", run.train, run.trainer_config.batch_size),
                             ("validation set", run.val, run.trainer_config.eval_batch_size),
                             ("test set", run.test, run.trainer_config.eval_batch_size)):
        if part is not None and (command != "predict" or name == "test set"):
            Source(part, name, size).check(state, check_finite=False)
    out = _out_dir(run)
    from jaxlight.commands import prepare_output_dir

    prepare_output_dir(out, "trainer.out")
    if args is not None:
        from jaxlight.commands import log_details

        args.log_file = log_details(out, args.verbose)
    if command == "fit":
        (out / "config.yaml").write_text(config_mod.dump(plain))
        print(f"jaxlight fit: {plain['model']['class_path']}, {plain['optimizer']['class_path']}, batch "
              f"{run.trainer_config.batch_size}, {run.trainer_config.max_epochs} epochs", flush=True)
        resume = None
        if ckpt_path is not None:
            resume = ckpt_path if ckpt_path != "best" else None
            if ckpt_path == "best":
                raise ConfigError("--ckpt_path best: fit resumes from last or a checkpoint folder, not best")
        state = trainer.fit(state, run.train, run.val, ckpt_path=resume)
        summary = {"config": plain, "history": [
            {"epoch": r.epoch + 1, **{k: v for k, v in r.metrics.items() if k != "count"}} for r in trainer.history],
            "epoch_seconds": [r.seconds for r in trainer.history]}
        if run.test is not None and not trainer.interrupted:
            summary.update(trainer.test(state, run.test))
            shown = {k: v for k, v in summary.items() if k.startswith("test_") and isinstance(v, float)}
            print("  ".join(f"{k} {v:.4f}" for k, v in shown.items()), flush=True)
        summary["versions"] = report.library_versions("jax", "jaxlib", "flax", "optax", "numpy")
        print(f"wrote {report.write_json(out / 'metrics.json', summary)}")
        if trainer.interrupted:
            import shlex

            from jaxlight.commands import Interrupted, stopped_line

            again = [a for i, a in enumerate(argv) if not (a.startswith("--ckpt_path=") or a == "--ckpt_path" or
                                                          (i and argv[i - 1] == "--ckpt_path"))]
            print(stopped_line(trainer, f"Resume with: jaxlight fit {shlex.join(again)} --ckpt_path last",
                               "no trainer.checkpoint.dirpath"), file=sys.stderr, flush=True)
            raise Interrupted(trainer.stop_signal)
        return summary
    resolved = _checkpoint(trainer, run, ckpt_path)
    if command == "validate":
        metrics = trainer.validate(state, run.val, ckpt_path=resolved)
    elif command == "test":
        metrics = trainer.test(state, run.test, ckpt_path=resolved)
    else:
        data = run.test if run.test is not None else (run.val if run.val is not None else run.train)
        outputs = trainer.predict(state, data, ckpt_path=resolved)
        import jax

        flat = jax.tree_util.tree_flatten_with_path(outputs)[0]
        arrays = {(jax.tree_util.keystr(p) or "outputs"): np.asarray(a) for p, a in flat}
        path = out / "predictions.npz"
        np.savez(path, **arrays)
        print(f"wrote {path} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())})")
        return {"predictions": str(path)}
    metrics = {**metrics, "ckpt_path": str(resolved) if resolved else None}
    print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
    print(f"wrote {report.write_json(out / f'{command}_metrics.json', metrics)}")
    return metrics


def _checkpoint(trainer, run, ckpt_path):
    from jaxlight.checkpoint import resolve_checkpoint

    if ckpt_path is None:
        return None
    if ckpt_path in ("best", "last"):
        return resolve_checkpoint(run.trainer_config.checkpoint.dirpath, ckpt_path)
    return resolve_checkpoint(ckpt_path, "last")


def main(command: str, argv: list[str]) -> int:
    """Run ``jaxlight <command> <argv>``; returns the exit code (see the module docstring)."""
    from jaxlight.checkpoint import CheckpointError, CheckpointWriteError
    from jaxlight.commands import EXIT_DIVERGED, EXIT_FAILED, EXIT_USAGE, UsageError, run_cli
    from jaxlight.config import ConfigError
    from jaxlight.data import MNISTError
    from jaxlight.parallel import ParallelError
    from jaxlight.step import BatchError
    from jaxlight.trainer import NonFiniteLossError

    errors = {
        ConfigError: EXIT_USAGE, UsageError: EXIT_USAGE, MNISTError: EXIT_USAGE, BatchError: EXIT_USAGE,
        ParallelError: EXIT_USAGE, NonFiniteLossError: EXIT_DIVERGED, CheckpointWriteError: EXIT_FAILED,
        CheckpointError: EXIT_USAGE, OSError: EXIT_FAILED,
    }
    import argparse

    args = argparse.Namespace(verbose="--verbose" in argv, log_file=None)
    argv = [a for a in argv if a != "--verbose"]
    try:
        return run_cli("jaxlight", lambda a: run_command(command, argv, a), args, errors)
    except SystemExit as exc:  # (run_cli exits 2 on a UsageError, as argparse does)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

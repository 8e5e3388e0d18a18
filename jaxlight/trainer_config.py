"""How to train, as one nested config: :class:`TrainerConfig` and its sections.

One object says everything a run's Trainer is built with, in the sections a reader looks for::

    TrainerConfig(max_epochs=2, batch_size=32,                 # the loop
                  checkpoint=CheckpointConfig(dirpath="ckpt", every_n_steps=100),
                  logging=LoggingConfig(logger="csv"),
                  parallel=ParallelConfig(strategy="pmap"),
                  numerics=NumericsConfig(precision="bf16", gradient_clip_norm=1.0))

A config file's ``trainer:`` part is the same tree (``trainer.checkpoint.every_n_steps``), and
``jaxlight train``'s flags map onto it (``--ckpt-every`` is ``trainer.checkpoint.every_n_steps``).
A section may be given as a mapping (``checkpoint={"dirpath": "ckpt"}``).

Each value is checked once, on its field (``check`` in the field's metadata), and a bad one
raises :class:`~jaxlight.config.ConfigError` naming its config key
(``trainer.checkpoint.every_n_steps: must be an int >= 1 or None, got 0``). The fields a resume
compares with the checkpoint's (they change what a step computes or which batches it sees) are
marked ``resume=True`` on the field itself; compared_fields reads them.

Example:
    >>> cfg = TrainerConfig(max_epochs=2, parallel={"strategy": "pmap"})
    >>> cfg.parallel
    ParallelConfig(strategy='pmap', devices=None)
    >>> sorted(compared_fields(cfg))
    ['accumulate_grad_batches', 'batch_size', 'freeze', 'gradient_clip_norm', 'nan_policy', 'overfit_batches', 'precision']
    >>> TrainerConfig(ckpt_every=5)
    Traceback (most recent call last):
    ...
    jaxlight.trainer_config.MovedKeyError: trainer.ckpt_every: moved to trainer.checkpoint.every_n_steps
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from jaxlight.config import ConfigError

__all__ = ["CheckpointConfig", "LoggingConfig", "MOVED_KEYS", "MovedKeyError", "NumericsConfig", "PRECISIONS",
           "ParallelConfig", "TrainerConfig", "compared_fields"]

# Precision name -> the ``jax.numpy`` compute dtype it names (None: the parameters' own float32);
# the Trainer looks the dtype up, so nothing here imports JAX.
PRECISIONS = {"float32": None, "bf16": "bfloat16"}


class MovedKeyError(ConfigError, TypeError):
    """A flat key of the former TrainerConfig (``ckpt_dir``, ``strategy``...) used where it moved."""


# -- checks: each returns what is wrong with a value, or None ---------------------------------


def _int_at_least(low: int, optional: bool = False) -> Callable[[Any], str | None]:
    def check(value):
        if optional and value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= low:
            return None
        return f"must be an int >= {low}{' or None' if optional else ''}, got {value!r}"
    return check


def _positive_or_none(value) -> str | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        return None
    return f"must be > 0 or None, got {value!r}"


def _one_of(names: Callable[[], tuple], optional: bool = False) -> Callable[[Any], str | None]:
    """``names``: called when a value is checked, so that a registry (``jaxlight.loggers.LOGGERS``)
    is the one list of its names."""
    def check(value):
        allowed = tuple(names())
        if (optional and value is None) or value in allowed:
            return None
        return f"expected one of {', '.join(map(str, allowed))}{' or null' if optional else ''}, got {value!r}"
    return check


def _bool(value) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _optional_str(value) -> str | None:
    return None if value is None or isinstance(value, str) else f"must be a string or null, got {value!r}"


def _patterns(value) -> str | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return None
    return f"expected a list of parameter path patterns (e.g. [backbone.*]), got {value!r}"


def _option(default, check=None, *, resume: bool = False, factory=None):
    """A config field: its default, its check, and whether a resume compares it."""
    meta = {"check": check, "resume": resume}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _logger_names() -> tuple:
    from jaxlight.loggers import LOGGERS

    return ("none", *LOGGERS)


def _strategy_names() -> tuple:
    from jaxlight.parallel import STRATEGIES

    return STRATEGIES


class _Section:
    """What every section shares: its key in the config file, and its fields' checks."""

    _key = "trainer"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise ConfigError(f"{self._key}.{f.name}: {problem}", key=f"{self._key}.{f.name}")


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Checkpoints and resuming (``trainer.checkpoint``).

    With ``dirpath`` set, the Trainer built by :func:`jaxlight.configcli.build_trainer` (what
    ``jaxlight train`` and ``jaxlight fit`` run) saves a
    :class:`~jaxlight.callbacks.ModelCheckpoint` there at every epoch end. A ``Trainer`` built
    by hand takes its ModelCheckpoint as a callback and reads ``allow_config_change`` only.

    Attributes:
        dirpath: the checkpoint folder; ``--ckpt_path best|last`` searches it. None: no checkpoints.
        every_n_steps: also save every n steps (optimizer updates).
        monitor: the metric that decides the best checkpoint (None: ``val_loss`` when there is
            a validation set, else ``loss``).
        mode: "min" or "max" for ``monitor``.
        overwrite: start a new run in a ``dirpath`` that holds checkpoints (they are deleted
            once this run has saved its first one).
        allow_config_change: resume although the checkpoint was written with other settings
            (``jaxlight.runconfig``); the accepted differences are recorded in its segments.
    """

    _key = "trainer.checkpoint"
    dirpath: Optional[str] = _option(None, _optional_str)
    every_n_steps: Optional[int] = _option(None, _int_at_least(1, optional=True))
    monitor: Optional[str] = _option(None, _optional_str)
    mode: str = _option("min", _one_of(lambda: ("min", "max")))
    overwrite: bool = _option(False, _bool)
    allow_config_change: bool = _option(False, _bool)


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """What a run reports and how often (``trainer.logging``).

    Attributes:
        logger: a name of ``jaxlight.loggers.LOGGERS`` ("csv", "tensorboard"), or None/"none";
            :func:`jaxlight.configcli.build_trainer` adds it (a ``Trainer`` built by hand
            takes its loggers as given).
        log_dir: where the logger writes (None: ``<trainer.out>/logs``).
        log_every_n_steps: send every n-th step's metrics to the loggers.
        enable_progress_bar: add a :class:`~jaxlight.callbacks.ProgressBar` unless one is given.
    """

    _key = "trainer.logging"
    logger: Optional[str] = _option(None, _one_of(_logger_names, optional=True))
    log_dir: Optional[str] = _option(None, _optional_str)
    log_every_n_steps: int = _option(1, _int_at_least(1))
    enable_progress_bar: bool = _option(True, _bool)


@dataclass(frozen=True)
class ParallelConfig(_Section):
    """Data parallelism (``trainer.parallel``; ``jaxlight.parallel``).

    Attributes:
        strategy: "single", "pmap", "sharded" or "fsdp" (``jaxlight.parallel.STRATEGIES``): the
            global batch of ``batch_size`` examples is split over ``devices`` devices, gradients
            and metrics are reduced over all of them; parameters and optimizer state stay
            replicated, except under "fsdp", which splits them over the devices. Results match
            one device within float32 rounding; checkpoints restore under any strategy and
            device count, so neither is compared on resume.
        devices: how many devices (None: 1 for "single", every device otherwise; a
            multi-process run always uses every process's devices).
    """

    _key = "trainer.parallel"
    strategy: str = _option("single", _one_of(_strategy_names))
    devices: Optional[int] = _option(None, _int_at_least(1, optional=True))


@dataclass(frozen=True)
class NumericsConfig(_Section):
    """What the step computes in, and what it does with non-finite numbers (``trainer.numerics``).

    Attributes:
        precision: "float32", or "bf16" to compute the forward and backward pass in bfloat16
            while parameters, gradients and optimizer state stay float32.
        gradient_clip_norm: clip the (accumulated) gradient to this global norm
            (``optax.clip_by_global_norm``); None: no clipping.
        nan_policy: "raise" stops with ``NonFiniteLossError`` naming the step; "skip" drops
            updates whose gradients are not finite (``optax.apply_if_finite``; with
            accumulation, the whole window's update) and keeps going.
        check_finite: before training, scan the floating leaves of an ``ArrayDataset`` once for
            NaN and infinity and refuse them naming the leaf and row (False skips it).
    """

    _key = "trainer.numerics"
    precision: str = _option("float32", _one_of(lambda: PRECISIONS), resume=True)
    gradient_clip_norm: Optional[float] = _option(None, _positive_or_none, resume=True)
    nan_policy: str = _option("raise", _one_of(lambda: ("raise", "skip")), resume=True)
    check_finite: bool = _option(True, _bool)


SECTIONS = {"checkpoint": CheckpointConfig, "logging": LoggingConfig, "parallel": ParallelConfig,
            "numerics": NumericsConfig}

# Every key of the former flat trainer config and where it lives now.
MOVED_KEYS = {
    "ckpt_dir": "checkpoint.dirpath", "ckpt_every": "checkpoint.every_n_steps", "monitor": "checkpoint.monitor",
    "monitor_mode": "checkpoint.mode", "overwrite": "checkpoint.overwrite",
    "allow_config_change": "checkpoint.allow_config_change",
    "logger": "logging.logger", "log_dir": "logging.log_dir", "log_every_n_steps": "logging.log_every_n_steps",
    "enable_progress_bar": "logging.enable_progress_bar",
    "strategy": "parallel.strategy", "devices": "parallel.devices",
    "precision": "numerics.precision", "gradient_clip_norm": "numerics.gradient_clip_norm",
    "nan_policy": "numerics.nan_policy", "check_finite": "numerics.check_finite",
}


def moved_key_error(old: str, where: str = "trainer") -> MovedKeyError:
    """The one error for a flat key used where it moved (``where``: how the caller spelt its prefix)."""
    return MovedKeyError(f"{where}.{old}: moved to trainer.{MOVED_KEYS[old]}", key=f"trainer.{old}")


def _refuse_moved_keywords(cls):
    """``TrainerConfig(ckpt_dir=...)`` names the new key instead of a bare TypeError."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for old in kwargs:
            if old in MOVED_KEYS:
                raise moved_key_error(old)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_refuse_moved_keywords
@dataclass(frozen=True)
class TrainerConfig(_Section):
    """How to train (what to train is the TrainState): the loop's settings, then one section
    per concern. Sections may be given as mappings; fields marked ``resume`` are compared with a
    checkpoint's when a run resumes (compared_fields).

    Attributes:
        max_epochs: epochs to run (an epoch visits every example once, last batch padded).
        max_steps: stop after this many steps (optimizer updates) in total; None: no limit.
        batch_size: examples per batch (per micro-batch with ``accumulate_grad_batches``). Resume-compared.
        eval_batch_size: examples per validation/test step.
        steps_per_execution: K steps (optimizer updates) per compiled call; None picks
            ``jaxlight.step.default_steps_per_call`` (1 for convolutions on the CPU, else the
            whole epoch). Results do not depend on it, only speed and hook frequency.
        val_every_n_epochs: validate after every n-th epoch (None: not at epoch ends).
        val_every_n_steps: also validate every n steps (None: not mid-epoch).
        accumulate_grad_batches: one optimizer update per n consecutive batches, with the
            example-weighted mean gradient over their real rows
            (``jaxlight.step.apply_accumulated_step``). A window never crosses an epoch's end.
            Steps (``max_steps``, ``global_step``, K) count updates. Resume-compared.
        fast_dev_run: n > 0 runs n training and n validation batches, then stops; no
            checkpoints, no loggers (a smoke test of the whole pipeline).
        overfit_batches: n > 0 trains on the first n batches only, unshuffled, and validates
            on them too. Resume-compared.
        handle_sigterm: on SIGTERM or SIGINT, finish the running chunk, save through the first
            ModelCheckpoint and return cleanly (``trainer.interrupted`` is then True).
        freeze: parameter path patterns (fnmatch over dotted paths, e.g. ``backbone.*``) that
            get no updates and no optimizer state (``jaxlight.optim.freeze``). Resume-compared.
        out: the commands' output folder (config.yaml, metrics.json, predictions, logs);
            None: ``runs/<model>``.
        run_config: a JSON dict describing the run (model, optimizer, lr, seed...), recorded in
            checkpoints and compared on resume (``jaxlight.runconfig``); the commands fill it.
        hparams: the run's resolved config, kept in every checkpoint (``meta.json``'s
            ``hparams``) and sent to every logger (``jaxlight.hparams.run_record``).
        checkpoint: :class:`CheckpointConfig`.
        logging: :class:`LoggingConfig`.
        parallel: :class:`ParallelConfig`.
        numerics: :class:`NumericsConfig`.
    """

    max_epochs: int = _option(1, _int_at_least(1))
    max_steps: Optional[int] = _option(None, _int_at_least(1, optional=True))
    batch_size: int = _option(64, _int_at_least(1), resume=True)
    eval_batch_size: int = _option(1000, _int_at_least(1))
    steps_per_execution: Optional[int] = _option(None, _int_at_least(1, optional=True))
    val_every_n_epochs: Optional[int] = _option(1, _int_at_least(1, optional=True))
    val_every_n_steps: Optional[int] = _option(None, _int_at_least(1, optional=True))
    accumulate_grad_batches: int = _option(1, _int_at_least(1), resume=True)
    fast_dev_run: int = _option(0, _int_at_least(0))
    overfit_batches: int = _option(0, _int_at_least(0), resume=True)
    handle_sigterm: bool = _option(True, _bool)
    freeze: list[str] = _option(None, _patterns, resume=True, factory=list)
    out: Optional[str] = _option(None, _optional_str)
    run_config: Optional[dict] = None
    hparams: Optional[dict] = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                known = {f.name for f in dataclasses.fields(cls)}
                for key in value:
                    if key not in known:
                        raise ConfigError(f"trainer.{name}.{key}: no such key (trainer.{name} has "
                                          f"{', '.join(sorted(known))})", key=f"trainer.{name}.{key}")
                object.__setattr__(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise ConfigError(f"trainer.{name}: expected a {cls.__name__} or a mapping, got {value!r}",
                                  key=f"trainer.{name}")
        super().__post_init__()

    def record(self) -> dict:
        """The settings as plain data (what a checkpoint's ``meta.json`` and the loggers get),
        without ``run_config`` and ``hparams``, which are recorded on their own."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("run_config", "hparams")}


def compared_fields(config: TrainerConfig) -> dict:
    """The fields marked ``resume`` (in every section), by field name: what a checkpoint's
    ``trainer`` record holds and a resume compares (``jaxlight.runconfig``)."""
    out = {}
    for obj in (config, *(getattr(config, name) for name in SECTIONS)):
        for f in dataclasses.fields(obj):
            if f.metadata.get("resume"):
                value = getattr(obj, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


class InConfig:
    """A Trainer attribute read from its config (``path`` in :class:`TrainerConfig`); setting it
    is refused, naming the config key, since a value set after construction would go unseen."""

    def __init__(self, path: str):
        self.path = path

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, trainer, owner=None):
        if trainer is None:
            return self
        return functools.reduce(getattr, self.path.split("."), trainer.config)

    def __set__(self, trainer, value):
        raise AttributeError(f"Trainer.{self.name} is the config's trainer.{self.path}: build the Trainer with "
                             f"TrainerConfig({self.path.split('.')[0]}=...)")

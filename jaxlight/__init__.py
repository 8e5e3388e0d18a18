"""jaxlight: Lightning's ergonomics on a purely functional, jit-compiled JAX core.

The public surface, in the order data flows: data -> model -> state -> step -> loop.
"""

import importlib

# Imported on first use (PEP 562), so that ``import jaxlight.cli`` loads no JAX: the command
# lines install their signal handlers before any heavy import (see jaxlight/cli.py).
_SUBMODULES = ("callbacks", "checkpoint", "data", "hparams", "loggers", "loop", "metrics", "models", "optim",
               "recipes", "tasks", "trainer")
_NAMES = {
    "ArrayDataset": "jaxlight.data", "Batches": "jaxlight.data", "load_mnist": "jaxlight.data",
    "load_task_data": "jaxlight.data",
    "EpochRunner": "jaxlight.loop", "evaluate": "jaxlight.loop", "fit": "jaxlight.loop",
    "predict": "jaxlight.loop", "train_epoch": "jaxlight.loop",
    "port": "jaxlight.bridge.porting",
    "load_from_checkpoint": "jaxlight.checkpoint", "save_hyperparameters": "jaxlight.hparams",
    "init_params": "jaxlight.models.init", "init_torch": "jaxlight.models.init", "freeze": "jaxlight.optim",
    "MODELS": "jaxlight.models", "build_model": "jaxlight.models", "count_params": "jaxlight.models",
    "make_optimizer": "jaxlight.optim",
    "Recipe": "jaxlight.recipes", "recipe_for": "jaxlight.recipes",
    "TrainState": "jaxlight.state", "create_train_state": "jaxlight.state",
    "BatchError": "jaxlight.step", "DonatedStateError": "jaxlight.step", "apply_eval_step": "jaxlight.step",
    "apply_train_step": "jaxlight.step", "eval_step": "jaxlight.step", "train_chunk": "jaxlight.step",
    "train_step": "jaxlight.step",
    "Trainer": "jaxlight.trainer", "TrainerConfig": "jaxlight.trainer_config",
    "CheckpointConfig": "jaxlight.trainer_config", "LoggingConfig": "jaxlight.trainer_config",
    "NumericsConfig": "jaxlight.trainer_config", "ParallelConfig": "jaxlight.trainer_config",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"jaxlight.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'jaxlight' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "BatchError",
    "Batches",
    "CheckpointConfig",
    "DonatedStateError",
    "EpochRunner",
    "LoggingConfig",
    "MODELS",
    "NumericsConfig",
    "ParallelConfig",
    "Recipe",
    "TrainState",
    "Trainer",
    "TrainerConfig",
    "apply_eval_step",
    "apply_train_step",
    "build_model",
    "callbacks",
    "checkpoint",
    "count_params",
    "create_train_state",
    "data",
    "eval_step",
    "evaluate",
    "fit",
    "freeze",
    "hparams",
    "init_params",
    "init_torch",
    "load_from_checkpoint",
    "load_mnist",
    "load_task_data",
    "loggers",
    "loop",
    "make_optimizer",
    "metrics",
    "models",
    "predict",
    "optim",
    "port",
    "recipe_for",
    "recipes",
    "save_hyperparameters",
    "tasks",
    "train_chunk",
    "train_epoch",
    "train_step",
    "trainer",
]

"""jaxlight: Lightning's ergonomics on a purely functional, jit-compiled JAX core.

The public surface, in the order data flows: data -> model -> state -> step -> loop.
"""

from jaxlight import callbacks, checkpoint, data, hparams, loggers, loop, models, optim, recipes, tasks, trainer
from jaxlight.hparams import load_from_checkpoint, save_hyperparameters
from jaxlight.models.init import init_params, init_torch
from jaxlight.optim import freeze
from jaxlight.data import ArrayDataset, Batches, load_mnist, load_task_data
from jaxlight.loop import EpochRunner, evaluate, fit, train_epoch
from jaxlight.models import MODELS, build_model, count_params
from jaxlight.optim import make_optimizer
from jaxlight.recipes import Recipe, recipe_for
from jaxlight.state import TrainState, create_train_state
from jaxlight.step import (
    BatchError,
    DonatedStateError,
    apply_eval_step,
    apply_train_step,
    eval_step,
    train_chunk,
    train_step,
)
from jaxlight.trainer import Trainer, TrainerConfig

__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "BatchError",
    "Batches",
    "DonatedStateError",
    "EpochRunner",
    "MODELS",
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
    "models",
    "optim",
    "recipe_for",
    "recipes",
    "save_hyperparameters",
    "tasks",
    "train_chunk",
    "train_epoch",
    "train_step",
    "trainer",
]

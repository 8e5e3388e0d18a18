"""The dataset each task trains on, by the name a recipe gives it."""

from __future__ import annotations

import os

import numpy as np

from jaxlight.data.arrays import ArrayDataset
from jaxlight.data.mnist import load_mnist
from jaxlight.data.synthetic import make_regression

__all__ = ["DATASETS", "load_task_data", "mnist_data", "task_data"]


def _mnist(data_dir, seed):
    train, test = load_mnist(data_dir)
    return ArrayDataset(train.images, train.labels), ArrayDataset(test.images, test.labels), {}


def _mnist_zero(data_dir, seed):
    """MNIST as a binary task: label 1 for the digit zero, 0 for every other digit."""
    train, test = load_mnist(data_dir)
    as_binary = lambda labels: (labels == 0).astype(np.int32)  # noqa: E731
    return (
        ArrayDataset(train.images, as_binary(train.labels)),
        ArrayDataset(test.images, as_binary(test.labels)),
        {},
    )


def _synthetic_regression(data_dir, seed):
    data = make_regression(seed=seed)
    return data.train, data.test, {"weight": data.weight, "bias": data.bias}


DATASETS = {
    "mnist": _mnist,
    "mnist-zero": _mnist_zero,
    "synthetic-regression": _synthetic_regression,
}


def load_task_data(
    name: str, data_dir: str | os.PathLike | None = None, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset, dict]:
    """``(train, test, truth)`` for a recipe's dataset name; ``truth`` holds the true ``weight``
    and ``bias`` of the synthetic regression (empty for MNIST)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](data_dir, seed)


def task_data(dataset: str = "mnist", data_dir: str | None = None, val_split: float = 0.0,
              seed: int = 0) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset]:
    """``(train, val, test)`` of a built-in dataset, for a run config's ``data`` part.

    Args:
        dataset: "mnist" (digits 0-9), "mnist-zero" (is it a zero: the binary task) or
            "synthetic-regression" (``y = xW + b + noise``; ``seed`` draws it).
        data_dir: a folder holding ``MNIST/raw/`` (default: ``$JAXLIGHT_DATA``, then the cache).
        val_split: hold out this fraction of the training set as the validation set (shuffled
            by ``seed``; ``ArrayDataset.split``); 0 gives no validation set.
        seed: the validation split's (and the synthetic data's) seed.

    Returns:
        Three ``ArrayDataset`` of ``{"x", "y"}`` (``val`` is None when ``val_split`` is 0).
    """
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    train, test, _ = load_task_data(dataset, data_dir, seed)
    val = None
    if val_split:
        train, val = train.split(val_split, seed)
    return train, val, test


def mnist_data(data_dir: str | None = None, val_split: float = 0.0,
               seed: int = 0) -> tuple[ArrayDataset, ArrayDataset | None, ArrayDataset]:
    """MNIST's ``(train, val, test)``: ``x`` uint8 ``(N, 28, 28)``, ``y`` int32 labels 0-9
    (:func:`task_data` with ``dataset="mnist"``)."""
    return task_data("mnist", data_dir, val_split, seed)

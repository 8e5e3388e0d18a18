"""The dataset each task trains on, by the name a recipe gives it."""

from __future__ import annotations

import os

import numpy as np

from jaxlight.data.arrays import ArrayDataset
from jaxlight.data.mnist import load_mnist
from jaxlight.data.synthetic import make_regression

__all__ = ["DATASETS", "load_task_data"]


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

"""Data: MNIST from disk (or the mirrors), in-memory datasets, device batching, synthetic data."""

from jaxlight.data.arrays import (
    ArrayDataset,
    batch_indices,
    host_batch_indices,
    epoch_order,
    gather_batch,
    iterate_batches,
    iterate_masked,
    num_batches,
    prepare_x,
    windows,
)
from jaxlight.data.stream import Batches
from jaxlight.data.mnist import MNISTError, MNISTSplit, download_mnist, find_mnist, load_mnist, read_idx
from jaxlight.data.synthetic import RegressionData, make_regression
from jaxlight.data.datasets import load_task_data, mnist_data, task_data

__all__ = [
    "ArrayDataset",
    "Batches",
    "MNISTError",
    "MNISTSplit",
    "RegressionData",
    "batch_indices",
    "host_batch_indices",
    "download_mnist",
    "epoch_order",
    "find_mnist",
    "gather_batch",
    "iterate_batches",
    "iterate_masked",
    "load_mnist",
    "load_task_data",
    "make_regression",
    "mnist_data",
    "num_batches",
    "prepare_x",
    "read_idx",
    "windows",
    "task_data",
]

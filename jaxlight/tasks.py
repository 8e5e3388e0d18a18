"""Loss and metric per task, built on optax's losses.

Every step computes per-example losses and scores and averages them under the batch ``mask``
(0 for the padding that fills the last batch; see ``jaxlight.data.arrays``), so a padded batch
gives exactly the mean over its real examples, as PyTorch's ``reduction="mean"`` does on the
shorter last batch of a ``DataLoader``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["Task", "regression", "binary", "multiclass", "TASKS"]


@dataclass(frozen=True)
class Task:
    """What a model's outputs are scored against.

    Attributes:
        name: "regression", "binary" or "multiclass".
        metric: the metric's name in logs and ``metrics.json``: "mse" or "accuracy".
        per_example_loss: ``(outputs (B, K), y) -> (B,)``.
        per_example_score: ``(outputs, y) -> (B,)``: squared error, or 1.0 for a correct label.
        num_classes: labels must lie in ``[0, num_classes)``; None for regression.
        label_dtype: the dtype ``y`` must have (int32 labels, float32 targets).
    """

    name: str
    metric: str
    per_example_loss: Callable
    per_example_score: Callable
    num_classes: int | None
    label_dtype: np.dtype

    def loss_and_metrics(self, outputs, y, mask):
        """Masked means: ``(loss, {"loss", metric, "count"})``; ``count`` is the number of real
        examples, the weight for averaging over batches."""
        count = jnp.sum(mask)
        denom = jnp.maximum(count, 1.0)
        loss = jnp.sum(self.per_example_loss(outputs, y) * mask) / denom
        score = jnp.sum(self.per_example_score(outputs, y) * mask) / denom
        return loss, {"loss": loss, self.metric: score, "count": count}


def _mse(outputs, y):
    return jnp.mean(optax.squared_error(outputs, y), axis=-1)


def _binary_loss(outputs, y):
    return optax.sigmoid_binary_cross_entropy(outputs[:, 0], y.astype(outputs.dtype))


def _binary_correct(outputs, y):
    return ((outputs[:, 0] > 0).astype(jnp.int32) == y).astype(jnp.float32)


def _multiclass_loss(outputs, y):
    return optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), y)


def _multiclass_correct(outputs, y):
    return (jnp.argmax(outputs, axis=-1) == y).astype(jnp.float32)


def regression() -> Task:
    """Mean squared error (``torch.nn.MSELoss``); metric "mse"."""
    return Task("regression", "mse", _mse, _mse, None, np.dtype(np.float32))


def binary() -> Task:
    """Sigmoid cross-entropy on one logit (``torch.nn.BCEWithLogitsLoss``); labels 0/1."""
    return Task("binary", "accuracy", _binary_loss, _binary_correct, 2, np.dtype(np.int32))


def multiclass(num_classes: int = 10) -> Task:
    """Softmax cross-entropy on integer labels (``torch.nn.CrossEntropyLoss``)."""
    return Task("multiclass", "accuracy", _multiclass_loss, _multiclass_correct, num_classes, np.dtype(np.int32))


TASKS = {"regression": regression, "binary": binary, "multiclass": multiclass}

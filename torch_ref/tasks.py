"""Loss and metric per task, as ``jaxlight.tasks`` defines them, in ``torch.nn`` terms.

Masked means, as on the JAX side: with ``mask=None`` every example counts, which is exactly
``reduction="mean"`` over a ``DataLoader``'s (possibly shorter) last batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

__all__ = ["Task", "regression", "binary", "multiclass", "TASKS"]


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    per_example_loss: Callable
    per_example_score: Callable
    num_classes: int | None
    label_dtype: torch.dtype

    def loss_and_metrics(self, outputs, y, mask=None):
        """``(loss, {"loss", metric, "count"})``; the metrics are detached Python floats."""
        losses = self.per_example_loss(outputs, y)
        if mask is None:
            mask = torch.ones_like(losses)
        count = mask.sum()
        denom = count.clamp(min=1.0)
        loss = (losses * mask).sum() / denom
        with torch.no_grad():
            score = (self.per_example_score(outputs, y) * mask).sum() / denom
        return loss, {"loss": float(loss.detach()), self.metric: float(score), "count": float(count)}


def _mse(outputs, y):
    return F.mse_loss(outputs, y, reduction="none").mean(-1)


def _binary_loss(outputs, y):
    return F.binary_cross_entropy_with_logits(outputs[:, 0], y.to(outputs.dtype), reduction="none")


def _binary_correct(outputs, y):
    return ((outputs[:, 0] > 0).long() == y).float()


def _multiclass_loss(outputs, y):
    return F.cross_entropy(outputs, y, reduction="none")


def _multiclass_correct(outputs, y):
    return (outputs.argmax(-1) == y).float()


def regression() -> Task:
    return Task("regression", "mse", _mse, _mse, None, torch.float32)


def binary() -> Task:
    return Task("binary", "accuracy", _binary_loss, _binary_correct, 2, torch.int64)


def multiclass(num_classes: int = 10) -> Task:
    return Task("multiclass", "accuracy", _multiclass_loss, _multiclass_correct, num_classes, torch.int64)


TASKS = {"regression": regression, "binary": binary, "multiclass": multiclass}

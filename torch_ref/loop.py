"""The tutorial's training loop, generalised to the six models and their tasks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from torch_ref.tasks import Task

__all__ = ["EpochResult", "NonFiniteLossError", "loss_and_metrics", "train_epoch", "evaluate", "fit"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step (as jaxlight's)."""


@dataclass
class EpochResult:
    epoch: int
    metrics: dict
    seconds: float


def _accumulate(total: dict, metrics: dict) -> None:
    n = metrics["count"]
    for k, v in metrics.items():
        total[k] = total.get(k, 0.0) + (v if k == "count" else v * n)


def _finish(total: dict) -> dict:
    n = max(total.get("count", 0.0), 1.0)
    out = {k: v / n for k, v in total.items() if k != "count"}
    out["count"] = int(total.get("count", 0))
    return out


def loss_and_metrics(model: torch.nn.Module, task, batch):
    """``(loss, {"loss", metrics..., "count"})`` of one batch: a built-in ``Task`` on ``(x, y)``
    batches, or a loss function in jaxlight's contract, ``loss_fn(model, batch) -> (losses (B,),
    {name: (B,)})``, on any batch (the mean over the batch, as ``reduction="mean"``)."""
    if isinstance(task, Task):
        x, y = batch
        return task.loss_and_metrics(model(x), y)
    losses, metrics = task(model, batch)
    loss = losses.mean()
    with torch.no_grad():
        values = {k: float(torch.as_tensor(v).float().mean()) for k, v in metrics.items()}
    return loss, {"loss": float(loss.detach()), **values, "count": float(losses.shape[0])}


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, task,
                on_step: Callable[[dict], None] | None = None, epoch: int = 0, first_step: int = 0) -> dict:
    """One pass over ``loader``: ``zero_grad, loss.backward(), step()`` per batch, as the
    tutorial does. Returns the example-weighted mean loss and metric. ``task``: a built-in
    ``Task``, or a loss function on the loader's batches (:func:`loss_and_metrics`).

    Raises:
        NonFiniteLossError: a batch's loss is NaN or Inf; training stops before that update, as
            jaxlight's Trainer does, instead of carrying NaN parameters to the end.
    """
    model.train()
    total: dict = {}
    for batch, data in enumerate(loader):
        optimizer.zero_grad()
        loss, metrics = loss_and_metrics(model, task, data)
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"training loss is {metrics['loss']} at step {first_step + batch + 1} (epoch {epoch + 1}, "
                f"batch {batch + 1}); training stopped. Lower the learning rate")
        loss.backward()
        optimizer.step()
        _accumulate(total, metrics)
        if on_step:
            on_step(metrics)
    return _finish(total)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, task) -> dict:
    model.eval()
    total: dict = {}
    for data in loader:
        _accumulate(total, loss_and_metrics(model, task, data)[1])
    return _finish(total)


def fit(model, optimizer, loader, task: Task, epochs: int,
        on_epoch: Callable[[EpochResult], None] | None = None,
        progress: Callable | None = None) -> list[EpochResult]:
    """Train for ``epochs`` epochs; the same callbacks as ``jaxlight.loop.fit``."""
    results = []
    for epoch in range(epochs):
        bar = progress(len(loader), epoch) if progress else None

        def on_step(metrics, bar=bar):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

        t0 = time.perf_counter()
        metrics = train_epoch(model, optimizer, loader, task, on_step, epoch, epoch * len(loader))
        result = EpochResult(epoch, metrics, time.perf_counter() - t0)
        if bar is not None:
            bar.close()
        results.append(result)
        if on_epoch:
            on_epoch(result)
    return results

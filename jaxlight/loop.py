"""The plain functional training loop: epochs of compiled steps, evaluation, history.

This is what a user writes by hand; the Trainer (what ``jaxlight train`` runs) adds hooks,
logging and checkpoints around the same compiled functions, under the same strategies.

Example:
    >>> from jaxlight import build_model, create_train_state, optim, tasks, loop
    >>> from jaxlight.data import load_mnist, ArrayDataset
    >>> train, test = load_mnist("../shared/data")                       # doctest: +SKIP
    >>> state = create_train_state(build_model("mlp"), optim.adam(1e-3), tasks.multiclass())
    >>> state, history = loop.fit(state, ArrayDataset(train.images, train.labels),
    ...                           epochs=2, batch_size=64)               # doctest: +SKIP
    >>> loop.evaluate(state, ArrayDataset(test.images, test.labels))     # doctest: +SKIP
    {'loss': 0.08, 'accuracy': 0.975, 'count': 10000}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import numpy as np

from jaxlight.data.arrays import ArrayDataset, batch_indices, num_batches
from jaxlight.parallel import SingleDevice, Strategy, get_strategy
from jaxlight.state import TrainState
from jaxlight.step import (
    BatchError,
    check_batch,
    default_steps_per_call,
    eval_chunk,
    eval_step,
    train_chunk,
    train_step,
)

__all__ = ["EpochResult", "check_dataset", "summarize", "train_epoch", "evaluate", "fit"]


@dataclass
class EpochResult:
    epoch: int
    metrics: dict
    seconds: float


def summarize(stacked: dict) -> dict:
    """Per-step metrics (each ``(steps,)``) -> one example-weighted mean per metric."""
    host = jax.device_get(stacked)
    counts = np.asarray(host["count"], np.float64).reshape(-1)
    total = counts.sum()
    out = {k: float((np.asarray(v, np.float64).reshape(-1) * counts).sum() / max(total, 1.0))
           for k, v in host.items() if k != "count"}
    out["count"] = int(total)
    return out


def check_dataset(state: TrainState, data: ArrayDataset, name: str = "dataset") -> None:
    """Check a whole dataset once (shapes, dtypes, every label), naming the culprit."""
    if state.input_shape is not None and tuple(data.x.shape[1:]) != tuple(state.input_shape):
        raise BatchError(f"{name}: x has shape {tuple(data.x.shape)}; the model takes "
                         f"(N, {', '.join(map(str, state.input_shape))})")
    try:
        check_batch(state, {"x": data.x[:1], "y": data.y[:1]})
        labels = np.asarray(data.y)
        if state.task.num_classes is not None and labels.size:
            check_batch(state, {"x": np.broadcast_to(np.asarray(data.x[:1]), (len(labels),) + data.x.shape[1:]),
                                "y": labels})
    except BatchError as exc:
        message = str(exc).replace("batch['x']", "x").replace("batch['y']", "y")
        raise BatchError(f"{name}: {message}") from None


def _steps(strategy: Strategy):
    """``(train_step, eval_step, train_chunk, eval_chunk)``: on one device ``jaxlight.step``'s
    own, looked up here at call time exactly as before strategies existed; else the strategy's."""
    if isinstance(strategy, SingleDevice):
        return train_step, eval_step, train_chunk, eval_chunk
    return strategy.train_step, strategy.eval_step, strategy.train_chunk, strategy.eval_chunk


def _on_device(data: ArrayDataset) -> bool:
    return isinstance(data.x, jax.Array)


def train_epoch(
    state: TrainState,
    data: ArrayDataset,
    batch_size: int,
    epoch: int,
    steps_per_call: int | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
    strategy: Strategy | str | None = None,
) -> tuple[TrainState, dict]:
    """One epoch in the order ``fold_in(state.rng, epoch)`` fixes.

    Args:
        state: donated.
        data: on the device (``data.to_device()``) for the fused/chunked path; on the host it
            is streamed batch by batch through ``train_step``.
        batch_size: examples per step; the last batch is padded and masked.
        epoch: which epoch (picks the shuffle).
        steps_per_call: K steps per compiled call; None picks ``default_steps_per_call``.
        on_chunk: called after each compiled call with ``(steps_done, chunk_metrics)``.
        strategy: ``jaxlight.parallel`` strategy or its name (default: one device). The state
            comes back in the strategy's layout (``parallel.to_host_state`` undoes it).

    Returns:
        The new state and the epoch's stacked per-step metrics.
    """
    strategy = get_strategy(strategy)
    strategy.check_batch_size(batch_size)
    state = strategy.prepare_state(state)
    run_step, _, run_chunk, _ = _steps(strategy)
    key = jax.random.fold_in(state.rng, epoch)
    nb = num_batches(len(data), batch_size)
    if not _on_device(data):
        chunks = []
        for i, batch in enumerate(strategy.iterate_batches(data, batch_size, key)):
            state, metrics = run_step(state, batch)
            chunks.append(metrics)
            if on_chunk:
                on_chunk(i + 1, metrics)
        return state, jax.tree.map(lambda *m: jax.numpy.stack(m), *chunks)
    data = strategy.prepare_data(data)
    k = steps_per_call or default_steps_per_call(state, nb)
    idx, mask = strategy.prepare_indices(*batch_indices(key, len(data), batch_size, True))
    chunks = []
    for start in range(0, nb, k):
        steps = min(k, nb - start)
        state, metrics = run_chunk(state, data.x, data.y, idx, mask, steps, start)
        chunks.append(metrics)
        if on_chunk:
            on_chunk(start + steps, metrics)
    return state, jax.tree.map(lambda *m: jax.numpy.concatenate(m), *chunks)


def evaluate(state: TrainState, data: ArrayDataset, batch_size: int = 1000,
             steps_per_call: int | None = None, strategy: Strategy | str | None = None) -> dict:
    """Example-weighted mean metrics over all of ``data`` (padding excluded).

    Under a parallel ``strategy`` the batch size rounds up to a multiple of the device count
    (the extra rows are masked padding: the metrics are the same).
    """
    strategy = get_strategy(strategy)
    batch_size = strategy.eval_batch_size(batch_size)
    state = strategy.prepare_state(state)
    _, run_eval_step, _, run_eval_chunk = _steps(strategy)
    nb = num_batches(len(data), batch_size)
    if not _on_device(data):
        return summarize(jax.tree.map(lambda *m: jax.numpy.stack(m),
                                      *[run_eval_step(state, b)
                                        for b in strategy.iterate_batches(data, batch_size, None)]))
    data = strategy.prepare_data(data)
    k = steps_per_call or default_steps_per_call(state, nb)
    idx, mask = strategy.prepare_indices(*batch_indices(jax.random.key(0), len(data), batch_size, False))
    chunks = [run_eval_chunk(state, data.x, data.y, idx, mask, min(k, nb - s), s) for s in range(0, nb, k)]
    return summarize(jax.tree.map(lambda *m: jax.numpy.concatenate(m), *chunks))


@dataclass
class History:
    epochs: list[EpochResult] = field(default_factory=list)


def fit(
    state: TrainState,
    train: ArrayDataset,
    epochs: int,
    batch_size: int,
    steps_per_call: int | None = None,
    on_device: bool | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    progress: Callable | None = None,
    strategy: Strategy | str | None = None,
) -> tuple[TrainState, list[EpochResult]]:
    """Train for ``epochs`` epochs; returns the final state and one ``EpochResult`` per epoch.

    Args:
        on_device: put the training set on the device (default: when it fits, see
            ``ArrayDataset.fits_on_device``); else stream it from host memory.
        on_epoch: called after each epoch (printing, logging).
        progress: a factory ``progress(total_steps, epoch) -> bar`` with ``update(n)``,
            ``set_postfix(**kw)`` and ``close()`` (a tqdm bar fits).
        strategy: ``jaxlight.parallel`` strategy or its name (default: one device, as before);
            the state comes back in its layout.
    """
    check_dataset(state, train, "training set")
    strategy = get_strategy(strategy)
    strategy.check_batch_size(batch_size)
    if on_device is None:
        on_device = train.fits_on_device(jax.local_devices()[0])  # (another process's can't be asked)
    if on_device:
        train = strategy.prepare_data(train)
    results = []
    start_epoch = int(state.step) // num_batches(len(train), batch_size)
    for epoch in range(start_epoch, start_epoch + epochs):
        bar = progress(num_batches(len(train), batch_size), epoch) if progress else None
        done = [0]

        def on_chunk(steps_done, metrics, bar=bar, done=done):
            if bar is not None:
                bar.update(steps_done - done[0])
                bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4f}")
                done[0] = steps_done

        t0 = time.perf_counter()
        state, stacked = train_epoch(state, train, batch_size, epoch, steps_per_call, on_chunk, strategy)
        metrics = summarize(stacked)  # device_get synchronises, so the time below is real
        result = EpochResult(epoch, metrics, time.perf_counter() - t0)
        if bar is not None:
            bar.close()
        results.append(result)
        if on_epoch:
            on_epoch(result)
    return state, results

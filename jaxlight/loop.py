"""The one epoch runner, evaluation, and the plain functional training loop.

:class:`EpochRunner` runs an epoch as compiled chunks of K steps; ``fit`` (this module) and the
``Trainer`` both drive it, so every path (fused on-device epochs, host-streamed arrays, a user's
iterable of batches; one device, ``pmap``, ``sharded``) trains through the same code and the
same pure step (``jaxlight.step.apply_train_step``).

Training data is an :class:`~jaxlight.data.ArrayDataset` (put on the device when it fits: the
fused path, where K steps gather their batches on the device in one program) or any re-iterable
of batches (a generator factory, a ``torch.utils.data.DataLoader``, a ``grain`` loader), which
is streamed from the host one step at a time (:class:`~jaxlight.data.stream.Batches`).

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

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlight.data.arrays import ArrayDataset, batch_indices, num_batches
from jaxlight.data.stream import Batches
from jaxlight.parallel import Strategy, get_strategy
from jaxlight.state import TrainState
from jaxlight.step import (
    BatchError,
    check_batch,
    check_loss,
    check_not_donated,
    default_steps_per_call,
    needs_unroll,
)
from jaxlight.tasks import Task

__all__ = ["EpochResult", "EpochRunner", "as_source", "check_data", "summarize", "train_epoch", "evaluate", "fit"]


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


def _stack(chunks: list, concat: bool) -> dict:
    join = jnp.concatenate if concat else jnp.stack
    return jax.tree.map(lambda *m: join(m), *chunks)


def as_source(data, name: str = "data") -> ArrayDataset | Batches:
    """An ``ArrayDataset`` as it is; any other re-iterable (or generator factory) as
    :class:`~jaxlight.data.stream.Batches`."""
    if isinstance(data, (ArrayDataset, Batches)):
        return data
    if isinstance(data, (np.ndarray, jax.Array)):
        raise TypeError(f"{name}: got a bare array; wrap it as ArrayDataset(x, y) or ArrayDataset({{...}})")
    return Batches(data, name)


def _first_batch(state: TrainState, data: ArrayDataset | Batches, batch_size: int):
    if isinstance(data, Batches):
        return data.peek()
    rows = min(len(data), batch_size)
    batch = jax.tree.map(lambda a: np.asarray(a[:rows]), data.data)
    return batch, np.ones((rows,), np.float32)


def check_data(state: TrainState, data: ArrayDataset | Batches, name: str = "dataset",
               batch_size: int = 64, check_finite: bool = True) -> None:
    """Check data once before a run, naming the culprit (:class:`~jaxlight.step.BatchError`).

    - Every leaf of an ``ArrayDataset``: a NaN or infinity in its floating leaves (unless
      ``check_finite`` is False); for the built-in tasks, shapes, dtypes and every label.
    - The first batch traced through the loss in train and eval mode (``jax.eval_shape``, no
      computation): a batch that does not fit the model names the leaf and the model's
      complaint instead of an XLA traceback.
    """
    check_not_donated(state)
    if isinstance(data, ArrayDataset):
        if len(data) == 0:
            raise BatchError(f"{name} is empty (0 examples)")
        if isinstance(state.loss_fn, Task):
            try:
                state.loss_fn.check(data.data, state.input_shape, "data")
            except BatchError as exc:
                message = str(exc).replace("data['x']", "x").replace("data['y']", "y").replace("batch with", "dataset with")
                raise BatchError(f"{name}: {message}") from None
        try:
            if check_finite:
                data.check_finite(name)
        except ValueError as exc:
            raise BatchError(str(exc)) from None
    batch, mask = _first_batch(state, data, batch_size)
    batch, mask = check_batch(state, batch, mask, f"{name}, first batch:")
    check_loss(state, batch, mask, name)


# --------------------------------------------------------------------------------------------
# The epoch runner


class EpochRunner:
    """One epoch of training, chunk by chunk: what ``fit`` and the ``Trainer`` both iterate.

    Args:
        state: donated to the first chunk.
        data: an ``ArrayDataset`` (on the device: fused chunks gathered there; on the host:
            streamed per step) or :class:`~jaxlight.data.stream.Batches`.
        epoch: which epoch (``ArrayDataset`` order: ``fold_in(state.rng, epoch)``).
        batch_size: examples per step (``ArrayDataset``; a ``Batches`` source has its own).
        strategy: the ``jaxlight.parallel`` strategy.
        steps_per_call: K, the steps of one compiled call.
        start: the batch to start from (a resumed epoch).
        shuffle: False keeps the stored order (``overfit_batches``).
        unroll: see ``jaxlight.step.train_chunk``.

    Iterating yields ``(state, metrics, steps)`` after each chunk, ``metrics`` the chunk's
    per-step metrics (``(steps,)`` each, on the device). The caller may change the next chunk's
    length by ``runner.next_length = n`` (validation and checkpoint steps) and may stop early.
    ``finished`` turns True when the epoch's data is exhausted.
    """

    def __init__(self, state: TrainState, data, epoch: int, batch_size: int, strategy: Strategy,
                 steps_per_call: int, start: int = 0, shuffle: bool = True, unroll: bool = False):
        self.state, self.data, self.epoch = state, data, epoch
        self.batch_size, self.strategy, self.k = batch_size, strategy, steps_per_call
        self.position, self.shuffle, self.unroll = start, shuffle, unroll
        self.next_length: int | None = None
        self.finished = False
        if isinstance(data, ArrayDataset):
            self.num_batches = num_batches(len(data), batch_size)
        else:
            self.num_batches = data.num_batches

    def _length(self) -> int:
        n = self.next_length or self.k
        self.next_length = None
        if self.num_batches is not None:
            n = min(n, self.num_batches - self.position)
        return n

    def __iter__(self) -> Iterator[tuple]:
        if isinstance(self.data, ArrayDataset):
            yield from self._arrays()
        else:
            yield from self._stream()
        self.finished = True

    def _arrays(self):
        key = jax.random.fold_in(self.state.rng, self.epoch) if self.shuffle else None
        strategy, state = self.strategy, self.state
        on_device = self.data.on_device
        if on_device:
            data = strategy.prepare_data(self.data).data
            idx, mask = strategy.prepare_indices(*batch_indices(
                key if key is not None else jax.random.key(0), len(self.data), self.batch_size, self.shuffle))
        else:  # host-resident: this process's rows of each step, gathered and streamed
            host = strategy.iterate_batches(self.data, self.batch_size, key, start=self.position)
        while self.position < self.num_batches:
            steps = self._length()
            if on_device:
                # ``steps`` is static in train_chunk: every new length compiles a new program. A
                # length other than K (cut short by an epoch end, a requested step, a resume)
                # runs as power-of-two pieces, so a run compiles at most ~log2(K) + 2 programs.
                # The results are the same either way (K-invariance, tested).
                pieces = [steps] if steps == self.k else [1 << b for b in reversed(range(steps.bit_length()))
                                                         if steps >> b & 1]
                out, start = [], self.position
                for n in pieces:
                    state, m = strategy.train_chunk(state, data, idx, mask, n, start, unroll=self.unroll)
                    out.append(m)
                    start += n
                metrics = out[0] if len(out) == 1 else _stack(out, concat=True)
            else:
                out = []
                for batch, mask in itertools.islice(host, steps):
                    state, m = strategy.train_step(state, batch, mask)
                    out.append(m)
                metrics = _stack(out, concat=False)
            self.position += steps
            self.state = state
            yield state, metrics, steps

    def _stream(self):
        state, out = self.state, []
        steps = self._length()
        for batch, mask in self.data.epoch(skip=self.position):
            state, m = self.strategy.train_step(state, batch, mask)
            out.append(m)
            if len(out) == steps:
                self.position += steps
                self.state = state
                yield state, _stack(out, concat=False), steps
                out, steps = [], self._length()
        if out:
            self.position += len(out)
            self.state = state
            yield state, _stack(out, concat=False), len(out)


def _steps_per_call(state: TrainState, data, batch_size: int, steps_per_call: int | None) -> int:
    if steps_per_call:
        return steps_per_call
    if not isinstance(data, ArrayDataset):
        return 1
    return default_steps_per_call(state, num_batches(len(data), batch_size))


def train_epoch(
    state: TrainState,
    data,
    batch_size: int,
    epoch: int,
    steps_per_call: int | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
    strategy: Strategy | str | None = None,
) -> tuple[TrainState, dict]:
    """One epoch: ``ArrayDataset`` in the order ``fold_in(state.rng, epoch)`` fixes, or one pass
    over a re-iterable of batches.

    Args:
        state: donated.
        data: an ``ArrayDataset`` on the device (``data.to_device()``: fused chunks) or the host
            (streamed batch by batch), or any re-iterable of batches.
        batch_size: examples per step (``ArrayDataset``); the last batch is padded and masked.
        epoch: which epoch (picks the shuffle).
        steps_per_call: K steps per compiled call; None picks ``default_steps_per_call``.
        on_chunk: called after each compiled call with ``(steps_done, chunk_metrics)``.
        strategy: ``jaxlight.parallel`` strategy or its name (default: one device). The state
            comes back in the strategy's layout (``parallel.to_host_state`` undoes it).

    Returns:
        The new state and the epoch's stacked per-step metrics.
    """
    check_not_donated(state)
    strategy = get_strategy(strategy)
    data = as_source(data)
    if isinstance(data, ArrayDataset):
        strategy.check_batch_size(batch_size)
    state = strategy.prepare_state(state)
    k = _steps_per_call(state, data, batch_size, steps_per_call)
    runner = EpochRunner(state, data, epoch, batch_size, strategy, k, unroll=k > 1 and needs_unroll(state))
    chunks = []
    for state, metrics, _ in runner:
        chunks.append(metrics)
        if on_chunk:
            on_chunk(runner.position, metrics)
    if not chunks:
        raise BatchError("the training data yielded no batches")
    return state, _stack(chunks, concat=True)


def evaluate(state: TrainState, data, batch_size: int = 1000,
             steps_per_call: int | None = None, strategy: Strategy | str | None = None) -> dict:
    """Example-weighted mean metrics of the eval-mode model over all of ``data`` (padding excluded).

    ``data``: an ``ArrayDataset`` (fused on the device when it lives there) or any re-iterable
    of batches. Under a parallel ``strategy`` the batch size rounds up to a multiple of the
    device count (the extra rows are masked padding: the metrics are the same).
    """
    check_not_donated(state)
    strategy = get_strategy(strategy)
    data = as_source(data, "evaluation data")
    state = strategy.prepare_state(state)
    if isinstance(data, Batches):
        return summarize(_stack([strategy.eval_step(state, b, m) for b, m in data.epoch()], concat=False))
    batch_size = strategy.eval_batch_size(batch_size)
    if not data.on_device:
        return summarize(_stack([strategy.eval_step(state, b, m)
                                 for b, m in strategy.iterate_batches(data, batch_size, None)], concat=False))
    nb = num_batches(len(data), batch_size)
    idx, mask = batch_indices(jax.random.key(0), len(data), batch_size, False)
    data = strategy.prepare_data(data)
    k = steps_per_call or default_steps_per_call(state, nb)
    idx, mask = strategy.prepare_indices(idx, mask)
    chunks = [strategy.eval_chunk(state, data.data, idx, mask, min(k, nb - s), s) for s in range(0, nb, k)]
    return summarize(_stack(chunks, concat=True))


def fit(
    state: TrainState,
    train,
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
        train: an ``ArrayDataset`` or any re-iterable of batches (see the module docstring).
        on_device: put an ``ArrayDataset`` on the device (default: when it fits, see
            ``ArrayDataset.fits_on_device``); else stream it from host memory.
        on_epoch: called after each epoch (printing, logging).
        progress: a factory ``progress(total_steps, epoch) -> bar`` with ``update(n)``,
            ``set_postfix(**kw)`` and ``close()`` (a tqdm bar fits).
        strategy: ``jaxlight.parallel`` strategy or its name (default: one device); the state
            comes back in its layout.
    """
    strategy = get_strategy(strategy)
    train = as_source(train, "training data")
    check_data(state, train, "training set", batch_size)
    if isinstance(train, ArrayDataset):
        strategy.check_batch_size(batch_size)
        if on_device is None:
            on_device = train.fits_on_device(jax.local_devices()[0])  # (another process's can't be asked)
        train = strategy.prepare_data(train) if on_device else train.map(np.asarray)
        per_epoch = num_batches(len(train), batch_size)
        start_epoch = int(state.step) // per_epoch
    else:
        per_epoch, start_epoch = train.num_batches, 0
    results = []
    for epoch in range(start_epoch, start_epoch + epochs):
        bar = progress(per_epoch, epoch) if progress else None
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

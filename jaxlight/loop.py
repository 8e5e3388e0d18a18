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

from jaxlight.data.arrays import ArrayDataset, batch_indices, num_batches, windows
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

__all__ = ["EpochResult", "EpochRunner", "as_source", "check_data", "steps_per_epoch", "summarize", "train_epoch",
           "evaluate", "predict",
           "fit"]


@dataclass
class EpochResult:
    """One epoch of ``fit``: its index, the example-weighted mean metrics, the wall time of its
    steps, and (``fit``) each step's metrics as host arrays ``(steps,)``."""

    epoch: int
    metrics: dict
    seconds: float
    step_metrics: dict | None = None


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
    """One pass over the data, chunk by chunk: what ``fit``, ``evaluate``, ``predict``, the
    ``Trainer`` and ``check_parity`` all iterate.

    Args:
        state: donated to the first chunk (``mode="train"``).
        data: an ``ArrayDataset`` (on the device: fused chunks gathered there; on the host:
            streamed per step) or :class:`~jaxlight.data.stream.Batches`.
        epoch: which epoch (``ArrayDataset`` order: ``fold_in(state.rng, epoch)``).
        batch_size: examples per step (``ArrayDataset``; a ``Batches`` source has its own).
        strategy: the ``jaxlight.parallel`` strategy.
        steps_per_call: K, the steps of one compiled call.
        start: the batch to start from (a resumed epoch).
        shuffle: False keeps the stored order (``overfit_batches``, evaluation, prediction).
        unroll: see ``jaxlight.step.train_chunk``.
        mode: ``"train"`` (the pure train step), ``"eval"`` (the eval step: metrics, nothing
            updated) or ``"predict"`` (the eval-mode outputs, one batch per call).
        predict_fn: for ``mode="predict"``, see ``jaxlight.step.apply_predict``.
        accumulate: micro-batches per optimizer step (gradient accumulation,
            ``jaxlight.step.apply_accumulated_step``). A step is then a window of that many
            consecutive batches of the epoch; the last window of an epoch takes the batches
            that are left (a window never crosses an epoch's end).

    Steps count optimizer updates: ``steps_per_call``, ``start``, ``position`` and
    ``num_batches`` (steps per epoch, None for a source of unknown length) are in windows
    when ``accumulate > 1``.

    Iterating yields ``(state, out, steps)`` after each chunk: ``out`` the chunk's per-step
    metrics (``(steps,)`` each, on the device), or in predict mode ``(outputs, mask)`` of one
    batch, padding rows included. The caller may change the next chunk's length by
    ``runner.next_length = n`` (validation and checkpoint steps) and may stop early.
    ``finished`` turns True when the epoch's data is exhausted.
    """

    def __init__(self, state: TrainState, data, epoch: int, batch_size: int, strategy: Strategy,
                 steps_per_call: int, start: int = 0, shuffle: bool = True, unroll: bool = False,
                 mode: str = "train", predict_fn=None, accumulate: int = 1):
        if mode not in ("train", "eval", "predict"):
            raise ValueError(f"mode must be 'train', 'eval' or 'predict', got {mode!r}")
        self.state, self.data, self.epoch = state, data, epoch
        self.batch_size, self.strategy = batch_size, strategy
        self.k = 1 if mode == "predict" else steps_per_call
        self.position, self.shuffle, self.unroll = start, shuffle, unroll
        self.mode, self.predict_fn = mode, predict_fn
        self.accumulate = accumulate if mode == "train" else 1
        self.next_length: int | None = None
        self.finished = False
        self.num_batches = steps_per_epoch(data, batch_size, accumulate)

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

    def _chunk(self, state, data, idx, mask, steps: int, start: int):
        if self.mode == "eval":
            return state, self.strategy.eval_chunk(state, data, idx, mask, steps, start)
        run = self.strategy.accumulated_chunk if self.accumulate > 1 else self.strategy.train_chunk
        return run(state, data, idx, mask, steps, start, unroll=self.unroll)

    def _step(self, state, window: list):
        """One step on the host-streamed path: a window of ``accumulate`` ``(batch, mask)``
        pairs (one pair without accumulation, and always for eval and predict)."""
        if self.mode == "train":
            if self.accumulate == 1:
                return self.strategy.train_step(state, *window[0])
            return self.strategy.train_window(state, window, unroll=self.unroll)
        batch, mask = window[0]
        if self.mode == "eval":
            return state, self.strategy.eval_step(state, batch, mask)
        return state, (self.strategy.predict_step(state, batch, mask, self.predict_fn), np.asarray(mask))

    def _arrays(self):
        key = jax.random.fold_in(self.state.rng, self.epoch) if self.shuffle else None
        strategy, state = self.strategy, self.state
        fused, a = self.data.on_device and self.mode != "predict", self.accumulate
        if fused:
            data = strategy.prepare_data(self.data).data
            order = batch_indices(key if key is not None else jax.random.key(0), len(self.data), self.batch_size,
                                  self.shuffle)
            idx, mask = strategy.prepare_indices(*(windows(*order, a) if a > 1 else order))
        else:  # host-resident: this process's rows of each step, gathered and streamed
            host = _steps(strategy.iterate_batches(self.data, self.batch_size, key, start=self.position * a), a)
        while self.position < self.num_batches:
            steps = self._length()
            if fused:
                # ``steps`` is static in train_chunk: every new length compiles a new program. A
                # length other than K (cut short by an epoch end, a requested step, a resume)
                # runs as power-of-two pieces, so a run compiles at most ~log2(K) + 2 programs.
                # The results are the same either way (K-invariance, tested).
                pieces = [steps] if steps == self.k else [1 << b for b in reversed(range(steps.bit_length()))
                                                         if steps >> b & 1]
                out, start = [], self.position
                for n in pieces:
                    state, m = self._chunk(state, data, idx, mask, n, start)
                    out.append(m)
                    start += n
                metrics = out[0] if len(out) == 1 else _stack(out, concat=True)
            else:
                out = []
                for window in itertools.islice(host, steps):
                    state, m = self._step(state, window)
                    out.append(m)
                metrics = out[0] if self.mode == "predict" else _stack(out, concat=False)
            self.position += steps
            self.state = state
            yield state, metrics, steps

    def _stream(self):
        state, out = self.state, []
        steps = self._length()
        for window in _steps(self.data.epoch(skip=self.position * self.accumulate), self.accumulate):
            state, m = self._step(state, window)
            out.append(m)
            if len(out) == steps:
                self.position += steps
                self.state = state
                yield state, out[0] if self.mode == "predict" else _stack(out, concat=False), steps
                out, steps = [], self._length()
        if out:
            self.position += len(out)
            self.state = state
            yield state, _stack(out, concat=False), len(out)


def _steps(pairs, accumulate: int) -> Iterator[list]:
    """``(batch, mask)`` pairs -> one list per optimizer step: ``accumulate`` consecutive pairs,
    the last list of the epoch completed with all-padding copies of its last micro-batch (so
    every window has one shape and the streamed and fused paths compute the same update)."""
    window = []
    for pair in pairs:
        window.append(pair)
        if len(window) == accumulate:
            yield window
            window = []
    if window:
        batch, mask = window[-1]
        yield window + [(batch, np.zeros_like(np.asarray(mask, np.float32)))] * (accumulate - len(window))


def steps_per_epoch(data, batch_size: int, accumulate: int = 1) -> int | None:
    """Optimizer steps in one epoch of ``data``: ``ceil(batches / accumulate)``; None for a
    source that does not know its length."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate (batches per optimizer step) must be an int >= 1, got {accumulate!r}")
    nb = num_batches(len(data), batch_size) if isinstance(data, ArrayDataset) else data.num_batches
    return None if nb is None else num_batches(nb, accumulate)


def _unroll(state: TrainState, k: int, accumulate: int) -> bool:
    """Whether compiled loops (K steps, A micro-batches) must unroll (``step.needs_unroll``)."""
    return (k > 1 or accumulate > 1) and needs_unroll(state)


def _steps_per_call(state: TrainState, data, batch_size: int, steps_per_call: int | None,
                    accumulate: int = 1) -> int:
    if steps_per_call:
        return steps_per_call
    if not isinstance(data, ArrayDataset):
        return 1
    return default_steps_per_call(state, steps_per_epoch(data, batch_size, accumulate))


def train_epoch(
    state: TrainState,
    data,
    batch_size: int,
    epoch: int,
    steps_per_call: int | None = None,
    on_chunk: Callable[[int, dict], None] | None = None,
    strategy: Strategy | str | None = None,
    accumulate: int = 1,
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
        accumulate: batches per optimizer step (gradient accumulation; see
            :class:`EpochRunner`); ``steps_per_call`` then counts windows.

    Returns:
        The new state and the epoch's stacked per-step metrics.
    """
    check_not_donated(state)
    strategy = get_strategy(strategy)
    data = as_source(data)
    if isinstance(data, ArrayDataset):
        strategy.check_batch_size(batch_size)
    state = strategy.prepare_state(state)
    k = _steps_per_call(state, data, batch_size, steps_per_call, accumulate)
    runner = EpochRunner(state, data, epoch, batch_size, strategy, k, unroll=_unroll(state, k, accumulate),
                         accumulate=accumulate)
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
    batch_size = strategy.eval_batch_size(batch_size)
    if isinstance(data, ArrayDataset) and data.on_device:
        k = steps_per_call or default_steps_per_call(state, num_batches(len(data), batch_size))
    else:
        k = 1
    runner = EpochRunner(state, data, 0, batch_size, strategy, k, shuffle=False, mode="eval")
    chunks = [metrics for _, metrics, _ in runner]
    if not chunks:
        raise BatchError("the evaluation data yielded no batches")
    return summarize(_stack(chunks, concat=True))


def predict(state: TrainState, data, batch_size: int = 1000, strategy: Strategy | str | None = None,
            predict_fn=None):
    """The eval-mode model's outputs for every example of ``data``, in order, padding removed.

    Args:
        data: an ``ArrayDataset`` or any re-iterable of batches.
        batch_size: rows per compiled call (an ``ArrayDataset``); the last batch is padded, so
            one program serves any N, and the result does not depend on it.
        strategy: ``jaxlight.parallel`` strategy or its name; under ``pmap``/``sharded`` the
            batch is split over the devices and the outputs equal one device's.
        predict_fn: see ``jaxlight.step.apply_predict``.

    Returns:
        The outputs, any pytree of ``(N, ...)`` numpy arrays.
    """
    check_not_donated(state)
    strategy = get_strategy(strategy)
    data = as_source(data, "prediction data")
    state = strategy.prepare_state(state)
    batch_size = strategy.eval_batch_size(batch_size)
    runner = EpochRunner(state, data, 0, batch_size, strategy, 1, shuffle=False, mode="predict",
                         predict_fn=predict_fn)
    out = []
    for _, (outputs, mask), _ in runner:
        real = np.asarray(mask) > 0
        out.append(jax.tree.map(lambda a: np.asarray(a)[real], outputs))
    if not out:
        return np.zeros((0,), np.float32)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out)


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
    accumulate: int = 1,
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
        accumulate: gradient accumulation: one optimizer step per ``accumulate`` batches, with
            the example-weighted mean gradient of their real rows (the last window of an epoch
            takes the batches left; see :class:`EpochRunner`). ``state.step`` counts updates.
    """
    strategy = get_strategy(strategy)
    train = as_source(train, "training data")
    check_data(state, train, "training set", batch_size)
    if isinstance(train, ArrayDataset):
        strategy.check_batch_size(batch_size)
        if on_device is None:
            on_device = train.fits_on_device(jax.local_devices()[0])  # (another process's can't be asked)
        train = strategy.prepare_data(train) if on_device else train.map(np.asarray)
        per_epoch = steps_per_epoch(train, batch_size, accumulate)
        start_epoch = int(state.step) // per_epoch
    else:
        per_epoch, start_epoch = steps_per_epoch(train, batch_size, accumulate), 0
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
        state, stacked = train_epoch(state, train, batch_size, epoch, steps_per_call, on_chunk, strategy, accumulate)
        stacked = jax.device_get(stacked)  # synchronises, so the time below is real
        result = EpochResult(epoch, summarize(stacked), time.perf_counter() - t0,
                             {k: np.asarray(v) for k, v in stacked.items()})
        if bar is not None:
            bar.close()
        results.append(result)
        if on_epoch:
            on_epoch(result)
    return state, results

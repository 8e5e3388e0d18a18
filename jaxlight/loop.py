"""The one epoch runner, evaluation, and the plain functional training loop.

Data goes one way, down: the caller hands its data to :func:`prepare_source` once, which
chooses the source, checks the first batch (and every value of an ``ArrayDataset``), cuts and
places it, and returns a :class:`Source`; :class:`EpochRunner` reads every epoch from that
source, pads and masks its batches, and runs them as compiled chunks of K steps; the caller
reads back plain values (steps per epoch, examples, each chunk's metrics). ``fit`` (this
module) and the ``Trainer`` both drive it, so every path (fused on-device epochs,
host-streamed arrays, a user's iterable of batches; one device, ``pmap``, ``sharded``) trains
through the same code and the same pure step (``jaxlight.step.apply_train_step``).

Training data is an :class:`~jaxlight.data.ArrayDataset` (put on the device when it fits: the
fused path, where K steps gather their batches on the device in one program) or any re-iterable
of batches (a generator factory, a ``torch.utils.data.DataLoader``, a ``grain`` loader), which
is streamed from the host one step at a time (:class:`~jaxlight.data.stream.Batches`).

Example (a linear model on a regression problem whose noise, 0.1, puts the MSE floor at 0.01):
    >>> from flax import nnx
    >>> from jaxlight import create_train_state, optim, tasks, loop
    >>> from jaxlight.data import make_regression
    >>> from jaxlight.models import LinearRegression
    >>> data = make_regression(n_train=512, n_test=128, n_features=8, noise=0.1, seed=0)
    >>> state = create_train_state(LinearRegression(8, rngs=nnx.Rngs(0)), optim.adam(0.1), tasks.regression())
    >>> state, history = loop.fit(state, data.train, epochs=20, batch_size=64)
    >>> len(history), int(state.step)
    (20, 160)
    >>> loop.evaluate(state, data.test)
    {'loss': 0.011, 'mse': 0.011, 'count': 128}
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlight.data.arrays import ArrayDataset, host_batch_indices, num_batches, windows
from jaxlight.data.stream import Batches
from jaxlight.metrics import Metric, finish
from jaxlight.parallel import Strategy, get_strategy
from jaxlight.state import TrainState
from jaxlight.step import (
    _NO_ACCUMULATION,
    BatchError,
    check_batch,
    check_loss,
    check_not_donated,
    default_steps_per_call,
    needs_unroll,
    without_optimizer,
)
from jaxlight.tasks import Task

__all__ = ["EpochResult", "EpochRunner", "Source", "prepare_source", "summarize", "train_epoch", "evaluate", "predict",
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
    """Per-step metrics (each ``(steps,)``) -> one example-weighted mean per metric; a
    :class:`~jaxlight.metrics.Metric` (its per-step sums) -> its value over all the steps."""
    host = jax.device_get(stacked)
    counts = np.asarray(host["count"], np.float64).reshape(-1)
    total = counts.sum()
    out = {k: finish(v) if isinstance(v, Metric) else
           float((np.asarray(v, np.float64).reshape(-1) * counts).sum() / max(total, 1.0))
           for k, v in host.items() if k != "count"}
    out["count"] = int(total)
    return out


def _stack(chunks: list, concat: bool) -> dict:
    join = jnp.concatenate if concat else jnp.stack
    return jax.tree.map(lambda *m: join(m), *chunks)


# --------------------------------------------------------------------------------------------
# The data of a run, as the runner reads it


class Source:
    """A run's data as the epoch runner reads it: an ``ArrayDataset`` or any re-iterable of
    batches (:class:`~jaxlight.data.stream.Batches`), chosen once.

    :func:`prepare_source` builds one from what a user passes and checks and places it;
    ``loop.fit``, ``loop.evaluate``, ``loop.predict`` and the ``Trainer`` hand it their data
    once, the runner reads every epoch from it, and the caller reads back the numbers it needs
    (``num_examples``, :meth:`steps_per_epoch`, ``fused``).

    Args:
        data: an ``ArrayDataset``, a ``Source`` (its data, renamed and re-batched), a
            ``Batches``, or anything ``Batches`` takes: a re-iterable of batches (a
            ``DataLoader``, a ``grain`` loader, a list) or a function returning an iterator.
        name: how errors name it ("training set").
        batch_size: examples per step of an ``ArrayDataset`` (an iterable's batches are its own).

    Raises:
        TypeError: a bare array (wrap it as ``ArrayDataset``), a one-shot generator, or
            something that cannot be iterated.
    """

    def __init__(self, data, name: str = "data", batch_size: int = 64):
        if isinstance(data, Source):
            data = data.data
        elif isinstance(data, (np.ndarray, jax.Array)):
            raise TypeError(f"{name}: got a bare array; wrap it as ArrayDataset(x, y) or ArrayDataset({{...}})")
        elif not isinstance(data, (ArrayDataset, Batches)):
            data = Batches(data, name)
        self.data, self.name, self.batch_size = data, name, batch_size

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {self.data!r}, batch_size={self.batch_size})"

    @property
    def arrays(self) -> bool:
        """Whether the data is an ``ArrayDataset`` (its epochs are shuffled by the run's key)."""
        return isinstance(self.data, ArrayDataset)

    @property
    def fused(self) -> bool:
        """Whether the data lives on the device: K steps then gather their batches there, in
        one compiled call. Anything else streams from the host, one batch per step."""
        return self.arrays and self.data.on_device

    @property
    def num_examples(self) -> int | None:
        """Examples of an ``ArrayDataset``; None for an iterable."""
        return len(self.data) if self.arrays else None

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch, the last one padded; None for an iterable without ``len``."""
        return num_batches(len(self.data), self.batch_size) if self.arrays else self.data.num_batches

    def steps_per_epoch(self, accumulate: int = 1) -> int | None:
        """Optimizer steps in one epoch: ``ceil(batches / accumulate)``; None when the number
        of batches is unknown."""
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate (batches per optimizer step) must be an int >= 1, got {accumulate!r}")
        nb = self.num_batches
        return None if nb is None else num_batches(nb, accumulate)

    def check(self, state: TrainState, check_finite: bool = True) -> None:
        """Check the data once before a run, naming the culprit (:class:`~jaxlight.step.BatchError`).

        - Every leaf of an ``ArrayDataset``: a NaN or infinity in its floating leaves (unless
          ``check_finite`` is False); for the built-in tasks, shapes, dtypes and every label.
        - The first batch traced through the loss in train and eval mode (``jax.eval_shape``,
          no computation): a batch that does not fit the model names the leaf and the model's
          complaint instead of an XLA traceback.
        """
        check_not_donated(state)
        name, data = self.name, self.data
        if self.arrays:
            if len(data) == 0:
                raise BatchError(f"{name} is empty (0 examples)")
            if isinstance(state.loss_fn, Task):
                try:
                    state.loss_fn.check(data.data, state.input_shape, "data")
                except BatchError as exc:
                    message = (str(exc).replace("data['x']", "x").replace("data['y']", "y")
                               .replace("batch with", "dataset with"))
                    raise BatchError(f"{name}: {message}") from None
            try:
                if check_finite:
                    data.check_finite(name)
            except ValueError as exc:
                raise BatchError(str(exc)) from None
            rows = min(len(data), self.batch_size)
            batch, mask = jax.tree.map(lambda a: np.asarray(a[:rows]), data.data), np.ones((rows,), np.float32)
        else:
            batch, mask = data.peek()
        batch, mask = check_batch(state, batch, mask, f"{name}, first batch:")
        check_loss(state, batch, mask, name)

    def first(self, batches: int) -> "Source":
        """The first ``batches`` batches only, in their stored order (``overfit_batches``,
        ``fast_dev_run``); 0 keeps them all."""
        if not batches:
            return self
        if self.arrays:
            return Source(self.data.take(batches * self.batch_size), self.name, self.batch_size)
        stream = self.data
        return Source(Batches(lambda: itertools.islice(stream.iterator(), batches), stream.name), self.name,
                      self.batch_size)

    def place(self, strategy: Strategy, on_device: bool | None = None) -> "Source":
        """An ``ArrayDataset`` on the strategy's devices (``on_device=None``: when it fits, see
        ``ArrayDataset.fits_on_device``), else in host memory as numpy; an iterable as it is."""
        if not self.arrays:
            return self
        if on_device is None:
            on_device = self.data.fits_on_device(jax.local_devices()[0])  # (another process's can't be asked)
        data = strategy.prepare_data(self.data) if on_device else self.data.map(np.asarray)
        return Source(data, self.name, self.batch_size)

    def pairs(self, strategy: Strategy, key: jax.Array | None, skip: int = 0) -> Iterator[tuple]:
        """One epoch of ``(batch, mask)`` from the host, from batch ``skip`` on: an
        ``ArrayDataset``'s rows in the order ``key`` fixes (None: the stored order), this
        process's rows of each batch; an iterable's batches, checked and padded."""
        if self.arrays:
            return strategy.iterate_batches(self.data, self.batch_size, key, start=skip)
        return self.data.epoch(skip=skip)


def _predict_data(state: TrainState, data):
    """What prediction also takes: a pytree of equally long arrays, and (a built-in task) a bare
    input array ``x``."""
    if isinstance(data, (np.ndarray, jax.Array)):
        return ArrayDataset({"x": data}) if hasattr(state.loss_fn, "predict") else ArrayDataset(data)
    if isinstance(data, (dict, tuple)) or not (isinstance(data, (ArrayDataset, Batches, Source))
                                               or hasattr(data, "__iter__") or callable(data)):
        return ArrayDataset(data)
    return data


def prepare_source(state: TrainState, data, name: str, batch_size: int, strategy: Strategy | str | None = None,
                   *, mode: str = "train", check: bool = True, check_finite: bool = True, first_batches: int = 0,
                   on_device: bool | None = None) -> Source:
    """The user's data as the runner reads it: chosen, checked, cut and placed, once per run.

    Args:
        state: what the first batch is checked against.
        data: see :class:`Source`; for ``mode="predict"`` also a pytree of equally long arrays
            or, for a built-in task, a bare input array.
        name: how errors name it ("training set", "validation set"...).
        batch_size: examples per step. Evaluation and prediction round it up to a multiple of
            the device count (the extra rows are masked padding); training refuses a batch of
            an ``ArrayDataset`` that does not divide over the devices.
        strategy: ``jaxlight.parallel`` strategy or its name (default: one device).
        mode: ``"train"``, ``"eval"`` or ``"predict"`` (not checked: a prediction batch needs
            no labels; kept in host memory, where each batch is gathered).
        check: :meth:`Source.check` it (``check_finite`` as there).
        first_batches: n > 0 keeps the first n batches only, in their stored order.
        on_device: put an ``ArrayDataset`` on the devices; None: when it fits.
    """
    if mode not in ("train", "eval", "predict"):
        raise ValueError(f"mode must be 'train', 'eval' or 'predict', got {mode!r}")
    strategy = get_strategy(strategy)
    if mode == "predict":
        data, check, on_device = _predict_data(state, data), False, False
    if mode != "train":
        batch_size = strategy.eval_batch_size(batch_size)
    source = Source(data, name, batch_size)
    if check:
        source.check(state, check_finite)
    if mode == "train" and source.arrays:
        strategy.check_batch_size(batch_size)
    return source.first(first_batches).place(strategy, on_device)


def _default_k(state: TrainState, source: Source, accumulate: int) -> int:
    """K when the caller does not ask: ``step.default_steps_per_call`` for fused data, else 1
    (host-streamed steps return to Python between steps anyway)."""
    return default_steps_per_call(state, source.steps_per_epoch(accumulate)) if source.fused else 1


# --------------------------------------------------------------------------------------------
# The epoch runner


class EpochRunner:
    """One pass over the data, chunk by chunk: what ``fit``, ``evaluate``, ``predict``, the
    ``Trainer`` and ``check_parity`` all iterate.

    Args:
        state: donated to the first chunk (``mode="train"``).
        data: a :class:`Source` (from :func:`prepare_source`), or an ``ArrayDataset`` (on the
            device: fused chunks gathered there; on the host: streamed per step) or any
            re-iterable of batches, used as it is.
        epoch: which epoch (``ArrayDataset`` order: ``fold_in(state.rng, epoch)``).
        batch_size: examples per step of data that is not a ``Source`` (a ``Source`` has its own).
        strategy: the ``jaxlight.parallel`` strategy.
        steps_per_call: K, the steps of one compiled call; None: the whole epoch for fused data
            (``jaxlight.step.default_steps_per_call``), else 1.
        start: the batch to start from (a resumed epoch).
        shuffle: False keeps the stored order (``overfit_batches``, evaluation, prediction).
        unroll: see ``jaxlight.step.train_chunk``; None: when the model needs it
            (``jaxlight.step.needs_unroll``) and a compiled call holds more than one step.
        mode: ``"train"`` (the pure train step), ``"eval"`` (the eval step: metrics, nothing
            updated) or ``"predict"`` (the eval-mode outputs, one batch per call).
        predict_fn: for ``mode="predict"``, see ``jaxlight.step.apply_predict``.
        accumulate: micro-batches per optimizer step (gradient accumulation,
            ``jaxlight.step.apply_accumulated_step``). A step is then a window of that many
            consecutive batches of the epoch; the last window of an epoch takes the batches
            that are left (a window never crosses an epoch's end).

    Steps count optimizer updates: ``k``, ``start``, ``position`` and ``num_batches`` (steps
    per epoch, None for a source of unknown length) are in windows when ``accumulate > 1``.

    Iterating yields ``(state, out, steps)`` after each chunk: ``out`` the chunk's per-step
    metrics (``(steps,)`` each, on the device), or in predict mode ``(outputs, mask)`` of one
    batch, padding rows included. The caller may change the next chunk's length by
    ``runner.next_length = n`` (validation and checkpoint steps) and may stop early.
    ``finished`` turns True when the epoch's data is exhausted.
    """

    def __init__(self, state: TrainState, data, epoch: int, batch_size: int, strategy: Strategy,
                 steps_per_call: int | None = None, start: int = 0, shuffle: bool = True, unroll: bool | None = None,
                 mode: str = "train", predict_fn=None, accumulate: int = 1):
        if mode not in ("train", "eval", "predict"):
            raise ValueError(f"mode must be 'train', 'eval' or 'predict', got {mode!r}")
        self.source = data if isinstance(data, Source) else Source(data, batch_size=batch_size)
        self.state, self.epoch, self.strategy = state, epoch, strategy
        self.accumulate = accumulate if mode == "train" else 1
        if self.accumulate > 1 and state.step_fn is not None:
            raise ValueError(_NO_ACCUMULATION)
        self.num_batches = self.source.steps_per_epoch(self.accumulate)
        self.k = 1 if mode == "predict" else steps_per_call or _default_k(state, self.source, self.accumulate)
        self.unroll = ((self.k > 1 or self.accumulate > 1) and needs_unroll(state)) if unroll is None else unroll
        self.position, self.shuffle = start, shuffle
        self.mode, self.predict_fn = mode, predict_fn
        self.next_length: int | None = None
        self.finished = False

    def _length(self) -> int:
        n = self.next_length or self.k
        self.next_length = None
        if self.num_batches is not None:
            n = min(n, self.num_batches - self.position)
        return n

    def __iter__(self) -> Iterator[tuple]:
        if self.source.fused and self.mode != "predict":
            yield from self._fused()
        else:
            yield from self._host()
        self.finished = True

    def _key(self):
        """The epoch's shuffle (an ``ArrayDataset``'s order), None for the stored order."""
        return jax.random.fold_in(self.state.rng, self.epoch) if self.shuffle and self.source.arrays else None

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

    def _fused(self):
        """Data on the device: each chunk of K steps gathers its batches there, in one call."""
        key, strategy, state, a = self._key(), self.strategy, self.state, self.accumulate
        data = strategy.prepare_data(self.source.data).data
        order = host_batch_indices(key if key is not None else jax.random.key(0), len(self.source.data),
                                   self.source.batch_size, self.shuffle)
        idx, mask = strategy.prepare_indices(*(windows(*order, a) if a > 1 else order))
        while self.position < self.num_batches:
            steps = self._length()
            # ``steps`` is static in train_chunk: every new length compiles a new program. A
            # length other than K (cut short by an epoch end, a requested step, a resume) runs
            # as power-of-two pieces, so a run compiles at most ~log2(K) + 2 programs. The
            # results are the same either way (K-invariance, tested).
            pieces = [steps] if steps == self.k else [1 << b for b in reversed(range(steps.bit_length()))
                                                     if steps >> b & 1]
            out, start = [], self.position
            for n in pieces:
                state, m = self._chunk(state, data, idx, mask, n, start)
                out.append(m)
                start += n
            self.position += steps
            self.state = state
            yield state, out[0] if len(out) == 1 else _stack(out, concat=True), steps

    def _host(self):
        """Data in host memory or from an iterable: one compiled step per batch (per window),
        yielded in chunks of K steps."""
        state, out = self.state, []
        steps = self._length()
        pairs = self.source.pairs(self.strategy, self._key(), skip=self.position * self.accumulate)
        for window in _steps(pairs, self.accumulate):
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
        data: a :class:`Source`, an ``ArrayDataset`` on the device (``data.to_device()``: fused
            chunks) or the host (streamed batch by batch), or any re-iterable of batches.
        batch_size: examples per step (``ArrayDataset``); the last batch is padded and masked.
        epoch: which epoch (picks the shuffle).
        steps_per_call: K steps per compiled call; None: the whole epoch for data on the device
            (``jaxlight.step.default_steps_per_call``), else 1.
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
    source = data if isinstance(data, Source) else Source(data, "training set", batch_size)
    if source.arrays:
        strategy.check_batch_size(source.batch_size)
    state = strategy.prepare_state(state)
    runner = EpochRunner(state, source, epoch, source.batch_size, strategy, steps_per_call, accumulate=accumulate)
    chunks = []
    for state, metrics, _ in runner:
        chunks.append(metrics)
        if on_chunk:
            on_chunk(runner.position, metrics)
    if not chunks:
        raise BatchError(f"the {source.name} yielded no batches")
    return state, _stack(chunks, concat=True)


def evaluate(state: TrainState, data, batch_size: int = 1000,
             steps_per_call: int | None = None, strategy: Strategy | str | None = None) -> dict:
    """Example-weighted mean metrics of the eval-mode model over all of ``data`` (padding excluded).

    ``data``: a :class:`Source` (with its own batch size), an ``ArrayDataset`` (fused on the
    device when it lives there) or any re-iterable of batches. Under a parallel ``strategy``
    the batch size rounds up to a multiple of the device count (the extra rows are masked
    padding: the metrics are the same).
    """
    check_not_donated(state)
    strategy = get_strategy(strategy)
    source = data if isinstance(data, Source) else Source(data, "evaluation data", strategy.eval_batch_size(batch_size))
    state = strategy.prepare_state(without_optimizer(state))  # (one program for every optimizer)
    runner = EpochRunner(state, source, 0, source.batch_size, strategy, steps_per_call, shuffle=False, mode="eval")
    chunks = [metrics for _, metrics, _ in runner]
    if not chunks:
        raise BatchError(f"the {source.name} yielded no batches")
    return summarize(_stack(chunks, concat=True))


def predict(state: TrainState, data, batch_size: int = 1000, strategy: Strategy | str | None = None,
            predict_fn=None):
    """The eval-mode model's outputs for every example of ``data``, in order, padding removed.

    Args:
        data: a :class:`Source`, an ``ArrayDataset``, a pytree of equally long arrays
            (``{"image": ...}``), any re-iterable of batches, or (built-in tasks) a bare input
            array ``x``.
        batch_size: rows per compiled call; the last batch is padded, so one program serves
            any N, and the result does not depend on it (eval mode: every row is computed on
            its own).
        strategy: ``jaxlight.parallel`` strategy or its name; under ``pmap``/``sharded`` the
            batch is split over the devices and the outputs equal one device's.
        predict_fn: see ``jaxlight.step.apply_predict``.

    Returns:
        The outputs, any pytree of ``(N, ...)`` numpy arrays.
    """
    check_not_donated(state)
    strategy = get_strategy(strategy)
    source = data if isinstance(data, Source) else prepare_source(state, data, "prediction data", batch_size,
                                                                  strategy, mode="predict")
    state = strategy.prepare_state(without_optimizer(state))
    runner = EpochRunner(state, source, 0, source.batch_size, strategy, 1, shuffle=False, mode="predict",
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
        train: an ``ArrayDataset`` or any re-iterable of batches (see the module docstring),
            checked once before the first step (:meth:`Source.check`).
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
    train = prepare_source(state, train, "training set", batch_size, strategy, on_device=on_device)
    per_epoch = train.steps_per_epoch(accumulate)
    start_epoch = int(state.step) // per_epoch if train.arrays else 0
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
        result = EpochResult(epoch, summarize(stacked), time.perf_counter() - t0, jax.tree.map(np.asarray, stacked))
        if bar is not None:
            bar.close()
        results.append(result)
        if on_epoch:
            on_epoch(result)
    return state, results

"""Data parallelism behind one switch: ``single``, ``pmap``, ``sharded`` or ``fsdp``; multi-process setup.

Every pmap / sharding / multi-host line of jaxlight lives in this module.

Every strategy computes the same thing as one device on the whole global batch:

- The global batch of ``B`` examples is cut into ``n`` contiguous slices of ``B / n`` rows,
  slice ``d`` on device ``d`` (``B`` must divide by ``n``: :class:`ParallelError` otherwise).
- Both run the one pure step, ``jaxlight.step.apply_step`` (``apply_train_step``, or the
  state's own ``step_fn``). ``sharded`` (the core path,
  in the style of current JAX) jits it over a ``Mesh`` with the batch split by a
  ``NamedSharding``: the program is the single-device program on global arrays, and XLA's
  partitioner inserts the all-reduces. ``pmap`` maps it with ``axis_name``: each device runs
  its rows and every reduction (the masked means, the gradient, BatchNorm's statistics) is
  ``psum``-ed over the devices. Both give one device's result on the global batch.
- The gradient is the mean over the *real* examples of the global batch. On the padded last
  batch the devices hold different numbers of real examples (the padding sits at the end, so
  the last devices may hold none); sums weighted by each device's real rows keep that exact.
- BatchNorm sees global-batch statistics over the real rows under both, equal to one device's.
- Dropout draws the same masks as one device: the keys depend on the step only; ``sharded``'s
  random bits do not depend on the sharding, and under ``pmap`` each device draws the global
  batch's mask and keeps its own rows (``jaxlight.step``).
- Metrics are example-weighted means over every device, ``count`` the global number of real
  examples, exactly the dict a single-device step returns.
- Under ``pmap`` and ``sharded`` parameters, optimizer state, step and keys stay replicated.
  ``fsdp`` (:class:`Fsdp`) runs ``sharded``'s programs with every array of the state that can
  be split (parameters, optimizer state, BatchNorm statistics) split over the devices along
  its largest dimension divisible by their number (:func:`fsdp_spec`), so each device holds
  about ``1/n`` of it; XLA gathers what a step needs. Scalars (``step``, the optimizer's
  count) and keys stay replicated.

The state layouts: under ``pmap`` and ``sharded`` every leaf of the ``TrainState`` is a
replicated ``jax.Array`` (``NamedSharding(mesh, P())``, no leading device axis). ``jax.jit``
takes it as it is and ``jax.pmap`` takes it with ``in_axes=None`` and returns it with
``out_axes=None`` (both are free: no copy, measured on jax 0.10.2). Under ``fsdp`` each leaf is
a ``jax.Array`` with the ``NamedSharding`` that :meth:`Strategy.state_shardings` names. In
every layout the leaves are global arrays of the single-device shapes, so ``int(state.step)``,
``state.rng`` and checkpointing read the same under every strategy, and a state moves between
strategies and device counts with :func:`shard_state` / :func:`to_host_state`.

The dataset, when it lives on the devices (the fused path), is replicated too: each step
gathers its batch from it by index, on every device, with no host transfer.

Multi-process (several hosts, or several processes on one host): call :func:`initialize` first;
the mesh then spans every process's devices and each process feeds only its own rows of each
global batch (:meth:`Strategy.iterate_batches`), built into global arrays with
``jax.make_array_from_process_local_data``. See ``the README`` and ``jaxlight.launch``.

Example (over every device there is; ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
gives a CPU 8 of them):
    >>> from flax import nnx
    >>> from jaxlight import create_train_state, loop, optim, parallel, tasks
    >>> from jaxlight.data import make_regression
    >>> from jaxlight.models import LinearRegression
    >>> data = make_regression(n_train=256, n_test=64, seed=0)
    >>> state = create_train_state(LinearRegression(8, rngs=nnx.Rngs(0)), optim.adam(0.1), tasks.regression())
    >>> strategy = parallel.make_strategy("sharded")
    >>> state, history = loop.fit(state, data.train, 2, 64, strategy=strategy)
    >>> int(state.step), sorted(history[-1].metrics)
    (8, ['count', 'loss', 'mse'])
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlight import step as _step
from jaxlight.data.arrays import ArrayDataset, host_batch_indices
from jaxlight.data.stream import pad_batch
from jaxlight.state import TrainState

__all__ = [
    "AXIS",
    "STRATEGIES",
    "ParallelError",
    "Strategy",
    "SingleDevice",
    "Pmap",
    "Sharded",
    "Fsdp",
    "fsdp_spec",
    "make_strategy",
    "get_strategy",
    "select_devices",
    "to_host_state",
    "shard_state",
    "layout_of",
    "initialize",
    "is_multiprocess",
    "barrier",
    "any_process",
    "as_global_array",
]

AXIS = "data"
"""The mesh axis (and pmap axis name) the batch is split over."""

STRATEGIES = ("single", "pmap", "sharded", "fsdp")

# Environment the launcher (jaxlight.launch) sets for each process it starts.
ENV_COORDINATOR = "JAXLIGHT_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLIGHT_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLIGHT_PROCESS_ID"


class ParallelError(ValueError):
    """A device count, batch size or strategy that cannot work; raised before XLA runs."""


# --------------------------------------------------------------------------------------------
# Devices and processes


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def select_devices(count: int | None = None) -> tuple:
    """The first ``count`` devices (default: all of them, across every process).

    Raises:
        ParallelError: ``count`` is not positive, exceeds the devices that exist, or (in a
            multi-process run) is not all of them: every process must own part of the mesh.
    """
    available = jax.devices()
    if count is None:
        return tuple(available)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ParallelError(f"devices must be a positive integer, got {count!r}")
    if count > len(available):
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (f"; on the CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={count} "
                    f"before jax is imported to get {count} fake devices")
        raise ParallelError(f"asked for {count} devices but only {len(available)} "
                            f"{jax.default_backend()} device(s) exist{hint}")
    if is_multiprocess() and count != len(available):
        raise ParallelError(f"asked for {count} of the {len(available)} devices of a "
                            f"{jax.process_count()}-process run; a multi-process run uses all "
                            f"of them (leave devices unset)")
    return tuple(available[:count])


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 10,
               initialization_timeout: int = 120) -> None:
    """Join a multi-process run (``jax.distributed.initialize``), before any other jax call.

    Arguments left None are read from ``JAXLIGHT_COORDINATOR`` / ``JAXLIGHT_NUM_PROCESSES`` /
    ``JAXLIGHT_PROCESS_ID`` (what ``jaxlight.launch`` sets); when those are unset too, JAX
    detects the cluster itself (SLURM, Open MPI, Cloud TPU pods, GKE).

    ``heartbeat_timeout_seconds`` bounds how long the survivors wait when a process dies: the
    coordination service notices the missing heartbeats and terminates every other process
    with "the JAX distributed service detected fatal errors ... another task died" instead of
    leaving it blocked in a collective. JAX's default is 100 s; 10 s suits one machine (raise
    it on clusters with long pauses, e.g. big checkpoints).

    On the CPU the collectives go over gloo (jax 0.10.2's default
    ``jax_cpu_collectives_implementation``; set here explicitly for older versions).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover - a jax without the option (GPU/TPU-only builds)
        pass
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                               initialization_timeout=initialization_timeout)


def barrier(name: str) -> None:
    """Wait until every process of a multi-process run gets here (a no-op in one process).

    ``name`` must be the same in every process and differ between barriers. A process that died
    is noticed by the coordination service (see :func:`initialize`'s heartbeat timeout).
    """
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True in every process when ``flag`` is True in any (a no-op in one process): for
    decisions that must be the same everywhere, such as stopping on a signal one process got."""
    if not is_multiprocess():
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def _put_global(x, sharding: NamedSharding):
    """``jax.device_put`` that also works when the mesh spans processes (every process passes
    the same full value; each keeps the pieces its own devices hold)."""
    if not is_multiprocess():
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = _put_global(jax.random.key_data(x), sharding)
        return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)(data)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# --------------------------------------------------------------------------------------------
# State layout and conversion


def as_global_array(a):
    """``a`` as an array over every process's devices, the form a multi-process checkpoint
    writes. An array that already spans processes is returned as it is; a host-local replicated
    one (``pmap``'s state in a multi-process run: each process holds the whole value on its own
    devices) becomes the same value replicated over all devices, with no copy between hosts."""
    if not is_multiprocess() or not isinstance(a, jax.Array) or not a.is_fully_addressable:
        return a
    if not a.is_fully_replicated:
        raise ParallelError(f"cannot make a global array of a host-local array that is not replicated "
                            f"(shape {a.shape}, sharding {a.sharding})")
    sharding = NamedSharding(Mesh(np.array(jax.devices()), (AXIS,)), P())
    mine = {s.device: s.data for s in a.addressable_shards}
    first = a.addressable_shards[0].data
    local = [mine[d] if d in mine else jax.device_put(first, d) for d in sharding.addressable_devices]
    return jax.make_array_from_single_device_arrays(a.shape, sharding, local)



def layout_of(state: TrainState) -> str:
    """``"single"`` when the state lives on one device, ``"replicated"`` when it is replicated
    over several (the layout of both ``pmap`` and ``sharded``), ``"fsdp"`` when some leaf is
    split over several (:class:`Fsdp`), ``"host"`` for numpy arrays (``jax.device_get`` of a
    state)."""
    if not isinstance(state.step, jax.Array):
        return "host"
    if len(state.step.sharding.device_set) == 1:
        return "single"
    split = any(isinstance(a, jax.Array) and not a.is_fully_replicated for a in jax.tree.leaves(state))
    return "fsdp" if split else "replicated"


def _local_copy(a, device):
    """The whole of ``a`` on ``device``: a copy of one shard when every device holds all of it,
    else the shards gathered (in a multi-process run through an all-gather that every process
    must reach in the same order, as it does in :func:`to_host_state`)."""
    if not isinstance(a, jax.Array):
        return a
    if not a.is_fully_replicated:
        if a.is_fully_addressable:
            return jax.device_put(a, device)
        mesh = getattr(a.sharding, "mesh", None)
        if mesh is None:  # pragma: no cover - jaxlight's layouts are NamedShardings
            raise ParallelError(f"cannot gather an array with sharding {a.sharding}")
        a = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))(a)
    return jax.device_put(a.addressable_shards[0].data, device)


def to_host_state(state: TrainState, device: jax.Device | None = None) -> TrainState:
    """The plain single-device state that ``create_train_state`` gives, from any layout.

    In a multi-process run each process gets its own (identical) copy on its first local
    device. (A checkpoint does not go through it: each array is saved from where it lives and
    restored into ``state_shardings``.)

    Args:
        state: a state in any layout (single, replicated by ``pmap`` / ``sharded``, split by
            ``fsdp``: its shards are gathered, so the whole state must fit ``device``; in a
            multi-process run every process must call this).
        device: where to put it (default: this process's first device).
    """
    device = device or jax.local_devices()[0]
    return jax.tree.map(lambda a: _local_copy(a, device), state)


def shard_state(state: TrainState, strategy: "Strategy | str", devices=None) -> TrainState:
    """Lay ``state`` out for ``strategy`` (a name, with ``devices`` a count, or a Strategy).

    Works from any layout: 8 devices -> 1, 2, 4 and back, ``pmap`` <-> ``sharded`` <-> ``fsdp``.
    """
    strategy = get_strategy(strategy, devices)
    return strategy.prepare_state(to_host_state(state))


# --------------------------------------------------------------------------------------------
# Strategies


@dataclass(frozen=True, eq=False)
class Strategy:
    """How a step runs on the devices. The epoch runner and the Trainer call only these methods.

    Attributes:
        name: "single", "pmap", "sharded" or "fsdp".
        devices: the devices the batch is split over (all processes' in a multi-process run).

    The methods, in the order a training run calls them:

    - ``check_batch_size(B)``: raise :class:`ParallelError` unless ``B`` divides evenly.
    - ``prepare_state(state)``: the state in this strategy's layout (a no-op when it already is).
    - ``prepare_data(dataset)``: an ``ArrayDataset`` on the devices, for the fused path.
    - ``prepare_indices(idx, mask)``: an epoch's ``(num_batches, B)`` order, once per epoch.
    - ``train_chunk`` / ``eval_chunk``: K fused steps, the signature of ``jaxlight.step``'s
      (``unroll`` too: see ``jaxlight.step.needs_unroll``).
    - ``train_step(state, batch, mask)`` / ``eval_step`` / ``predict_step``: the host-streamed
      path; in a multi-process run each process passes only its own rows.
    - ``accumulated_chunk`` / ``train_window(state, window)``: the same two paths with gradient
      accumulation, one optimizer update per window of micro-batches
      (``jaxlight.step.apply_accumulated_step``); ``idx``/``mask`` are then
      ``(num_windows, A, B)`` (``jaxlight.data.windows``) and ``window`` a list of ``A``
      ``(batch, mask)`` pairs.
    - ``to_host_state(state)``: back to a plain single-device state;
      ``state_shardings(state)``: the target shardings to restore a checkpoint into.
    - ``lower_train_step(state, batch)``: ``train_step``'s program, lowered (memory analysis).
    """

    name: str
    devices: tuple = field(default=())

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, devices={self.num_devices})"

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.num_devices:
            raise ParallelError(
                f"global batch size {batch_size} does not divide over {self.num_devices} devices "
                f"({self.name}): pick a multiple of {self.num_devices}, e.g. "
                f"{max(self.num_devices, batch_size // self.num_devices * self.num_devices)}")

    def eval_batch_size(self, batch_size: int) -> int:
        """Evaluation batches round up to a multiple of the device count: the extra rows are
        masked padding, so the metrics do not change."""
        return -(-batch_size // self.num_devices) * self.num_devices

    def to_host_state(self, state: TrainState) -> TrainState:
        return to_host_state(state)

    def state_shardings(self, state: TrainState):
        """The sharding of every array leaf of ``state`` in this strategy's layout: what a
        checkpoint restore (e.g. Orbax's ``ArrayRestoreArgs(sharding=...)``) asks for to read a
        checkpoint straight into this layout, whatever layout wrote it."""
        return jax.tree.map(lambda _: self._state_sharding, state)

    def lower_train_step(self, state: TrainState, batch, mask=None) -> jax.stages.Lowered:
        """The program :meth:`train_step` runs for this state and batch, lowered, not run:
        ``.compile().memory_analysis()`` gives its argument, output and temporary bytes per
        device, ``.as_text()`` its HLO with the collectives XLA inserted."""
        raise ParallelError(f"lower_train_step is not available for {self.name}")

    def process_rows(self, batch_size: int) -> slice:
        """The rows of a global batch that this process feeds (all of them in one process)."""
        return slice(0, batch_size)

    def iterate_batches(self, data: ArrayDataset, batch_size: int, key: jax.Array | None,
                        start: int = 0) -> Iterator[tuple]:
        """This process's part of each global batch, gathered from host memory: ``(batch, mask)``.

        Same order as :func:`jaxlight.data.iterate_batches` (``key=None``: stored order), from
        batch ``start`` on (a resumed epoch reads nothing before it). Only the rows this process
        feeds are read from ``data``, so a leaf can be a ``numpy.memmap`` of a dataset bigger
        than memory.
        """
        n = len(data)
        idx, mask = host_batch_indices(key if key is not None else jax.random.key(0), n, batch_size,
                                       key is not None)
        rows = self.process_rows(batch_size)
        for bi, bm in zip(idx[start:, rows], mask[start:, rows]):
            yield jax.tree.map(lambda a: a[bi], data.data), bm

    def _checked(self, state, batch, mask, labels: bool = True, pad: bool = False):
        """``(state, batch, mask)`` checked and placed. ``pad`` (evaluation, prediction): a batch
        whose rows do not divide over the devices is padded as an ``ArrayDataset``'s last batch
        is (copies of its first row, mask 0), in a single-process run; training refuses it."""
        _step.check_not_donated(state)
        batch, mask = _step.check_batch(state, batch, mask, labels=labels)
        if pad and not is_multiprocess() and len(mask) % self.num_devices:
            size = -(-len(mask) // self.num_devices) * self.num_devices
            batch = pad_batch(batch, size)[0]
            mask = np.concatenate([np.asarray(mask, np.float32), np.zeros(size - len(mask), np.float32)])
        self.check_batch_size(len(mask) * jax.process_count())
        return self.prepare_state(state), batch, mask

    def _checked_window(self, state, window):
        """Each micro-batch checked as :meth:`train_step` checks a batch, then stacked to
        ``(A, B, ...)`` and masks ``(A, B)``."""
        if not window:
            raise _step.BatchError("a gradient-accumulation window holds no micro-batches")
        pairs = [self._checked(state, batch, mask)[1:] for batch, mask in window]
        batches = jax.tree.map(lambda *m: np.stack([np.asarray(a) for a in m]), *[b for b, _ in pairs])
        masks = np.stack([np.asarray(m, np.float32) for _, m in pairs])
        return self.prepare_state(state), batches, masks


@dataclass(frozen=True, eq=False, repr=False)
class SingleDevice(Strategy):
    """The jitted steps of ``jaxlight.step`` on one device."""

    name: str = "single"

    @property
    def _state_sharding(self):
        return jax.sharding.SingleDeviceSharding(self.devices[0])

    def prepare_state(self, state: TrainState) -> TrainState:
        device, layout = self.devices[0], layout_of(state)
        if layout == "host":
            return jax.device_put(state, device)
        if layout == "single" and state.step.sharding.device_set == {device}:
            if state.step.committed:
                return state
            # create_train_state's arrays are uncommitted, the step's outputs committed: a
            # different jit cache key, so without this the second epoch compiles again.
            return jax.device_put(state, device)
        return to_host_state(state, device)

    def prepare_data(self, data: ArrayDataset) -> ArrayDataset:
        leaves = jax.tree.leaves(data.data)
        if all(isinstance(a, jax.Array) and a.sharding.device_set == {self.devices[0]} for a in leaves):
            return data
        return data.to_device(self.devices[0])

    def prepare_indices(self, idx, mask):
        return jax.device_put((idx, mask), self.devices[0])

    def train_chunk(self, state, data, idx, mask, steps: int, start=0, unroll: bool = False):
        return _step.train_chunk(state, data, idx, mask, steps, start, unroll=unroll)

    def eval_chunk(self, state, data, idx, mask, steps: int, start=0):
        return _step.eval_chunk(state, data, idx, mask, steps, start)

    def train_step(self, state, batch, mask=None):
        return _step.train_step(state, batch, mask)

    def lower_train_step(self, state, batch, mask=None):
        state = self.prepare_state(state)
        return _step._train_step_jit.lower(state, *_step.check_batch(state, batch, mask))

    def accumulated_chunk(self, state, data, idx, mask, steps: int, start=0, unroll: bool = False):
        return _step.accumulated_chunk(state, data, idx, mask, steps, start, unroll=unroll)

    def train_window(self, state, window, unroll: bool = False):
        state, batches, masks = self._checked_window(state, window)
        return _step.accumulated_step(state, batches, masks, unroll=unroll)

    def eval_step(self, state, batch, mask=None):
        return _step.eval_step(state, batch, mask)

    def predict_step(self, state, batch, mask=None, predict_fn=None):
        return _step.predict_step(state, batch, mask, predict_fn)


@dataclass(frozen=True, eq=False, repr=False)
class _Replicated(Strategy):
    """What ``pmap`` and ``sharded`` share: a 1-D mesh, replicated state and data."""

    @functools.cached_property
    def mesh(self) -> Mesh:
        return Mesh(np.array(self.devices), (AXIS,))

    @functools.cached_property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @functools.cached_property
    def batch_sharding(self) -> NamedSharding:
        """A batch's leading axis split over the devices."""
        return NamedSharding(self.mesh, P(AXIS))

    @property
    def _state_sharding(self):
        return self.replicated

    def _is_replicated(self, a) -> bool:
        # ``committed`` too: on a 1-device mesh a fresh state's uncommitted arrays are
        # "equivalent" to the replicated layout, but jit keys its cache on commitment, so the
        # second epoch (fed the committed outputs of the first) would compile everything again.
        return (isinstance(a, jax.Array) and a.committed
                and (a.sharding == self.replicated or a.sharding.is_equivalent_to(self.replicated, a.ndim)))

    def prepare_state(self, state: TrainState) -> TrainState:
        # Every leaf: an ``fsdp`` state has a replicated step but split parameters.
        if all(self._is_replicated(a) for a in jax.tree.leaves(state)):
            return state
        if layout_of(state) != "single":
            state = to_host_state(state)
        return jax.tree.map(lambda a: _put_global(a, self.replicated), state)

    def prepare_data(self, data: ArrayDataset) -> ArrayDataset:
        if all(self._is_replicated(a) for a in jax.tree.leaves(data.data)):
            return data
        host = lambda a: a if not isinstance(a, jax.Array) else _local_copy(a, jax.local_devices()[0])  # noqa: E731
        return ArrayDataset(jax.tree.map(lambda a: _put_global(host(a), self.replicated), data.data))

    def process_rows(self, batch_size: int) -> slice:
        if not is_multiprocess():
            return slice(0, batch_size)
        # Which rows of a (B,) array this process's devices hold under the batch sharding.
        index_map = self.batch_sharding.addressable_devices_indices_map((batch_size,))
        starts = sorted(ix[0].start or 0 for ix in index_map.values())
        stops = sorted(ix[0].stop if ix[0].stop is not None else batch_size for ix in index_map.values())
        if any(b != a for a, b in zip(stops[:-1], starts[1:])):
            raise ParallelError("this process's devices do not hold one contiguous block of the "
                                "batch; order the devices by process")
        return slice(starts[0], stops[-1])

    def _place_batch(self, batch, mask, sharding=None):
        """This process's rows -> global arrays split over the mesh."""
        sharding = sharding or self.batch_sharding
        local = (jax.tree.map(np.asarray, batch), np.asarray(mask, np.float32))
        if is_multiprocess():
            return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), local)
        return jax.device_put(local, sharding)

    @functools.cached_property
    def window_sharding(self) -> NamedSharding:
        """A window's ``(A, B, ...)`` micro-batches, each one's rows split over the devices."""
        return NamedSharding(self.mesh, P(None, AXIS))

    def train_window(self, state, window, unroll: bool = False):
        state, batches, masks = self._checked_window(state, window)
        return self._window_step(unroll)(state, *self._place_batch(batches, masks, self.window_sharding))

    def train_step(self, state, batch, mask=None):
        state, batch, mask = self._checked(state, batch, mask)
        return self._train_step(state, *self._place_batch(batch, mask))

    def eval_step(self, state, batch, mask=None):
        state, batch, mask = self._checked(state, batch, mask, pad=True)
        return self._eval_step(state, *self._place_batch(batch, mask))

    def predict_step(self, state, batch, mask=None, predict_fn=None):
        """The global batch's outputs (every process gets all of them); a batch padded to divide
        over the devices gives its own rows back."""
        rows = len(jax.tree.leaves(batch)[0])
        state, batch, mask = self._checked(state, batch, mask, labels=False, pad=True)
        outputs = self._predict_step(predict_fn)(state, *self._place_batch(batch, mask))
        if len(mask) != rows:
            outputs = jax.tree.map(lambda a: a[:rows], outputs)
        if is_multiprocess():
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(outputs, tiled=True)
        return outputs

    def prepare_indices(self, idx, mask):
        """``(num_batches, B)`` (or windows ``(num_windows, A, B)``) -> each batch's columns
        split over the devices."""
        self.check_batch_size(idx.shape[-1])
        sharding = NamedSharding(self.mesh, P(*([None] * (idx.ndim - 1)), AXIS))
        return _put_global(np.asarray(idx), sharding), _put_global(np.asarray(mask), sharding)


@dataclass(frozen=True, eq=False, repr=False)
class Pmap(_Replicated):
    """``jax.pmap`` of the one pure step over the devices, with ``axis_name``.

    The state goes in with ``in_axes=None`` and comes out with ``out_axes=None`` (it is
    replicated; the step's ``psum``-ed reductions keep it so), the batch goes in split on its
    leading axis. Since JAX 0.8 ``pmap`` is in maintenance mode and is itself built on ``jit``
    + ``shard_map``; it is here for code written against it and as a cross-check of ``sharded``.
    """

    name: str = "pmap"

    def _pmap(self, fn, in_axes, donate=(), evaluation: bool = False, out_axes=None):
        """``fn`` pmapped over the devices, its programs kept per state configuration
        (``jaxlight.step.Compiled``)."""
        make = functools.partial(jax.pmap, axis_name=AXIS, devices=self.devices, in_axes=in_axes,
                                 out_axes=out_axes, donate_argnums=donate)
        return _step.Compiled(fn, make, evaluation)

    @functools.cached_property
    def _train_step(self):
        step = self._pmap(functools.partial(_step.apply_step, axis_name=AXIS), (None, 0, 0), donate=(0,))
        return lambda state, batch, mask: step(state, *self._split((batch, mask)))

    @functools.cached_property
    def _eval_step(self):
        step = self._pmap(functools.partial(_step.apply_eval_step, axis_name=AXIS), (None, 0, 0), evaluation=True)
        return lambda state, batch, mask: step(state, *self._split((batch, mask)))

    def _predict_step(self, predict_fn):
        programs = self._chunk_programs
        if ("predict", predict_fn) not in programs:
            fn = functools.partial(_step.apply_predict, axis_name=AXIS, predict_fn=predict_fn)
            step = self._pmap(fn, (None, 0, 0), evaluation=True, out_axes=0)
            # (n, B/n, ...) per device -> (B, ...): device d held row block d.
            programs[("predict", predict_fn)] = lambda state, batch, mask: jax.tree.map(
                lambda a: a.reshape((-1,) + a.shape[2:]), step(state, *self._split((batch, mask))))
        return programs[("predict", predict_fn)]

    @functools.lru_cache(maxsize=None)
    def _window_step(self, unroll: bool):
        step = self._pmap(functools.partial(_step.apply_accumulated_step, axis_name=AXIS, unroll=unroll),
                          (None, 1, 1), donate=(0,))
        n = self.num_devices
        # (A, B, ...) -> (A, n, B/n, ...), mapped over axis 1: device d holds row block d of
        # every micro-batch.
        split = lambda a: a.reshape(a.shape[:1] + (n, a.shape[1] // n) + a.shape[2:])  # noqa: E731
        return lambda state, batches, masks: step(state, *jax.tree.map(split, (batches, masks)))

    def _split(self, tree):
        # (B, ...) split over the mesh -> (n, B/n, ...), device d holding row block d: the
        # same rows the sharded strategy gives it (the reshape of a sharded array is free).
        n = self.num_devices
        return jax.tree.map(lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:]), tree)

    @functools.cached_property
    def _chunk_programs(self) -> dict:
        """One pmapped program per (train|eval, K): K is a Python constant of the scan."""
        return {}

    def _program(self, kind: str, steps: int, unroll: bool = False):
        key = (kind, steps, unroll)
        if key not in self._chunk_programs:
            if kind in ("train", "accumulate"):
                body = (functools.partial(_step.apply_step, axis_name=AXIS) if kind == "train" else
                        functools.partial(_step.apply_accumulated_step, axis_name=AXIS, unroll=unroll))
                fn = lambda state, data, idx, mask, start: _step.chunk(  # noqa: E731
                    body, state, data, idx, mask, start, steps, unroll)
                self._chunk_programs[key] = self._pmap(fn, (None, None, 0, 0, None), donate=(0,))
            else:
                body = _step._eval_body(functools.partial(_step.apply_eval_step, axis_name=AXIS))
                fn = lambda state, data, idx, mask, start: _step.chunk(  # noqa: E731
                    body, state, data, idx, mask, start, steps)[1]
                self._chunk_programs[key] = self._pmap(fn, (None, None, 0, 0, None), evaluation=True)
        return self._chunk_programs[key]

    def prepare_indices(self, idx, mask):
        """``(num_batches, B)`` -> ``(n, num_batches, B/n)``: device d's columns of each batch
        (windows ``(num_windows, A, B)`` -> ``(n, num_windows, A, B/n)``)."""
        self.check_batch_size(idx.shape[-1])
        n = self.num_devices

        def split(a):
            a = np.asarray(a)
            return np.ascontiguousarray(np.moveaxis(a.reshape(a.shape[:-1] + (n, a.shape[-1] // n)), -2, 0))

        return (_put_global(split(idx), self.batch_sharding), _put_global(split(mask), self.batch_sharding))

    def train_chunk(self, state, data, idx, mask, steps: int, start=0, unroll: bool = False):
        """K fused steps; ``idx``/``mask`` from :meth:`prepare_indices`. Metrics ``(steps,)``."""
        return self._program("train", steps, unroll)(state, data, idx, mask, start)

    def accumulated_chunk(self, state, data, idx, mask, steps: int, start=0, unroll: bool = False):
        """K fused windows (``idx``/``mask`` windows from :meth:`prepare_indices`)."""
        return self._program("accumulate", steps, unroll)(state, data, idx, mask, start)

    def eval_chunk(self, state, data, idx, mask, steps: int, start=0):
        return self._program("eval", steps)(state, data, idx, mask, start)


@dataclass(frozen=True, eq=False, repr=False)
class Sharded(_Replicated):
    """``jax.jit`` of the one pure step over a 1-D ``Mesh``: the state replicated
    (``NamedSharding(mesh, P())``), the batch split on its leading axis (``P("data")``); XLA's
    SPMD partitioner inserts the all-reduces. The program is the single-device program on global
    arrays, so the padded last batch, BatchNorm and dropout need no special case."""

    name: str = "sharded"

    @property
    def _state_out(self):
        """The training programs' ``out_shardings`` for the state: one sharding for every leaf
        here; :class:`Fsdp` pins each leaf inside the program instead (:meth:`_pinned`)."""
        return self.replicated

    def _pinned(self, step_fn):
        """``step_fn(state, ...) -> (state, out)`` with the new state laid out as this strategy
        keeps it (here ``out_shardings`` does that already)."""
        return step_fn

    def _constrain(self, tree):
        # The gather from the replicated dataset would leave the batch's layout to XLA; pin it
        # to the batch split so each device computes only its rows.
        return jax.lax.with_sharding_constraint(tree, self.batch_sharding)

    def _jit_train(self, fn, **kwargs):
        """A training program: state donated, ``(state, metrics)`` out in this layout (kept per
        state configuration: ``jaxlight.step.Compiled``)."""
        return _step.Compiled(fn, jax.jit, out_shardings=(self._state_out, self.replicated), donate_argnums=0,
                              **kwargs)

    @functools.cached_property
    def _train_step(self):
        return self._jit_train(self._pinned(_step.apply_step))

    @functools.cached_property
    def _eval_step(self):
        return _step.Compiled(_step.apply_eval_step, jax.jit, evaluation=True, out_shardings=self.replicated)

    def _constrain_window(self, tree):
        return jax.lax.with_sharding_constraint(tree, self.window_sharding)

    @functools.lru_cache(maxsize=None)
    def _window_step(self, unroll: bool):
        return self._jit_train(self._pinned(functools.partial(_step.apply_accumulated_step, unroll=unroll)))

    @functools.cached_property
    def _accumulated_chunk_jit(self):
        def fn(state, data, idx, mask, start, steps, unroll):
            body = self._pinned(functools.partial(_step.apply_accumulated_step, unroll=unroll))
            return _step.chunk(body, state, data, idx, mask, start, steps, unroll, self._constrain_window)
        return self._jit_train(fn, static_argnums=(5, 6))

    @functools.cached_property
    def _predict_jit(self):
        return _step.Compiled(_step.apply_predict, jax.jit, evaluation=True,
                              static_argnames=("axis_name", "predict_fn", "train"))

    def _predict_step(self, predict_fn):
        return lambda state, batch, mask: self._predict_jit(state, batch, mask, predict_fn=predict_fn)

    @functools.cached_property
    def _train_chunk_jit(self):
        # The argument order of ``jaxlight.step.train_chunk``; steps and unroll are static.
        fn = lambda state, data, idx, mask, steps, start, unroll: _step.chunk(  # noqa: E731
            self._pinned(_step.apply_step), state, data, idx, mask, start, steps, unroll, self._constrain)
        return self._jit_train(fn, static_argnums=(4, 6))

    @functools.cached_property
    def _eval_chunk_jit(self):
        body = _step._eval_body(_step.apply_eval_step)
        fn = lambda state, data, idx, mask, steps, start: _step.chunk(  # noqa: E731
            body, state, data, idx, mask, start, steps, False, self._constrain)[1]
        return _step.Compiled(fn, jax.jit, evaluation=True, static_argnums=4, out_shardings=self.replicated)

    def lower_train_step(self, state, batch, mask=None):
        state, batch, mask = self._checked(state, batch, mask)
        return self._train_step.lower(state, *self._place_batch(batch, mask))

    def train_chunk(self, state, data, idx, mask, steps: int, start=0, unroll: bool = False):
        """K fused steps; ``idx``/``mask`` from :meth:`prepare_indices`. Metrics ``(steps,)``."""
        return self._train_chunk_jit(state, data, idx, mask, steps, start, unroll)

    def accumulated_chunk(self, state, data, idx, mask, steps: int, start=0, unroll: bool = False):
        """K fused windows (``idx``/``mask`` windows from :meth:`prepare_indices`)."""
        return self._accumulated_chunk_jit(state, data, idx, mask, start, steps, unroll)

    def eval_chunk(self, state, data, idx, mask, steps: int, start=0):
        return self._eval_chunk_jit(state, data, idx, mask, steps, start)


def fsdp_spec(shape: tuple, num_devices: int) -> P:
    """Where :class:`Fsdp` splits an array of ``shape`` over ``num_devices`` devices.

    Along the largest dimension whose size divides evenly by ``num_devices`` (the first of
    equal ones), so each device holds ``1/num_devices`` of the array as whole rows of that
    dimension; ``P()`` (replicated) when no dimension divides, and for scalars.

    Example:
        >>> [tuple(fsdp_spec(shape, 8)) for shape in [(784, 256), (10,), (10, 256)]]
        [('data',), (), (None, 'data')]
        >>> tuple(fsdp_spec((3, 3, 32, 64), 8))
        (None, None, None, 'data')
    """
    best = None
    for axis, size in enumerate(shape):
        if size > 0 and size % num_devices == 0 and (best is None or size > shape[best]):
            best = axis
    return P() if best is None else P(*([None] * best), AXIS)


@dataclass(frozen=True, eq=False, repr=False)
class Fsdp(Sharded):
    """``sharded`` with the state split over the devices too (fully sharded data parallelism).

    The batch is split as under ``sharded``, and so is every array of the ``TrainState`` that
    can be: parameters, the optimizer's moments and the model state (BatchNorm statistics)
    along the largest dimension whose size divides by the device count (:func:`fsdp_spec`).
    A device then holds ``1/n`` of the parameters and optimizer state (plus the few arrays no
    dimension of which divides, e.g. a bias of 10), which is what lets a model whose Adam state
    does not fit one device train at all. Scalars (``step``, Adam's count) and PRNG keys stay
    replicated.

    The programs are ``sharded``'s: ``jax.jit`` of the one pure step on global arrays, with
    each new state pinned to this layout (``with_sharding_constraint``) after every step, so it
    leaves a step as it entered and the compiled programs are reused. XLA's SPMD partitioner
    picks the collectives: it all-gathers a layer's parameters where the step uses them, or
    keeps them split and gathers the (smaller) activations instead. The arithmetic is one
    device's on the global batch; only the order of the float32 sums can differ (a matmul
    contracting a split dimension sums partial products across devices), as under ``sharded``.
    """

    name: str = "fsdp"

    def state_shardings(self, state: TrainState):
        """Each leaf's ``NamedSharding(mesh, fsdp_spec(shape, n))`` (replicated for PRNG keys);
        works on arrays and on ``jax.ShapeDtypeStruct`` leaves alike."""
        def sharding(a):
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
                return self.replicated
            return NamedSharding(self.mesh, fsdp_spec(np.shape(a), self.num_devices))
        return jax.tree.map(sharding, state)

    @property
    def _state_out(self):
        return None  # (unspecified: the state is pinned leaf by leaf inside the program)

    def _pinned(self, step_fn):
        def pinned(state, *args):
            state, out = step_fn(state, *args)
            return jax.lax.with_sharding_constraint(state, self.state_shardings(state)), out
        return pinned

    def _in_layout(self, state, shardings) -> bool:
        return all(isinstance(a, jax.Array) and a.committed and (a.sharding == s or a.sharding.is_equivalent_to(s, a.ndim))
                   for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True))

    def prepare_state(self, state: TrainState) -> TrainState:
        """``state`` from any layout (host, single, replicated, another ``fsdp``) split over
        this mesh. In one process each leaf is resharded by ``jax.device_put``, device to
        device; in several, a leaf that spans processes is resharded by a jitted identity and
        a local or host leaf is cut from its full value on every process."""
        shardings = self.state_shardings(state)
        if self._in_layout(state, shardings):
            return state

        def place(a, sharding):
            if isinstance(a, jax.Array) and not a.is_fully_addressable:
                return jax.jit(lambda x: x, out_shardings=sharding)(a)
            if is_multiprocess() and isinstance(a, jax.Array):
                a = _local_copy(a, jax.local_devices()[0])
            return _put_global(a, sharding)

        return jax.tree.map(place, state, shardings)


_CLASSES = {"single": SingleDevice, "pmap": Pmap, "sharded": Sharded, "fsdp": Fsdp}


@functools.lru_cache(maxsize=None)
def _cached_strategy(name: str, devices: tuple) -> Strategy:
    return _CLASSES[name](name=name, devices=devices)


def make_strategy(name: str = "single", devices: int | None = None) -> Strategy:
    """A strategy by name over the first ``devices`` devices.

    Args:
        name: "single", "pmap", "sharded" or "fsdp".
        devices: how many devices; default 1 for "single" and all of them otherwise.

    Raises:
        ParallelError: an unknown name, ``single`` with more than one device, or more devices
            than exist.

    Strategies are cached per (name, devices), so their compiled steps are reused.
    """
    if name not in _CLASSES:
        raise ParallelError(f"unknown strategy {name!r}; choose one of {list(STRATEGIES)}")
    if name == "single":
        if devices not in (None, 1):
            raise ParallelError(f"the single strategy runs on 1 device, got devices={devices}; "
                                f"use pmap, sharded or fsdp for more")
        if is_multiprocess():
            raise ParallelError("the single strategy cannot run in a multi-process run; use sharded or fsdp")
        return _cached_strategy(name, select_devices(1))
    return _cached_strategy(name, select_devices(devices))


def get_strategy(strategy: Strategy | str | None = None, devices: int | None = None) -> Strategy:
    """``None`` -> single device (today's behaviour); a name -> :func:`make_strategy`."""
    if isinstance(strategy, Strategy):
        if devices is not None and devices != strategy.num_devices:
            raise ParallelError(f"{strategy!r} runs on {strategy.num_devices} devices, not {devices}")
        return strategy
    return make_strategy(strategy or "single", devices)

"""In-memory datasets, the seeded train/validation split, and batching on the device.

The data order is a contract shared by every path (fused epoch, per-step loop, host
streaming, and the PyTorch reference through :func:`epoch_order`): epoch ``e`` of a run whose
data key is ``k`` visits the examples in the order ``jax.random.permutation(fold_in(k, e), N)``,
cut into batches of ``batch_size``. The last partial batch is **padded, not dropped**: it is
filled with copies of that batch's first example whose ``mask`` is 0, so losses and metrics average over the real
examples only (``jaxlight.data.stream.pad_batch`` is the same rule for batches from an
iterable). Every batch then has the same shape (one compiled program for the whole run)
and an epoch sees every example exactly once, as PyTorch's ``DataLoader(drop_last=False)`` does.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlight.tasks import prepare_x  # noqa: F401  (re-exported: part of the data API)

__all__ = [
    "ArrayDataset",
    "batch_indices",
    "host_batch_indices",
    "data_key",
    "windows",
    "epoch_order",
    "prepare_x",
    "num_batches",
    "gather_batch",
    "iterate_batches",
    "iterate_masked",
]


# The stream folded into the run's seed for the data order (``jaxlight.state`` folds another
# for the model's randomness), so that changing one never changes the other.
_DATA_STREAM = 1


def data_key(seed: int) -> jax.Array:
    """The key from which each epoch's shuffle is drawn (``fold_in(data_key, epoch)``)."""
    return jax.random.fold_in(jax.random.key(seed), _DATA_STREAM)


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch, the last one padded: ``ceil(n / batch_size)``."""
    return -(-n // batch_size)


@functools.partial(jax.jit, static_argnums=1)
def _permutation(key: jax.Array, n: int) -> jax.Array:
    return jax.random.permutation(key, n)


def host_batch_indices(key: jax.Array, n: int, batch_size: int,
                       shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`batch_indices` as numpy arrays. Only the shuffle is a compiled program (one per
    dataset size); the stored order, the padding and the cut into batches are host arithmetic."""
    order = np.asarray(_permutation(key, n)) if shuffle else np.arange(n, dtype=np.int32)
    nb = num_batches(n, batch_size)
    pad = nb * batch_size - n
    # Padding repeats the last batch's first row, as ``stream.pad_batch`` does.
    fill = order[(nb - 1) * batch_size] if pad else 0
    idx = np.concatenate([order, np.full((pad,), fill, order.dtype)]).astype(np.int32)
    mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
    return idx.reshape(nb, batch_size), mask.reshape(nb, batch_size)


def batch_indices(key: jax.Array, n: int, batch_size: int, shuffle: bool = True) -> tuple[jax.Array, jax.Array]:
    """The example indices of one epoch, cut into padded batches.

    Args:
        key: the epoch's PRNG key (``fold_in(data_key, epoch)``).
        n: examples in the dataset.
        batch_size: examples per batch.
        shuffle: False keeps the stored order (evaluation).

    Returns:
        ``(idx, mask)``: ``idx (num_batches, batch_size) int32`` indices into the dataset and
        ``mask (num_batches, batch_size) float32``, 1 for real examples and 0 for the padding
        that fills the last batch (on the default device; :func:`host_batch_indices` gives
        them as numpy).
    """
    idx, mask = host_batch_indices(key, n, batch_size, shuffle)
    return jnp.asarray(idx), jnp.asarray(mask)


def windows(idx, mask, accumulate: int):
    """An epoch's batches grouped into windows of ``accumulate`` micro-batches (one optimizer
    update each, ``jaxlight.step.apply_accumulated_step``).

    A window never crosses the epoch's end: when the batches do not divide evenly, the last
    window is completed with all-padding micro-batches (index 0, mask 0), which add nothing to
    its gradient.

    Args:
        idx, mask: ``(num_batches, B)`` from :func:`batch_indices` (numpy or jax).
        accumulate: micro-batches per window.

    Returns:
        ``(idx, mask)`` of shape ``(ceil(num_batches / accumulate), accumulate, B)``.

    Example:
        >>> idx, mask = batch_indices(jax.random.key(0), 10, 4, False)
        >>> [a.shape for a in windows(idx, mask, 2)], windows(idx, mask, 2)[1].sum(axis=(1, 2)).tolist()
        ([(2, 2, 4), (2, 2, 4)], [8.0, 2.0])
    """
    xp = jnp if isinstance(idx, jax.Array) else np
    nb, b = idx.shape
    extra = num_batches(nb, accumulate) * accumulate - nb
    idx = xp.concatenate([idx, xp.zeros((extra, b), idx.dtype)])
    mask = xp.concatenate([mask, xp.zeros((extra, b), mask.dtype)])
    return idx.reshape(-1, accumulate, b), mask.reshape(-1, accumulate, b)


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The batches that a run started with ``seed`` sees in ``epoch``, as numpy.

    This is the one call that fixes the data order across frameworks: the PyTorch reference
    takes these indices so both see the same batches in the same order.

    Example:
        >>> idx, mask = epoch_order(seed=0, epoch=0, n=10, batch_size=4)
        >>> idx.shape, int(mask.sum())
        ((3, 4), 10)
    """
    key = jax.random.fold_in(data_key(seed), epoch)
    return host_batch_indices(key, n, batch_size, True)


def gather_batch(x, y, idx, mask) -> dict:
    """``{"x", "y", "mask"}`` rows of ``x``/``y`` (for the built-in tasks' batch dicts)."""
    return {"x": x[idx], "y": y[idx], "mask": mask}


class ArrayDataset:
    """Examples held in memory, on the host (numpy) or the device (jax): any pytree of arrays.

    ``ArrayDataset(pytree)`` holds a dict, tuple or nested structure of equally long arrays
    (``{"tokens": (N, T) int32, "mask": (N, T) bool, "label": (N,) int32}``); each batch is the
    same structure with ``B`` rows. ``ArrayDataset(x, y)`` is the shorthand for
    ``ArrayDataset({"x": x, "y": y})``, the built-in tasks' batch.

    Attributes:
        data: the pytree.
        x, y: ``data["x"]`` and ``data["y"]`` when ``data`` is such a dict.
    """

    def __init__(self, data, y=None):
        if y is not None:
            data = {"x": data, "y": y}
        flat = jax.tree_util.tree_flatten_with_path(data)[0]
        if not flat:
            raise ValueError(f"ArrayDataset: {type(data).__name__} holds no arrays")
        lengths = {}
        for path, leaf in flat:
            name = "data" + jax.tree_util.keystr(path)
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise ValueError(f"ArrayDataset: {name} is a {type(leaf).__name__}, not an array "
                                 f"(use numpy or jax arrays)")
            if leaf.ndim < 1:
                raise ValueError(f"ArrayDataset: {name} is a scalar; every leaf needs a leading example axis")
            lengths[name] = leaf.shape[0]
        if len(set(lengths.values())) > 1:
            if y is not None:
                raise ValueError(f"ArrayDataset: x has {len(data['x'])} examples but y has {len(data['y'])}")
            detail = ", ".join(f"{k} has {v}" for k, v in lengths.items())
            raise ValueError(f"ArrayDataset: every leaf must hold the same number of examples: {detail}")
        self.data = data
        self._len = next(iter(lengths.values()))

    def __repr__(self) -> str:
        leaves = jax.tree.map(lambda a: f"{tuple(a.shape)} {a.dtype}", self.data)
        return f"ArrayDataset({len(self)} examples: {leaves})"

    def __len__(self) -> int:
        return self._len

    @property
    def x(self):
        return self._key("x")

    @property
    def y(self):
        return self._key("y")

    def _key(self, name):
        if not isinstance(self.data, dict) or name not in self.data:
            raise AttributeError(f"this ArrayDataset holds {type(self.data).__name__}"
                                 + (f" with keys {sorted(self.data)}" if isinstance(self.data, dict) else "")
                                 + f", not a dict with {name!r}; use .data")
        return self.data[name]

    def map(self, fn) -> "ArrayDataset":
        """A dataset of ``fn(leaf)`` for every leaf."""
        return ArrayDataset(jax.tree.map(fn, self.data))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in jax.tree.leaves(self.data)))

    @property
    def on_device(self) -> bool:
        return all(isinstance(a, jax.Array) for a in jax.tree.leaves(self.data))

    def take(self, n: int) -> "ArrayDataset":
        """The first ``n`` examples (a quick subset)."""
        return self.map(lambda a: a[:n])

    def rows(self, idx) -> "ArrayDataset":
        """The examples at ``idx`` (host numpy)."""
        return self.map(lambda a: np.asarray(a)[idx])

    def split(self, val_fraction: float, seed: int = 0) -> tuple["ArrayDataset", "ArrayDataset"]:
        """Seeded train/validation split.

        The examples are permuted with ``numpy.random.default_rng(seed)``; the first
        ``round(val_fraction * N)`` of that permutation are the validation set and the rest,
        in their original relative order, the training set. The same seed gives the same split
        on every machine and in both frameworks.
        """
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = int(round(val_fraction * len(self)))
        perm = np.random.default_rng(seed).permutation(len(self))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        return self.rows(train_idx), self.rows(val_idx)

    def to_device(self, device: jax.Device | None = None) -> "ArrayDataset":
        """A copy whose arrays live on ``device`` (default: the first device)."""
        return ArrayDataset(jax.device_put(self.data, device))

    def fits_on_device(self, device: jax.Device | None = None, fraction: float = 0.25) -> bool:
        """Whether the arrays take at most ``fraction`` of the device's memory.

        Accelerators report their memory; the CPU backend does not, and its "device memory" is
        host RAM, so there the answer is yes below 4 GiB.
        """
        device = device or jax.devices()[0]
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        limit = (stats or {}).get("bytes_limit")
        if limit is None:
            return self.nbytes <= 4 << 30
        return self.nbytes <= fraction * limit

    def check_finite(self, name: str = "dataset") -> None:
        """Raise ``ValueError`` naming the first leaf and row that holds a NaN or an infinity.

        One pass over the floating leaves (integer leaves cannot hold either).
        """
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.data)[0]:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                continue
            finite = np.isfinite(np.asarray(leaf)).reshape(len(self), -1).all(axis=1)
            if not finite.all():
                row = int(np.argmin(finite))
                what = "a NaN" if np.isnan(np.asarray(leaf[row])).any() else "an infinity"
                raise ValueError(f"{name}: data{jax.tree_util.keystr(path)}[{row}] holds {what}")


def iterate_masked(
    data: ArrayDataset, batch_size: int, key: jax.Array | None
) -> Iterator[tuple]:
    """Host-side ``(batch, mask)`` pairs for data that does not fit on the device.

    Same order and padding as the device path (``key=None`` keeps the stored order). Each batch
    is gathered from host memory and then transferred, one batch at a time.
    """
    n = len(data)
    if key is None:
        idx, mask = host_batch_indices(jax.random.key(0), n, batch_size, False)
    else:
        idx, mask = host_batch_indices(key, n, batch_size, True)
    for bi, bm in zip(idx, mask):
        yield jax.tree.map(lambda a: a[bi], data.data), bm


def iterate_batches(
    data: ArrayDataset, batch_size: int, key: jax.Array | None
) -> Iterator[dict]:
    """:func:`iterate_masked` as batch dicts with the padding mask under ``"mask"`` (the built-in
    tasks' ``{"x", "y", "mask"}``); for datasets that are not dicts, or that have a ``"mask"`` of
    their own, use :func:`iterate_masked`."""
    if not isinstance(data.data, dict) or "mask" in data.data:
        raise ValueError("iterate_batches puts the padding mask under 'mask' in a batch dict; this dataset "
                         "is not a dict or has a 'mask' of its own: use iterate_masked, which yields (batch, mask)")
    for batch, mask in iterate_masked(data, batch_size, key):
        yield {**batch, "mask": mask}

"""In-memory datasets, the seeded train/validation split, and batching on the device.

The data order is a contract shared by every path (fused epoch, per-step loop, host
streaming, and the PyTorch reference through :func:`epoch_order`): epoch ``e`` of a run whose
data key is ``k`` visits the examples in the order ``jax.random.permutation(fold_in(k, e), N)``,
cut into batches of ``batch_size``. The last partial batch is **padded, not dropped**: it is
filled with copies of example 0 whose ``mask`` is 0, so losses and metrics average over the real
examples only. Every batch then has the same shape (one compiled program for the whole run)
and an epoch sees every example exactly once, as PyTorch's ``DataLoader(drop_last=False)`` does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ArrayDataset",
    "batch_indices",
    "epoch_order",
    "prepare_x",
    "num_batches",
    "gather_batch",
    "iterate_batches",
]


def prepare_x(x):
    """Images to the models' input: uint8 ``(B, 28, 28)`` -> float32 in [0, 1].

    Divides by 255 exactly as torchvision's ``ToTensor`` does (``x / 255``, not ``x * (1/255)``,
    which differs in the last bit), so both frameworks feed their models the same floats.
    Float inputs pass through as float32.
    """
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch, the last one padded: ``ceil(n / batch_size)``."""
    return -(-n // batch_size)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def batch_indices(key: jax.Array, n: int, batch_size: int, shuffle: bool = True):
    """The example indices of one epoch, cut into padded batches.

    Args:
        key: the epoch's PRNG key (``fold_in(data_key, epoch)``).
        n: examples in the dataset.
        batch_size: examples per batch.
        shuffle: False keeps the stored order (evaluation).

    Returns:
        ``(idx, mask)``: ``idx (num_batches, batch_size) int32`` indices into the dataset and
        ``mask (num_batches, batch_size) float32``, 1 for real examples and 0 for the padding
        that fills the last batch.
    """
    order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    nb = num_batches(n, batch_size)
    pad = nb * batch_size - n
    idx = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).astype(jnp.int32)
    mask = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
    return idx.reshape(nb, batch_size), mask.reshape(nb, batch_size)


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The batches that a run started with ``seed`` sees in ``epoch``, as numpy.

    This is the one call that fixes the data order across frameworks: the PyTorch reference
    takes these indices so both see the same batches in the same order.

    Example:
        >>> idx, mask = epoch_order(seed=0, epoch=0, n=10, batch_size=4)
        >>> idx.shape, int(mask.sum())
        ((3, 4), 10)
    """
    from jaxlight.state import data_key

    key = jax.random.fold_in(data_key(seed), epoch)
    idx, mask = batch_indices(key, n, batch_size, True)
    return np.asarray(idx), np.asarray(mask)


def gather_batch(x, y, idx, mask) -> dict:
    """The batch dict the steps take: ``{"x", "y", "mask"}`` (works on numpy and jax arrays)."""
    return {"x": x[idx], "y": y[idx], "mask": mask}


@dataclass(frozen=True)
class ArrayDataset:
    """Examples held in memory, on the host (numpy) or the device (jax).

    Attributes:
        x: ``(N, ...)`` inputs: uint8 ``(N, 28, 28)`` images, or float32 ``(N, D)`` features.
        y: ``(N,)`` int32 class labels, or float32 ``(N, D_out)`` regression targets.
    """

    x: np.ndarray | jax.Array
    y: np.ndarray | jax.Array

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise ValueError(
                f"ArrayDataset: x has {len(self.x)} examples but y has {len(self.y)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes + self.y.nbytes)

    def take(self, n: int) -> "ArrayDataset":
        """The first ``n`` examples (a quick subset)."""
        return ArrayDataset(self.x[:n], self.y[:n])

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
        x, y = np.asarray(self.x), np.asarray(self.y)
        return ArrayDataset(x[train_idx], y[train_idx]), ArrayDataset(x[val_idx], y[val_idx])

    def to_device(self, device: jax.Device | None = None) -> "ArrayDataset":
        """A copy whose arrays live on ``device`` (default: the first device)."""
        return ArrayDataset(jax.device_put(self.x, device), jax.device_put(self.y, device))

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


def iterate_batches(
    data: ArrayDataset, batch_size: int, key: jax.Array | None
) -> Iterator[dict]:
    """Host-side batches for data that does not fit on the device.

    Same order and padding as the device path (``key=None`` keeps the stored order). Each batch
    is gathered from host memory and then transferred, one batch at a time.
    """
    n = len(data)
    if key is None:
        idx, mask = batch_indices(jax.random.key(0), n, batch_size, False)
    else:
        idx, mask = batch_indices(key, n, batch_size, True)
    x, y = np.asarray(data.x), np.asarray(data.y)
    for bi, bm in zip(np.asarray(idx), np.asarray(mask)):
        yield gather_batch(x, y, bi, bm)

"""Host-streamed batches from any re-iterable: a generator factory, a ``torch.utils.data.DataLoader``,
a ``grain`` loader, a list.

:class:`Batches` turns what such a source yields into what the steps take: a pytree of numpy
arrays and a padding mask. The first batch fixes the structure (tree, trailing shapes, dtypes)
and the batch size ``B``; every later batch is checked against it (one cheap comparison, naming
the leaf that differs), and a shorter batch (a ``DataLoader``'s last one) is padded to ``B``
with copies of its first row whose mask is 0, so one compiled step serves the whole run and the
padding never counts as data.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from jaxlight.errors import BatchError

__all__ = ["Batches", "to_numpy", "pad_batch", "check_structure", "leaf_name"]


def leaf_name(path, where: str = "batch") -> str:
    """``batch['image']``, ``batch[0]``, ``batch.x`` for a pytree path."""
    return where + jax.tree_util.keystr(path)


def check_structure(batch, where: str = "batch") -> int:
    """Every leaf an array with the same leading (batch) size; returns that size."""
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not flat:
        raise BatchError(f"{where} holds no arrays ({type(batch).__name__})")
    size = None
    for path, leaf in flat:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise BatchError(f"{leaf_name(path, where)} must be an array, got {type(leaf).__name__}")
        if leaf.ndim < 1:
            raise BatchError(f"{leaf_name(path, where)} is a scalar; every leaf needs a leading batch axis")
        if size is None:
            size, first = leaf.shape[0], leaf_name(path, where)
        elif leaf.shape[0] != size:
            raise BatchError(f"{leaf_name(path, where)} has {leaf.shape[0]} rows but {first} has {size}: every "
                             f"leaf of a batch shares the leading (batch) axis")
    return size


def to_numpy(batch):
    """Every leaf as a numpy array (torch tensors are detached and copied to the host)."""
    def convert(leaf):
        if type(leaf).__module__.startswith("torch"):
            return leaf.detach().cpu().numpy()
        return leaf if isinstance(leaf, (np.ndarray, jax.Array)) else np.asarray(leaf)

    return jax.tree.map(convert, batch)


def pad_batch(batch, size: int):
    """``(batch padded to size rows, mask)``: padding rows copy row 0 and have mask 0.

    This is the one padding rule: ``jaxlight.data.batch_indices`` pads an epoch's last batch
    with the index of that batch's first row, so the device path builds the same batch.
    """
    n = jax.tree.leaves(batch)[0].shape[0]
    mask = np.zeros((size,), np.float32)
    mask[:n] = 1.0
    if n == size:
        return batch, mask
    return jax.tree.map(lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[:1], size - n, axis=0)]),
                        batch), mask


def _signature(batch):
    flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
    return treedef, [("batch" + jax.tree_util.keystr(p), tuple(a.shape[1:]), np.dtype(a.dtype)) for p, a in flat]


class Batches:
    """A source of host batches, iterated once per epoch.

    Args:
        source: a re-iterable (``DataLoader``, grain loader, list of batches) or a function that
            returns a fresh iterator each time it is called (a generator factory). A bare
            generator is refused: it would be empty from the second epoch on.
        name: how errors name it ("training data"...).

    Attributes:
        batch_size: rows of the first batch; later batches may be shorter (padded), not longer.
    """

    def __init__(self, source: Iterable | Callable[[], Iterator], name: str = "data"):
        if isinstance(source, Iterator) and not hasattr(source, "__len__") and iter(source) is source:
            raise TypeError(f"{name}: a generator or iterator can be iterated only once; pass a function that "
                            f"returns one (e.g. lambda: my_batches()) or a re-iterable such as a DataLoader")
        if not (callable(source) or hasattr(source, "__iter__")):
            raise TypeError(f"{name}: expected an ArrayDataset, a re-iterable of batches or a function returning "
                            f"an iterator, got {type(source).__name__}")
        self.source, self.name = source, name
        self.batch_size: int | None = None
        self._signature = None
        self._pending = None  # (first raw batch, the rest of its iterator) after peek()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch when the source knows (``len``), else None."""
        try:
            return len(self.source)
        except TypeError:
            return None

    def _check(self, batch, index: int):
        size = check_structure(batch, f"{self.name}, batch {index}:")
        treedef, leaves = _signature(batch)
        if self._signature is None:
            self._signature, self.batch_size = (treedef, leaves), size
            return size
        ref_treedef, ref_leaves = self._signature
        if treedef != ref_treedef:
            raise BatchError(f"{self.name}: batch {index} has structure {treedef}, but the first batch had "
                             f"{ref_treedef}; every batch must have the same structure")
        for (name, shape, dtype), (_, ref_shape, ref_dtype) in zip(leaves, ref_leaves):
            if shape != ref_shape or dtype != ref_dtype:
                raise BatchError(f"{self.name}: batch {index}: {name} is (B, {', '.join(map(str, shape))}) {dtype}, "
                                 f"the first batch's was (B, {', '.join(map(str, ref_shape))}) {ref_dtype}")
        if size > self.batch_size:
            raise BatchError(f"{self.name}: batch {index} has {size} rows, more than the first batch's "
                             f"{self.batch_size}; only a shorter last batch is allowed")
        return size

    def epoch(self, skip: int = 0) -> Iterator[tuple]:
        """``(batch, mask)`` pairs of one pass over the source, the first ``skip`` passed over
        (a resumed epoch)."""
        if self._pending is not None:  # the pass that peek() started: its first batch, then the rest
            first, rest = self._pending
            self._pending = None
            iterator = itertools.chain([first], rest)
        else:
            iterator = self.iterator()
        for index, raw in enumerate(iterator):
            if index < skip:
                continue
            batch = to_numpy(raw)
            self._check(batch, index)
            yield pad_batch(batch, self.batch_size)

    def iterator(self):
        """A fresh iterator over the source's raw batches (one pass)."""
        return self.source() if callable(self.source) and not hasattr(self.source, "__iter__") else iter(self.source)

    def peek(self):
        """The first ``(batch, mask)`` (for checks before training). The pass it starts is the
        one the next :meth:`epoch` continues, so a source whose order depends on how often it
        was iterated (an epoch counter, a sampler) is not advanced by the check."""
        iterator = self.iterator()
        for raw in iterator:
            self._pending = (raw, iterator)
            batch = to_numpy(raw)
            self._check(batch, 0)
            return pad_batch(batch, self.batch_size)
        raise BatchError(f"{self.name} yielded no batches")

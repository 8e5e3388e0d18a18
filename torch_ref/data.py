"""Data for the reference: the tutorial's ``DataLoader`` and an in-memory loader.

Both read the same files as ``jaxlight.data`` (found by it), so one copy of MNIST serves both
frameworks, and both read only bytes that were checksum-verified in the same run.

- ``loader="dataloader"``: the tutorial, faithfully: ``torchvision.datasets.MNIST`` with
  ``transforms.ToTensor()`` and ``DataLoader(batch_size, shuffle=True)``; one PIL image per
  example, converted and collated on every step.
- ``loader="memory"``: the whole set as tensors in memory, scaled once by ``/ 255`` (the same
  floats ``ToTensor`` gives), batched by index. This is the fair speed comparison against a JAX
  path that keeps the data on the device.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from jaxlight.data import ArrayDataset, find_mnist, load_task_data
from jaxlight.data.mnist import MNIST_FILES, default_cache_dir, md5, read_bytes, verify_checksum

__all__ = ["LOADERS", "MemoryLoader", "make_loaders", "torchvision_root"]

LOADERS = ("dataloader", "memory")


def _decompressed_copy(source: Path, name: str) -> Path:
    """A verified uncompressed copy of ``source`` (a ``.gz`` or a flat file) in
    ``<cache>/torchvision/MNIST/raw/``: checked against the published MD5 on every use, rebuilt
    from ``source`` when it is missing or differs, and written through a temporary file and a
    rename, so that a kill while writing never leaves a truncated copy under its name."""
    target = default_cache_dir() / "torchvision" / "MNIST" / "raw" / name
    if target.is_file() and md5(target.read_bytes()) == MNIST_FILES[name][0]:
        return target
    verify_checksum(source, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{name}.", delete=False) as tmp:
        tmp.write(read_bytes(source))
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, target)
    return target


def torchvision_root(data_dir: str | os.PathLike | None = None) -> Path:
    """A root that ``torchvision.datasets.MNIST(root, download=False)`` reads, holding only
    files verified now.

    torchvision wants uncompressed files in ``<root>/MNIST/raw/``, and it prefers a
    ``<root>/MNIST/processed/training.pt`` (its old format, which no checksum covers) when one
    exists. So the root is a private folder made for this process (removed at exit) whose
    ``MNIST/raw/`` holds symlinks to the four files, each checked against its published MD5
    here: the files jaxlight found when they are uncompressed, else verified decompressed
    copies in ``<cache>/torchvision/MNIST/raw/`` (see :func:`_decompressed_copy`). A
    ``processed/`` folder beside the data is never read.

    Raises:
        MNISTError: a file is missing or does not match its checksum (naming it).
    """
    folder = find_mnist(data_dir)
    if folder is None:
        from jaxlight.data import load_mnist

        load_mnist(data_dir)  # downloads (or raises the clear not-found error)
        folder = find_mnist(data_dir)
    root = Path(tempfile.mkdtemp(prefix="torch-ref-mnist-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        if (folder / name).is_file():
            source = (folder / name).resolve()
            verify_checksum(source, name)
        else:
            source = _decompressed_copy(folder / (name + ".gz"), name)
        os.symlink(source.resolve(), raw / name)
    return root


class MemoryLoader:
    """Batches of in-memory tensors, by index.

    Args:
        data: host arrays: an ``ArrayDataset`` of ``{"x", "y"}`` (batches ``(x, y)``; uint8
            images become float32 ``/ 255`` once, here), or of any other pytree (batches are
            that pytree of tensors, integers as int64: what a loss function
            ``loss_fn(model, batch)`` in jaxlight's contract takes, as ``jaxlight.bridge.parity``
            feeds it).
        batch_size: examples per batch (the last batch is shorter, as ``DataLoader``'s).
        shuffle: reshuffle every epoch with ``generator``.
        order: instead of shuffling, a fixed schedule: a callable ``epoch -> (idx, mask)``
            with ``(num_batches, B)`` arrays, e.g. ``jaxlight.data.epoch_order`` — the contract
            that makes both frameworks see the same batches.
    """

    def __init__(self, data: ArrayDataset, batch_size: int, shuffle: bool = True,
                 generator: torch.Generator | None = None, order=None, label_dtype=torch.int64):
        import jax

        tree = data.data if isinstance(data, ArrayDataset) else data
        self.tree = None
        if isinstance(tree, dict) and set(tree) == {"x", "y"}:
            x = torch.from_numpy(np.array(tree["x"]))
            self.x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
            y = torch.from_numpy(np.array(tree["y"]))
            self.y = y.to(label_dtype) if not torch.is_floating_point(y) else y.float()
            self.n = len(self.y)
        else:
            def tensor(a):
                a = np.array(a)
                return torch.from_numpy(a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a)

            self.tree = jax.tree.map(tensor, tree)
            self.n = len(jax.tree.leaves(self.tree)[0])
        self.batch_size, self.shuffle, self.generator, self.order = batch_size, shuffle, generator, order
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _take(self, keep):
        if self.tree is None:
            return self.x[keep], self.y[keep]
        import jax

        return jax.tree.map(lambda t: t[keep], self.tree)

    def __iter__(self) -> Iterator:
        if self.order is not None:
            idx, mask = self.order(self.epoch)
            self.epoch += 1
            for bi, bm in zip(idx, mask):
                keep = torch.from_numpy(np.asarray(bi)[np.asarray(bm) > 0].astype(np.int64))
                yield self._take(keep)
            return
        n = self.n
        perm = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            yield self._take(perm[start:start + self.batch_size])


def _tutorial_mnist(root: Path, train: bool, binary: bool):
    from torchvision import datasets, transforms

    target_transform = (lambda y: int(y == 0)) if binary else None
    return datasets.MNIST(root=str(root), train=train, download=False,
                          transform=transforms.ToTensor(), target_transform=target_transform)


def make_loaders(dataset: str, loader: str, batch_size: int, seed: int,
                 data_dir: str | os.PathLike | None = None, label_dtype=torch.int64):
    """``(train_loader, test_loader, truth)`` for a recipe's dataset.

    The training loader shuffles with a ``torch.Generator`` seeded by ``seed``; the test loader
    keeps the stored order. ``truth`` holds the synthetic regression's true weight and bias.
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {LOADERS}")
    generator = torch.Generator().manual_seed(seed)
    if loader == "dataloader" and dataset.startswith("mnist"):
        root = torchvision_root(data_dir)  # (verified here, read whole by torchvision below)
        binary = dataset == "mnist-zero"
        try:
            train_set, test_set = _tutorial_mnist(root, True, binary), _tutorial_mnist(root, False, binary)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        train = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator)
        test = torch.utils.data.DataLoader(test_set, batch_size=1000)
        return train, test, {}
    train, test, truth = load_task_data(dataset, data_dir, seed)
    if loader == "dataloader":  # synthetic data: the tutorial's loader over tensors
        to_tensors = lambda d: torch.utils.data.TensorDataset(torch.from_numpy(d.x), torch.from_numpy(d.y))  # noqa: E731
        return (torch.utils.data.DataLoader(to_tensors(train), batch_size=batch_size, shuffle=True, generator=generator),
                torch.utils.data.DataLoader(to_tensors(test), batch_size=1000), truth)
    return (MemoryLoader(train, batch_size, True, generator, label_dtype=label_dtype),
            MemoryLoader(test, 1000, False, label_dtype=label_dtype), truth)

"""Data for the reference: the tutorial's ``DataLoader`` and an in-memory loader.

Both read the same files as ``jaxlight.data`` (found and checksum-verified by it), so one copy
of MNIST serves both frameworks.

- ``loader="dataloader"``: the tutorial, faithfully: ``torchvision.datasets.MNIST`` with
  ``transforms.ToTensor()`` and ``DataLoader(batch_size, shuffle=True)``; one PIL image per
  example, converted and collated on every step.
- ``loader="memory"``: the whole set as tensors in memory, scaled once by ``/ 255`` (the same
  floats ``ToTensor`` gives), batched by index. This is the fair speed comparison against a JAX
  path that keeps the data on the device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from jaxlight.data import ArrayDataset, find_mnist, load_task_data
from jaxlight.data.mnist import MNIST_FILES, default_cache_dir, _read_bytes

__all__ = ["LOADERS", "MemoryLoader", "make_loaders", "torchvision_root"]

LOADERS = ("dataloader", "memory")


def torchvision_root(data_dir: str | os.PathLike | None = None) -> Path:
    """A root that ``torchvision.datasets.MNIST(root, download=False)`` reads.

    torchvision wants uncompressed files in ``<root>/MNIST/raw/``. When the copy jaxlight found
    is laid out differently (flat, or ``.gz``), the files are decompressed once into
    ``<cache>/torchvision/MNIST/raw/``.
    """
    folder = find_mnist(data_dir)
    if folder is None:
        from jaxlight.data import load_mnist

        load_mnist(data_dir)  # downloads (or raises the clear not-found error)
        folder = find_mnist(data_dir)
    if folder.name == "raw" and folder.parent.name == "MNIST" and all((folder / n).is_file() for n in MNIST_FILES):
        return folder.parent.parent
    target = default_cache_dir() / "torchvision" / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        if not (target / name).is_file():
            source = folder / name if (folder / name).is_file() else folder / (name + ".gz")
            (target / name).write_bytes(_read_bytes(source))
    return target.parent.parent


class MemoryLoader:
    """Batches of in-memory tensors, by index.

    Args:
        data: host arrays; uint8 images become float32 ``/ 255`` once, here.
        batch_size: examples per batch (the last batch is shorter, as ``DataLoader``'s).
        shuffle: reshuffle every epoch with ``generator``.
        order: instead of shuffling, a fixed schedule: a callable ``epoch -> (idx, mask)``
            with ``(num_batches, B)`` arrays, e.g. ``jaxlight.data.epoch_order`` — the contract
            that makes both frameworks see the same batches.
    """

    def __init__(self, data: ArrayDataset, batch_size: int, shuffle: bool = True,
                 generator: torch.Generator | None = None, order=None, label_dtype=torch.int64):
        x = torch.from_numpy(np.array(data.x))
        self.x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        y = torch.from_numpy(np.array(data.y))
        self.y = y.to(label_dtype) if not torch.is_floating_point(y) else y.float()
        self.batch_size, self.shuffle, self.generator, self.order = batch_size, shuffle, generator, order
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple]:
        if self.order is not None:
            idx, mask = self.order(self.epoch)
            self.epoch += 1
            for bi, bm in zip(idx, mask):
                keep = torch.from_numpy(np.asarray(bi)[np.asarray(bm) > 0].astype(np.int64))
                yield self.x[keep], self.y[keep]
            return
        n = len(self.y)
        perm = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            keep = perm[start:start + self.batch_size]
            yield self.x[keep], self.y[keep]


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
        # The files are verified by jaxlight's reader before torchvision reads them.
        load_task_data(dataset, data_dir)
        root = torchvision_root(data_dir)
        binary = dataset == "mnist-zero"
        train = torch.utils.data.DataLoader(_tutorial_mnist(root, True, binary), batch_size=batch_size,
                                            shuffle=True, generator=generator)
        test = torch.utils.data.DataLoader(_tutorial_mnist(root, False, binary), batch_size=1000)
        return train, test, {}
    train, test, truth = load_task_data(dataset, data_dir, seed)
    if loader == "dataloader":  # synthetic data: the tutorial's loader over tensors
        to_tensors = lambda d: torch.utils.data.TensorDataset(torch.from_numpy(d.x), torch.from_numpy(d.y))  # noqa: E731
        return (torch.utils.data.DataLoader(to_tensors(train), batch_size=batch_size, shuffle=True, generator=generator),
                torch.utils.data.DataLoader(to_tensors(test), batch_size=1000), truth)
    return (MemoryLoader(train, batch_size, True, generator, label_dtype=label_dtype),
            MemoryLoader(test, 1000, False, label_dtype=label_dtype), truth)

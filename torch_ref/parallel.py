"""DistributedDataParallel over gloo: the reference for ``jaxlight.parallel``'s multi-process runs.

``torchrun --nproc_per_node 2 -m torch_ref.parallel --model mlp --subset 200 --batch-size 32 --out runs/ddp``

The same contract as the JAX side:

- every rank computes the global epoch order from the run's seed
  (``jaxlight.data.epoch_order``, the cross-framework data contract) and feeds only its own
  contiguous block of rows of each global batch (:func:`process_rows`);
- the gradient is the mean over the real examples of the *global* batch. DDP averages the
  ranks' gradients with equal weights, which on the padded last batch (ranks holding different
  numbers of real rows, possibly none) is not that mean; so each rank's loss is
  ``sum(loss_i * mask_i) / global_count * world_size`` and DDP's division by ``world_size``
  leaves exactly the global mean;
- metrics are example-weighted across ranks (an ``all_reduce`` of sums and counts).

Run without torchrun (no ``WORLD_SIZE``) it is one process on the same global batches.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from jaxlight.report import write_json
from torch_ref.tasks import Task

__all__ = ["initialize", "process_rows", "train_epoch", "fit", "main"]


def initialize() -> tuple[int, int]:
    """Join the process group that torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) over gloo; ``(rank, world_size)``, ``(0, 1)`` without torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def process_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous block of a global batch (as ``jaxlight.parallel``'s)."""
    if batch_size % world_size:
        raise ValueError(f"global batch size {batch_size} does not divide over {world_size} processes")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


def _all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, idx: np.ndarray, mask: np.ndarray, task: Task, rank: int = 0,
                world_size: int = 1) -> dict:
    """One epoch over the global batches ``idx``/``mask`` (``(num_batches, B)``).

    Args:
        model: wrapped in ``DistributedDataParallel`` when ``world_size > 1``.
        x, y: the dataset (float32 inputs already scaled, int64 labels); only this rank's rows
            of each batch are read.
    Returns:
        Example-weighted means over every rank's real examples, and the global ``count``.
    """
    model.train()
    rows = process_rows(idx.shape[1], rank, world_size)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, metric sum, count
    for bi, bm in zip(idx, mask):
        global_count = float(bm.sum())
        keep = torch.from_numpy(bi[rows].astype(np.int64))
        m = torch.from_numpy(bm[rows].astype(np.float32))
        optimizer.zero_grad()
        outputs = model(x[keep])
        losses = task.per_example_loss(outputs, y[keep])
        loss = (losses * m).sum() / max(global_count, 1.0) * world_size
        loss.backward()  # DDP all-reduces the gradients (mean over ranks) here
        optimizer.step()
        with torch.no_grad():
            score = (task.per_example_score(outputs, y[keep]) * m).sum()
            totals += torch.stack([(losses * m).sum().double(), score.double(), m.sum().double()])
    totals = _all_reduce_sum(totals, world_size)
    count = max(float(totals[2]), 1.0)
    return {"loss": float(totals[0]) / count, task.metric: float(totals[1]) / count, "count": int(totals[2])}


def fit(model, optimizer, x, y, task: Task, epochs: int, batch_size: int, seed: int = 0,
        rank: int = 0, world_size: int = 1) -> list[dict]:
    """``epochs`` epochs in the order ``jaxlight.data.epoch_order(seed, epoch, ...)`` fixes."""
    from jaxlight.data import epoch_order

    history = []
    for epoch in range(epochs):
        idx, mask = epoch_order(seed, epoch, len(y), batch_size)
        history.append(train_epoch(model, optimizer, x, y, idx, mask, task, rank, world_size))
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m torch_ref.parallel",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--subset", type=int, help="train on the first SUBSET MNIST examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", required=True, help="rank 0 writes params.npz and metrics.json here")
    args = parser.parse_args(argv)

    from jaxlight.data import load_mnist
    from torch_ref.models import build_model
    from torch_ref.tasks import multiclass

    torch.set_num_threads(1)  # one thread per rank: the ranks share the machine's cores
    rank, world_size = initialize()
    train, _ = load_mnist(args.data_dir)
    n = args.subset or len(train.labels)
    x = torch.from_numpy(np.array(train.images[:n])).float().div(255)
    y = torch.from_numpy(np.array(train.labels[:n])).long()
    model = build_model(args.model, args.seed)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = fit(model, optimizer, x, y, multiclass(), args.epochs, args.batch_size, args.seed,
                  rank, world_size)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        module = model.module if world_size > 1 else model
        np.savez(out / "params.npz", **{k: v.detach().numpy() for k, v in module.state_dict().items()})
        write_json(out / "metrics.json", {"history": history, "world_size": world_size})
        print(f"rank 0 of {world_size}: {history[-1]}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

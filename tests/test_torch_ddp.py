"""torch_ref.parallel: DistributedDataParallel over gloo, 2 processes started by torchrun, gives
what one process gives on the same global batches (torch_ref.loop over the shared data order).

Tolerance 1e-5 (float32); measured max |difference| 5e-8 (mlp, 7 steps).
"""

import json

import numpy as np
import pytest
import torch

from _support import run_module
from jaxlight.data import ArrayDataset, epoch_order
from torch_ref import loop, models, tasks
from torch_ref.data import MemoryLoader
from torch_ref.parallel import process_rows

N, BATCH = 200, 32  # the last batch holds 8 real rows: rank 1's half is all padding


@pytest.fixture(scope="module")
def single_process(mnist):
    """The plain reference loop, one process, the same global batches (padding dropped)."""
    train, _ = mnist
    data = ArrayDataset(train.images[:N], train.labels[:N])
    loader = MemoryLoader(data, BATCH, order=lambda epoch: epoch_order(0, epoch, N, BATCH))
    model = models.build_model("mlp", 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = loop.fit(model, optimizer, loader, tasks.multiclass(), epochs=1)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}, history[0].metrics


@pytest.mark.integration
def test_ddp_on_two_processes_matches_one_process(tmp_path, data_dir, single_process):
    result = run_module("torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "torch_ref.parallel", "--subset", str(N), "--batch-size", str(BATCH),
                        "--data-dir", str(data_dir), "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["world_size"] == 2
    params = np.load(tmp_path / "params.npz")
    expected, metrics = single_process
    assert sorted(params.files) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    got = summary["history"][0]
    assert got["count"] == metrics["count"] == N
    assert got["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    assert got["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)


def test_one_process_of_the_ddp_loop_matches_the_reference_loop(mnist, single_process):
    """torch_ref.parallel's epoch (rows, masks, example-weighted metrics) in this process, world
    size 1: the reference loop's parameters and metrics. The two-process run is the test above."""
    from torch_ref.parallel import fit

    train, _ = mnist
    x = torch.from_numpy(np.array(train.images[:N])).float().div(255)
    y = torch.from_numpy(np.array(train.labels[:N])).long()
    model = models.build_model("mlp", 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = fit(model, optimizer, x, y, tasks.multiclass(), epochs=1, batch_size=BATCH, seed=0)
    expected, metrics = single_process
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value.detach().numpy(), expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert history[0]["count"] == metrics["count"] == N
    assert history[0]["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    assert history[0]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)


@pytest.mark.parametrize(("batch", "rank", "world", "rows"), [
    (32, 0, 2, (0, 16)),
    (32, 1, 2, (16, 32)),
    (64, 3, 4, (48, 64)),
    (8, 0, 1, (0, 8)),
])
def test_process_rows_are_contiguous_blocks(batch, rank, world, rows):
    s = process_rows(batch, rank, world)
    assert (s.start, s.stop) == rows


def test_batch_not_divisible_by_processes_is_a_clear_error():
    with pytest.raises(ValueError, match="global batch size 30 does not divide over 4 processes"):
        process_rows(30, 0, 4)

"""Multi-process data parallelism on localhost: real processes, gloo collectives, one run.

``jaxlight.launch`` starts 2 processes x 2 fake CPU devices; each feeds only its own rows of
every global batch. The result must match one process on the same global batches, and a
process that dies must bring the others down quickly with a clear error, not hang them.
"""

import os
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from _support import PARALLEL_ATOL, PARALLEL_RTOL, ROOT, run_module
from jaxlight import build_model, create_train_state, loop, optim, parallel, tasks
from jaxlight.data import ArrayDataset

pytestmark = pytest.mark.integration  # (every test here starts processes)

WORKER = str(Path(__file__).with_name("multihost_worker.py"))
N, BATCH = 200, 32  # 7 global batches, the last 8 real rows: process 1's half is all padding


def launch(*args, timeout=240, **env):
    return run_module("jaxlight.launch", *args, timeout=timeout, env=env or None)


@pytest.fixture(scope="module")
def single_process(mnist):
    train, _ = mnist
    data = ArrayDataset(train.images[:N], train.labels[:N].astype(np.int32))
    state = create_train_state(build_model("mlp", 0), optim.adam(1e-3), tasks.multiclass(), 0)
    state, history = loop.fit(state, data, 1, BATCH)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)], history[0].metrics


def assert_matches_single_process(out: Path, single_process) -> None:
    """Process 0's final parameters and epoch metrics (written by the worker) are the
    single-process run's."""
    import json

    params = np.load(out / "params.npz")
    expected, metrics = single_process
    for i, e in enumerate(expected):
        np.testing.assert_allclose(params[str(i)], e, rtol=PARALLEL_RTOL, atol=PARALLEL_ATOL)
    got = json.loads((out / "metrics.json").read_text())
    assert got["step"] == 7
    assert got["history"][0]["count"] == metrics["count"] == N
    assert got["history"][0]["loss"] == pytest.approx(metrics["loss"], abs=1e-5)


@pytest.mark.parametrize(("strategy", "path"), [
    ("sharded", "host"),  # each process gathers only its rows from host memory
    ("fsdp", "fused"),  # the state split over both processes' devices, gathered at the end
    # (pmap with the fused epoch runs multi-process in test_cli_multiprocess_launch_as_documented)
])
def test_two_processes_match_one_process(strategy, path, tmp_path, data_dir, single_process):
    result = launch("--nproc", "2", "--local-devices", "2", "--", WORKER, "--out", str(tmp_path),
                    "--data-dir", str(data_dir), "--strategy", strategy, "--path", path,
                    "--n", str(N), "--batch-size", str(BATCH))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import json

    procs = [json.loads((tmp_path / f"process-{i}.json").read_text()) for i in range(2)]
    assert [(p["processes"], p["local_devices"], p["devices"]) for p in procs] == [(2, 2, 4)] * 2
    assert [p["rows"] for p in procs] == [[0, 16], [16, 32]]  # its own half of each batch
    assert_matches_single_process(tmp_path, single_process)


@pytest.mark.parametrize(("strategy", "path", "stop", "interrupted"), [
    ("sharded", "fused", ["--max-steps", "4"], False),
    # SIGTERM to process 1 alone: the processes agree at the chunk end and both save and stop.
    ("pmap", "host", ["--sigterm-process", "1", "--sigterm-at-step", "4"], True),
])
def test_trainer_two_processes_checkpoint_resume_matches_one_process(strategy, path, stop, interrupted, tmp_path,
                                                                     data_dir, single_process):
    """The Trainer across 2 processes x 2 devices: stopped after 4 steps (process 0 writes the
    checkpoint, the other waits for it), then relaunched to resume from it: the parameters
    match one process's uninterrupted run."""
    common = ["--nproc", "2", "--local-devices", "2", "--", WORKER, "--out", str(tmp_path),
              "--data-dir", str(data_dir), "--strategy", strategy, "--path", path,
              "--n", str(N), "--batch-size", str(BATCH), "--trainer"]
    first = launch(*common, *stop)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # (.lock: process 0's folder lock; no temp folders left behind)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".lock", "step_000000004"]
    assert first.stdout.count(f"trainer resumed from None, saved [4], interrupted {interrupted}") == 2
    second = launch(*common)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count(f"trainer resumed from {tmp_path / 'ckpt' / 'step_000000004'}, saved [4, 7], "
                               f"interrupted False") == 2
    assert_matches_single_process(tmp_path, single_process)


def test_a_dead_process_stops_the_others_with_a_clear_error(tmp_path, data_dir):
    """Process 1 exits mid-epoch. Process 0 is blocked in a collective; JAX's coordination
    service misses process 1's heartbeats (timeout 5 s here) and aborts process 0 with
    "another task died". The launcher's grace (60 s) is longer, so this is JAX's own
    detection, not the launcher killing it."""
    t0 = time.monotonic()
    result = launch("--nproc", "2", "--local-devices", "2", "--grace", "60", "--", WORKER,
                    "--out", str(tmp_path), "--data-dir", str(data_dir), "--die-process", "1",
                    "--die-at-step", "2", "--heartbeat", "5")
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    assert "worker 1: dying on purpose after step 2" in output
    assert "another task died" in output
    assert "process 1 of 2 exited with code 3" in output
    assert "terminating process" not in output  # JAX stopped it, within the grace
    codes = re.search(r"all exit codes: \[(-?\d+), 3\]\); the others stopped ([\d.]+) s later", output)
    assert codes, output[-2000:]
    assert int(codes.group(1)) != 0
    assert float(codes.group(2)) < 40  # heartbeat timeout 5 s + detection; measured ~5-15 s
    assert not (tmp_path / "params.npz").exists()
    assert time.monotonic() - t0 < 200


def test_launcher_terminates_a_hung_process_after_the_grace():
    """A survivor that never notices (no JAX at all here) is terminated after --grace."""
    program = ("import os, time\n"
               "if os.environ['JAXLIGHT_PROCESS_ID'] == '1': raise SystemExit(7)\n"
               "time.sleep(600)\n")
    t0 = time.monotonic()
    result = launch("--nproc", "2", "--grace", "1", "--", "-c", program, timeout=60)
    assert result.returncode == 7
    assert "process 1 of 2 exited with code 7" in result.stderr
    assert "terminating process(es) [0]" in result.stderr
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize(("args", "message"), [
    (["--nproc", "2"], "give the program after '--'"),
    (["--nproc", "0", "--", "-c", "pass"], "nproc must be >= 1"),
])
def test_launcher_rejects_bad_command_lines(args, message):
    result = launch(*args, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.slow
def test_cli_multiprocess_launch_as_documented(tmp_path):
    """The documented command line (pmap, the dataset on the devices, fused epochs) on the
    linear-regression recipe (synthetic data: no MNIST to read, and convex, so no float32 chaos)
    matches the same recipe trained here in one process."""
    import json

    from jaxlight import recipe_for
    from jaxlight.data import load_task_data

    multi = launch("--nproc", "2", "--local-devices", "2", "--", "-m", "jaxlight.cli", "train",
                   "--model", "linear", "--epochs", "1", "--strategy", "pmap", "--distributed",
                   "--out", str(tmp_path), timeout=300)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    assert "process 0 of 2" in multi.stdout and "process 1 of 2" in multi.stdout
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert (got["strategy"], got["processes"], got["devices"]) == ("pmap", 2, 4)

    recipe = recipe_for("linear", epochs=1)
    train, test, truth = load_task_data(recipe.dataset, None, recipe.seed)
    tx = optim.make_optimizer(recipe.optimizer, recipe.lr, **recipe.optimizer_kwargs())
    state = create_train_state(build_model("linear", 0), tx, tasks.regression(), 0)
    state, _ = loop.fit(state, train, 1, recipe.batch_size)
    want = loop.evaluate(state, test.to_device())
    kernel = np.asarray(state.params["linear"]["kernel"][...])
    assert got["test_mse"] == pytest.approx(want["mse"], rel=1e-5)
    assert got["weight_error"] == pytest.approx(float(np.abs(kernel - truth["weight"]).max()), abs=1e-6)

"""``jaxlight train`` through the Trainer: validation split, checkpoints, --resume, loggers."""

import json

import pytest

# Each run-through twice: in-process through main([...]) (fast), and as a user runs it, one process
# per command (integration).
RUNNERS = pytest.mark.parametrize("runner", ["cli_main", pytest.param("cli", marks=pytest.mark.integration)])


def _summary(out):
    return json.loads((out / "metrics.json").read_text())


@RUNNERS
def test_resume_continues_to_the_same_result(runner, request, tmp_path):
    cli = request.getfixturevalue(runner)
    common = ["train", "--model", "linear", "--val-split", "0.1"]
    full = cli("jaxlight", *common, "--epochs", "4", "--out", str(tmp_path / "full"))
    first = cli("jaxlight", *common, "--epochs", "2", "--out", str(tmp_path / "first"),
                "--ckpt-dir", str(tmp_path / "ckpt"), "--logger", "tensorboard")
    resumed = cli("jaxlight", *common, "--epochs", "4", "--out", str(tmp_path / "resumed"),
                  "--ckpt-dir", str(tmp_path / "ckpt"), "--resume", "--logger", "csv")
    for result in (full, first, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_" in resumed.stdout
    assert "epoch 3/4" in resumed.stdout and "epoch 1/4" not in resumed.stdout
    a, b = _summary(tmp_path / "full"), _summary(tmp_path / "resumed")
    assert a["history"] == b["history"]  # all four epochs, two of them from the checkpoint
    assert (a["test_mse"], a["weight_error"], a["bias_error"]) == (b["test_mse"], b["weight_error"], b["bias_error"])
    assert "val_loss" in a["history"][0] and len(b["epoch_seconds"]) == 4
    assert list((tmp_path / "first" / "logs").glob("events.out.tfevents.*"))
    assert (tmp_path / "resumed" / "logs" / "metrics.csv").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--resume"], "--resume needs --ckpt-dir"),
    (["--val-split", "1.5"], "val_split must be in [0, 1), got 1.5"),
    (["--steps-per-execution", "0"], "--steps-per-execution (trainer.steps_per_execution: must be an int >= 1"),
    (["--logger", "wandb"], "invalid choice: 'wandb'"),
])
def test_bad_trainer_flags_are_named(cli_main, tmp_path, flags, message):
    result = cli_main("jaxlight", "train", "--model", "linear", "--out", str(tmp_path), *flags)
    assert result.returncode != 0 and message in result.stderr


@RUNNERS
def test_trainer_flags_work_under_every_strategy_and_resume_across_them(runner, request, tmp_path):
    """Checkpoint under ``sharded`` on 4 devices, resume under ``pmap`` on 2: the same run as
    one device all along, to float32 rounding (the batch is summed in another order)."""
    cli = request.getfixturevalue(runner)
    common = ["train", "--model", "linear", "--val-split", "0.1"]
    full = cli("jaxlight", *common, "--epochs", "4", "--out", str(tmp_path / "full"))
    first = cli("jaxlight", *common, "--epochs", "2", "--out", str(tmp_path / "first"), "--strategy", "sharded",
                "--devices", "4", "--ckpt-dir", str(tmp_path / "ckpt"), "--logger", "csv")
    resumed = cli("jaxlight", *common, "--epochs", "4", "--out", str(tmp_path / "resumed"), "--strategy", "pmap",
                  "--devices", "2", "--ckpt-dir", str(tmp_path / "ckpt"), "--resume")
    for result in (full, first, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded on 4 device(s)" in first.stdout and "pmap on 2 device(s)" in resumed.stdout
    assert "resumed from" in resumed.stdout and "epoch 3/4" in resumed.stdout
    assert (tmp_path / "first" / "logs" / "metrics.csv").is_file()
    a, b = _summary(tmp_path / "full"), _summary(tmp_path / "resumed")
    assert (b["strategy"], b["devices"]) == ("pmap", 2)
    assert len(a["history"]) == len(b["history"]) == 4
    for ea, eb in zip(a["history"], b["history"]):
        assert set(ea) == set(eb)
        for key in ea:
            assert eb[key] == pytest.approx(ea[key], rel=1e-4, abs=1e-6), key
    for key in ("test_mse", "weight_error", "bias_error"):
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key

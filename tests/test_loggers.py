"""Loggers: what a fit writes, read back the way users read it (csv module, TensorBoard's own
EventAccumulator), at step and epoch granularity, and across a resume."""

import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxlight import build_model, create_train_state, optim, tasks
from jaxlight.callbacks import LearningRateMonitor, ModelCheckpoint
from jaxlight.loggers import CSVLogger, TensorBoardLogger
from jaxlight.trainer import Trainer, TrainerConfig

ADAM = optim.adam(1e-2)
STEP_TAGS = {"train_loss_step", "train_accuracy_step"}
EPOCH_TAGS = {"epoch", "train_loss_epoch", "train_accuracy_epoch", "val_loss", "val_accuracy"}


@pytest.fixture
def data(small_mnist):
    return small_mnist


def _state():
    return create_train_state(build_model("softmax", 0), ADAM, tasks.multiclass(), seed=0)


def _fit(data, tmp_path, epochs, ckpt_path=None, **kw):
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    config = TrainerConfig(max_epochs=epochs, steps_per_execution=2,
                           **{"logging": {"enable_progress_bar": False, **kw.pop("logging", {})}, **kw})
    trainer = Trainer(config, callbacks=[ModelCheckpoint(tmp_path / "ckpt", every_n_epochs=1)], loggers=loggers)
    trainer.fit(_state(), *data, ckpt_path=ckpt_path)
    return trainer


def _csv(tmp_path):
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tb(tmp_path):
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    return acc


def test_every_step_and_every_epoch_is_logged_even_inside_fused_chunks(data, tmp_path):
    trainer = _fit(data, tmp_path, epochs=2)
    rows = _csv(tmp_path)
    step_rows = [r for r in rows if r["train_loss_step"]]
    assert [int(r["step"]) for r in step_rows] == list(range(1, 11))  # chunks of 2, every step
    epoch_rows = [r for r in rows if r["epoch"]]
    assert [(int(r["step"]), float(r["epoch"])) for r in epoch_rows] == [(5, 1.0), (10, 2.0)]
    assert float(epoch_rows[-1]["train_loss_epoch"]) == pytest.approx(trainer.history[-1].metrics["loss"])
    assert float([r for r in rows if r["val_loss"]][-1]["val_loss"]) == pytest.approx(
        trainer.history[-1].metrics["val_loss"])

    acc = _tb(tmp_path)
    assert STEP_TAGS | EPOCH_TAGS <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train_loss_step")] == list(range(1, 11))
    assert [e.step for e in acc.Scalars("val_loss")] == [5, 10]
    tb_losses = [e.value for e in acc.Scalars("train_loss_step")]
    csv_losses = [float(r["train_loss_step"]) for r in step_rows]
    assert tb_losses == pytest.approx(csv_losses)
    assert (tmp_path / "csv" / "hparams.yaml").is_file()


def test_the_csv_holds_one_row_per_step(data, tmp_path):
    """What is logged at a step (its loss, the rate its update applied, the validation and the
    epoch's means at an epoch's last step) is one row, inside fused chunks and across flushes."""
    loggers = [CSVLogger(tmp_path / "csv")]
    config = TrainerConfig(max_epochs=2, val_every_n_steps=3,
                           logging={"enable_progress_bar": False})  # chunks cut at 3, 5, 6, 9
    Trainer(config, callbacks=[LearningRateMonitor()], loggers=loggers).fit(_state(), *data)
    rows = _csv(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert all(r["train_loss_step"] and r["lr"] for r in rows)
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [3, 5, 6, 9, 10]
    assert [int(r["step"]) for r in rows if r["train_loss_epoch"]] == [5, 10]
    assert float(rows[0]["lr"]) == pytest.approx(1e-2)


def test_resume_drops_the_interrupted_runs_later_points(data, tmp_path):
    _fit(data, tmp_path, epochs=3)          # logs steps 1..15 and checkpoints at 5, 10, 15
    ckpt = tmp_path / "ckpt" / "step_000000010"
    _fit(data, tmp_path, epochs=3, ckpt_path=ckpt)  # redo epoch 3 from step 10
    steps = [int(r["step"]) for r in _csv(tmp_path) if r["train_loss_step"]]
    assert steps == list(range(1, 16))      # no duplicates of steps 11..15
    acc = _tb(tmp_path)
    assert [e.step for e in acc.Scalars("train_loss_step")] == list(range(1, 16))
    assert [e.step for e in acc.Scalars("val_loss")] == [5, 10, 15]


def test_tensorboard_hparams_text_and_a_resume_without_later_points(tmp_path):
    """The record reaches the HPARAMS tab and the text tab; a resume hides the interrupted
    run's later points even when nothing is logged after it (the purge marker goes out at once)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log_hyperparams({"model": {"width": 8, "act": None}, "lr": 0.5, "layers": [1, 2]})
    for step in range(1, 6):
        logger.log_metrics({"loss": 1.0 / step}, step)
    logger.finalize()
    logger.resume(3)
    logger.finalize()

    acc = _tb(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    content = acc.PluginTagToContent("hparams")
    starts = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
    (start,) = [d.session_start_info for d in starts if d.HasField("session_start_info")]
    hp = {k: v.ListFields()[0][1] for k, v in start.hparams.items()}
    assert hp == {"model.width": 8.0, "model.act": "null", "lr": 0.5, "layers": "[1, 2]"}
    (text_tag,) = acc.PluginTagToContent("text")
    text = acc.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert text_tag == "hparams/text_summary" and text.splitlines() == [
        "model.width: 8", "model.act: null", "lr: 0.5", "layers: [1, 2]"]


def test_log_every_n_steps(data, tmp_path):
    _fit(data, tmp_path, epochs=2, logging={"log_every_n_steps": 3})
    assert [int(r["step"]) for r in _csv(tmp_path) if r["train_loss_step"]] == [3, 6, 9]


def test_csv_adds_a_column_when_a_new_metric_appears(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"a": 1.0}, 1)
    logger.flush()
    logger.log_metrics({"a": 2.0}, 2)
    logger.flush()
    logger.log_metrics({"b": 3.0}, 3)
    logger.finalize()
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert rows == [{"step": "1", "a": "1.0", "b": ""}, {"step": "2", "a": "2.0", "b": ""},
                    {"step": "3", "a": "", "b": "3.0"}]


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

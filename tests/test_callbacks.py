"""Callbacks on their own (a stand-in trainer) and through a real fit: early stopping, best-k
checkpointing and its resume, learning-rate readout, the progress bar with and without a TTY."""

import io
import types

import jax
import numpy as np
import optax
import pytest

from jaxlight import build_model, create_train_state, optim, tasks
from jaxlight.callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar, current_lr
from jaxlight.checkpoint import list_checkpoints
from jaxlight.trainer import Trainer, TrainerConfig

ADAM = optim.adam(1e-2)


def _fake_trainer(**kw):
    return types.SimpleNamespace(global_step=0, should_stop=False, callback_metrics={}, **kw)


@pytest.mark.parametrize("mode, patience, min_delta, values, stops_after", [
    ("min", 2, 0.0, [1.0, 0.9, 0.95, 0.96], 4),   # two runs without a new minimum
    ("min", 2, 0.0, [1.0, 0.9, 0.95, 0.8, 0.85], None),
    ("min", 1, 0.2, [1.0, 0.9], 2),               # 0.1 better is not min_delta better
    ("max", 1, 0.0, [0.5, 0.6, 0.6], 3),          # equal is not better
    ("min", 3, 0.0, [1.0, float("nan")], 2),      # a NaN metric stops at once
])
def test_early_stopping_table(mode, patience, min_delta, values, stops_after):
    cb, trainer = EarlyStopping("val_loss", mode, patience, min_delta), _fake_trainer()
    for i, v in enumerate(values, 1):
        trainer.global_step = i
        cb.on_validation_end(trainer, None, {"val_loss": v})
        if trainer.should_stop:
            break
    assert (cb.stopped_step if trainer.should_stop else None) == stops_after
    restored = EarlyStopping("val_loss", mode, patience, min_delta)
    restored.load_state_dict(cb.state_dict())
    assert restored.state_dict() == cb.state_dict()


def test_early_stopping_names_a_missing_metric():
    with pytest.raises(KeyError, match="'val_acc' is not among the validation metrics"):
        EarlyStopping("val_acc").on_validation_end(_fake_trainer(), None, {"val_loss": 1.0})


@pytest.mark.parametrize("kw, match", [
    ({"mode": "up"}, "mode"), ({"keep_last": 1}, "keep_last"), ({"every_n_steps": 0}, "every_n_steps"),
])
def test_model_checkpoint_rejects_bad_settings(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        ModelCheckpoint(tmp_path, **kw)


@pytest.fixture
def data(small_mnist):
    return small_mnist


def _state():
    return create_train_state(build_model("softmax", 0), ADAM, tasks.multiclass(), seed=0)


def test_model_checkpoint_keeps_best_k_and_last_and_resumes_its_bookkeeping(data, tmp_path):
    # Validation every 2 steps with "max" on the falling val_loss: the *first* checkpoints score
    # best, so best-k and last-k are different sets.
    cb = ModelCheckpoint(tmp_path, monitor="val_loss", mode="max", save_top_k=2, keep_last=2,
                         every_n_steps=2, every_n_epochs=None)
    trainer = Trainer(TrainerConfig(max_epochs=2, val_every_n_steps=2,
                                    logging={"enable_progress_bar": False}), callbacks=[cb])
    trainer.fit(_state(), *data)
    kept = [p.name for p in list_checkpoints(tmp_path)]
    assert kept == ["step_000000002", "step_000000004", "step_000000008", "step_000000010"]
    assert cb.best_model_path.name == "step_000000002" and cb.last_model_path.name == "step_000000010"
    # Resume from step 8 (not the latest), with a new callback: its bookkeeping comes back from
    # the checkpoint and pruning after the next save keeps the same best two.
    cb2 = ModelCheckpoint(tmp_path, monitor="val_loss", mode="max", save_top_k=2, keep_last=2,
                          every_n_steps=2, every_n_epochs=None)
    trainer2 = Trainer(TrainerConfig(max_epochs=3, val_every_n_steps=2,
                                     logging={"enable_progress_bar": False}), callbacks=[cb2])
    trainer2.fit(_state(), *data, ckpt_path=tmp_path / "step_000000008")
    assert cb2.saved[:2] == [2, 4] and cb2.best_model_path.name == "step_000000002"
    assert [p.name for p in list_checkpoints(tmp_path)][-2:] == ["step_000000014", "step_000000015"]  # 15: fit end


def test_current_lr_reads_injected_hyperparams_and_schedules():
    params = {"w": optax.tree_utils.tree_zeros_like({"w": 0.0})["w"]}
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=0.125)
    assert current_lr(injected.init(params)) == 0.125
    schedule = optax.exponential_decay(1.0, 1, 0.5)
    state = optax.adam(schedule).init(params)
    assert current_lr(state, schedule) == 1.0
    assert current_lr(optax.adam(0.3).init(params), 0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="keeps no learning rate"):
        current_lr(optax.adam(0.3).init(params))
    tx = optax.adam(schedule)  # with the optimizer: its own schedule, at its own count
    assert current_lr(tx.init(params), tx=tx) == 1.0 and current_lr(tx.init(params), tx=optax.adam(0.3)) == 0.3


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream_cls, tty", [(io.StringIO, False), (_Tty, True)])
def test_progress_bar_live_on_a_tty_plain_lines_otherwise(data, stream_cls, tty):
    stream = stream_cls()
    bar = ProgressBar(stream)
    Trainer(TrainerConfig(max_epochs=2, steps_per_execution=2), callbacks=[bar]).fit(_state(), *data)
    text = stream.getvalue()
    if tty:
        assert "loss=" in text and "ex_s=" in text and "\r" in text
    else:
        lines = text.strip().splitlines()
        assert len(lines) == 2 and "\r" not in text
        assert lines[0].startswith("epoch 1/2") and "val_loss" in lines[0] and "ex/s" in lines[0]


# --- several ModelCheckpoints -------------------------------------------------------------------

class ValRecorder(Callback):
    """Every validation's loss, by step: the independent record "best" must agree with."""

    def __init__(self):
        self.val = {}

    def on_validation_end(self, trainer, state, metrics):
        self.val[trainer.global_step] = metrics["val_loss"]


def _two_checkpoints(tmp_path):
    # A periodic one first (every 3 steps and every epoch end) and one keeping the best by a
    # metric ("max" on a falling val_loss: the best is the first epoch, not the last).
    periodic = ModelCheckpoint(tmp_path / "periodic", every_n_steps=3, keep_last=2)
    best = ModelCheckpoint(tmp_path / "best", monitor="val_loss", mode="max", save_top_k=1)
    return periodic, best


def _bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_several_model_checkpoints_and_best_reads_the_one_that_monitors(data, tmp_path):
    periodic, best = _two_checkpoints(tmp_path)
    recorder = ValRecorder()
    trainer = Trainer(TrainerConfig(max_epochs=3,
                                    logging={"enable_progress_bar": False}), callbacks=[periodic, best, recorder])
    state = trainer.fit(_state(), *data)
    assert periodic.state_key != best.state_key
    best_step = max(recorder.val, key=recorder.val.get)
    assert best_step == 5 and best.best_model_path.name == "step_000000005"
    assert [p.name for p in list_checkpoints(tmp_path / "periodic")] == ["step_000000012", "step_000000015"]
    assert [p.name for p in list_checkpoints(tmp_path / "best")] == ["step_000000005", "step_000000010",
                                                                     "step_000000015"]
    metrics = trainer.test(state, data[1], ckpt_path="best")
    assert trainer.loaded_from == best.best_model_path
    assert metrics["test_loss"] == pytest.approx(recorder.val[best_step], rel=1e-6)  # (the same set, scored again)
    trainer.test(state, data[1], ckpt_path="last")
    assert trainer.loaded_from.name == "step_000000015"
    from jaxlight.checkpoint import resolve_checkpoint
    assert resolve_checkpoint(tmp_path / "best", "best") == best.best_model_path  # its scores, not the periodic's


def test_best_is_refused_when_ambiguous_naming_the_checkpoints(data, tmp_path):
    a = ModelCheckpoint(tmp_path / "a", monitor="val_loss")
    b = ModelCheckpoint(tmp_path / "b", monitor="val_accuracy", mode="max")
    trainer = Trainer(TrainerConfig(max_epochs=1, logging={"enable_progress_bar": False}), callbacks=[a, b])
    state = trainer.fit(_state(), *data)
    with pytest.raises(ValueError, match=r"ckpt_path='best' is ambiguous: 2 ModelCheckpoints monitor a metric "
                                         r"\(.*/a \(monitors val_loss\), .*/b \(monitors val_accuracy\)\)"):
        trainer.test(state, data[1], ckpt_path="best")
    with pytest.raises(ValueError, match="two ModelCheckpoints save into one folder"):
        Trainer(callbacks=[ModelCheckpoint(tmp_path / "a"), ModelCheckpoint(tmp_path / "a", monitor="val_loss")])


def test_several_model_checkpoints_resume_exactly(data, tmp_path):
    """Stopped after epoch 2 (both callbacks saved at step 10, the periodic one first, so its
    checkpoint holds the best one's state from before that save) and resumed from "last":
    the parameters and both callbacks' bookkeeping are the uninterrupted run's."""
    config = dict(logging={"enable_progress_bar": False})
    whole_cbs = _two_checkpoints(tmp_path / "whole")
    whole = Trainer(TrainerConfig(max_epochs=4, **config), callbacks=list(whole_cbs))
    expected = whole.fit(_state(), *data)

    first = Trainer(TrainerConfig(max_epochs=2, **config), callbacks=list(_two_checkpoints(tmp_path / "cut")))
    first.fit(_state(), *data)
    periodic, best = _two_checkpoints(tmp_path / "cut")
    resumed = Trainer(TrainerConfig(max_epochs=4, **config), callbacks=[periodic, best])
    final = resumed.fit(_state(), *data, ckpt_path="last")
    assert resumed.restored_from == tmp_path / "cut" / "periodic" / "step_000000010"
    assert _bytes(final.params) == _bytes(expected.params)
    for mine, theirs in zip((periodic, best), whole_cbs):
        assert (mine.saved, mine.scores) == (theirs.saved, theirs.scores)
        # (the best one's step 10 was pruned as in the uninterrupted run, not left behind unowned)
        assert [p.name for p in list_checkpoints(mine.dirpath)] == [p.name for p in list_checkpoints(theirs.dirpath)]
    assert best.best_model_path.name == whole_cbs[1].best_model_path.name == "step_000000005"

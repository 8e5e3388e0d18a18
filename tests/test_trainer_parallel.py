"""The Trainer under ``pmap`` and ``sharded``: one config option, the same training as one device.

Same float32 tolerance as ``test_parallel.py`` (``1e-5 + 1e-5 * |p|`` on every parameter):
splitting a batch over devices changes only the order in which per-example gradients are
summed. The Trainer adds its own host logic on top of the strategies' compiled chunks (chunks
cut by validation steps, resumes mid-epoch, host-streamed batches, gradient accumulation,
NaN checks); each of those is compared here with the same run on one device.
"""

import itertools

import jax
import numpy as np
import pytest

from _support import assert_params_close
from jaxlight import build_model, create_train_state, optim, parallel, tasks
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.checkpoint import list_checkpoints
from jaxlight.data import ArrayDataset, batch_indices
from jaxlight.parallel import ParallelError
from jaxlight.state import data_key
from jaxlight.trainer import NonFiniteLossError, Trainer, TrainerConfig

# 200 examples in batches of 32: 7 steps an epoch, the last with 8 real rows, so with 8 devices
# six of them hold only padding. Validation: 99 examples in batches of 50 (rounded up per device).
N_TRAIN, BATCH = 200, 32
TX = optim.adam(1e-3)  # one object: it is a static field of the state, a new one recompiles
TASK = tasks.multiclass()


def new_state(model="mlp", tx=TX):
    return create_train_state(build_model(model, 0), tx, TASK, seed=0)


def config(**kw):
    return TrainerConfig(**{"batch_size": BATCH, "eval_batch_size": 50, "max_epochs": 2,
                            "logging": {"enable_progress_bar": False}, **kw})


def assert_history_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.epoch == e.epoch
        assert a.metrics["count"] == e.metrics["count"]
        assert set(a.metrics) == set(e.metrics)
        for key in a.metrics:
            assert a.metrics[key] == pytest.approx(e.metrics[key], abs=1e-5), key


@pytest.fixture(scope="module")
def data(mnist):
    train, test = mnist
    return (ArrayDataset(train.images[:N_TRAIN], train.labels[:N_TRAIN].astype(np.int32)),
            ArrayDataset(test.images[:99], test.labels[:99].astype(np.int32)))


@pytest.fixture(scope="module")
def single(data):
    """The reference: the Trainer on one device, validating every 4 steps (mid-epoch cuts)."""
    trainer = Trainer(config(val_every_n_steps=4))
    state = trainer.fit(new_state(), *data)
    return state, trainer


# The fast tier runs one point of the sweep (pmap: the checkpoint test below); the whole sweep
# is in the slow tier.
FAST_SWEEP = {(8, 1, "sharded")}


@pytest.mark.parametrize(("devices", "k", "name"), [
    pytest.param(d, k, n, id=f"{d}-{k}-{n}", marks=() if (d, k, n) in FAST_SWEEP else pytest.mark.slow)
    for d, k in [(1, None), (2, 3), (8, None), (8, 1)] for n in ["pmap", "sharded"]])
def test_fit_matches_single_device(name, devices, k, data, single):
    ref_state, ref = single
    trainer = Trainer(config(val_every_n_steps=4, steps_per_execution=k,
                             parallel={"strategy": name, "devices": devices}))
    assert trainer.strategy.name == name and trainer.strategy.num_devices == devices
    state = trainer.fit(new_state(), *data)

    assert parallel.layout_of(state) == ("single" if devices == 1 else "replicated")
    assert int(state.step) == trainer.global_step == 14
    assert_params_close(state, ref_state)
    # Epoch metrics are example-weighted over every device (count is global), validation too.
    assert trainer.history[0].metrics["count"] == N_TRAIN
    assert_history_close(trainer.history, ref.history)
    for key in ("val_loss", "val_accuracy"):
        assert trainer.callback_metrics[key] == pytest.approx(ref.callback_metrics[key], abs=1e-5)
    test = trainer.test(state, data[1])
    assert test["test_accuracy"] == pytest.approx(ref.test(ref_state, data[1])["test_accuracy"], abs=1e-6)
    np.testing.assert_allclose(trainer.predict(state, data[1].x[:7]), ref.predict(ref_state, data[1].x[:7]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # (a minute of CNN compilation; fast: test_parallel.py's sharded cnn run)
def test_cnn_fit_matches_single_device(mnist):
    train, _ = mnist
    small = ArrayDataset(train.images[:80], train.labels[:80].astype(np.int32))
    expected = Trainer(config(max_epochs=1)).fit(new_state("cnn"), small)
    trainer = Trainer(config(max_epochs=1, parallel={"strategy": "sharded", "devices": 2}))
    assert_params_close(trainer.fit(new_state("cnn"), small), expected)


@pytest.mark.parametrize("name", ["pmap", "sharded"])
def test_host_streamed_batches_match_single_device(name, data, single, monkeypatch):
    """Data too big for the devices goes through the strategy's ``train_step`` batch by batch."""
    monkeypatch.setattr(ArrayDataset, "fits_on_device", lambda self, *a, **k: False)
    trainer = Trainer(config(val_every_n_steps=4, parallel={"strategy": name, "devices": 4}))
    state = trainer.fit(new_state(), *data)
    assert not isinstance(trainer._train.data.x, jax.Array)  # it really streamed
    assert_params_close(state, single[0])
    assert_history_close(trainer.history, single[1].history)


# (fast counterpart: test_cli_trainer.py, which checkpoints under sharded and resumes under pmap
# through the same Trainer)
@pytest.mark.parametrize("first, then", [
    pytest.param(("sharded", 8), ("pmap", 2), marks=pytest.mark.slow),
    pytest.param(("pmap", 4), ("single", None), marks=pytest.mark.slow),
    pytest.param(("single", None), ("sharded", 8), marks=pytest.mark.slow),
])
def test_checkpoint_resumes_under_another_strategy_and_device_count(first, then, data, single, tmp_path):
    """Stop mid-epoch 2 under one layout, resume under another: the run ends where one
    uninterrupted single-device run ends, with the same history."""
    cb = ModelCheckpoint(tmp_path, every_n_epochs=None)  # saves at fit end: step 10
    Trainer(config(max_steps=10,
                   parallel={"strategy": first[0], "devices": first[1]}), callbacks=[cb]).fit(new_state(), data[0])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000010"]
    resumed = Trainer(config(parallel={"strategy": then[0], "devices": then[1]}),
                      callbacks=[ModelCheckpoint(tmp_path, every_n_epochs=None)])
    state = resumed.fit(new_state(), data[0], ckpt_path="last")
    assert resumed.restored_from.name == "step_000000010"
    assert int(state.step) == 14
    assert parallel.layout_of(state) == ("replicated" if then[0] != "single" else "single")
    assert_params_close(state, single[0])
    for a, e in zip(resumed.history, single[1].history, strict=True):  # (no validation here)
        assert a.metrics["loss"] == pytest.approx(e.metrics["loss"], abs=1e-5)


@pytest.fixture(scope="module")
def accumulated(data):
    """One device, 3 batches per update: 7 batches an epoch make windows of 3, 3 and 1."""
    trainer = Trainer(config(accumulate_grad_batches=3, numerics={"gradient_clip_norm": 0.05}))
    return trainer.fit(new_state(), data[0]), trainer


@pytest.mark.parametrize("strategy, devices, streamed", [
    pytest.param("pmap", 4, False, marks=pytest.mark.slow), ("sharded", 8, False),
    ("pmap", 8, True), pytest.param("sharded", 4, True, marks=pytest.mark.slow),
])  # (the fast tier keeps each strategy once, fused and streamed)
def test_accumulation_and_clipping_match_single_device(data, accumulated, strategy, devices, streamed):
    """Each micro-batch's gradient is reduced over the devices before the window's mean, which
    clipping then sees; the fused and the host-streamed windows alike."""
    train = data[0]
    if streamed:  # the batches of the fused run's order, from the host, the last one short
        epochs, arrays = itertools.count(), train

        def train():
            idx, mask = batch_indices(jax.random.fold_in(data_key(0), next(epochs)), N_TRAIN, BATCH, True)
            return iter([{"x": arrays.x[i[m > 0]], "y": arrays.y[i[m > 0]]}
                         for i, m in zip(np.asarray(idx), np.asarray(mask))])
    trainer = Trainer(config(accumulate_grad_batches=3, parallel={"strategy": strategy, "devices": devices},
                             numerics={"gradient_clip_norm": 0.05}))
    state = trainer.fit(new_state(), train)
    assert int(state.step) == trainer.global_step == int(accumulated[0].step) == 6
    assert_params_close(state, accumulated[0])
    assert_history_close(trainer.history, accumulated[1].history)


def test_nan_loss_is_named_on_the_right_step(data):
    x = np.asarray(data[0].x[:160], np.float32) / 255.0
    x[130, 3, 3] = np.nan  # overfit_batches keeps the stored order: batch 5 (examples 128-159)
    trainer = Trainer(config(overfit_batches=5, parallel={"strategy": "sharded", "devices": 8},
                             numerics={"check_finite": False}))
    with pytest.raises(NonFiniteLossError, match=r"nan at step 5 \(epoch 1, batch 5\)"):
        trainer.fit(new_state(), ArrayDataset(x, data[0].y[:160]))


@pytest.mark.parametrize("kw, error, match", [
    ({"parallel": {"strategy": "ddp"}}, ValueError, "trainer.parallel.strategy: expected one of single, pmap"),
    ({"parallel": {"strategy": "pmap", "devices": 0}}, ValueError, "trainer.parallel.devices: must be an int >= 1"),
    ({"parallel": {"strategy": "sharded", "devices": 16}}, ParallelError, "asked for 16 devices but only 8"),
    ({"parallel": {"strategy": "single", "devices": 2}}, ParallelError, "single strategy runs on 1 device"),
    ({"parallel": {"strategy": "pmap", "devices": 8}, "batch_size": 60}, ParallelError,
     "global batch size 60 does not divide over 8 devices"),
])
def test_impossible_strategies_are_refused_before_training(kw, error, match):
    with pytest.raises(error, match=match):
        Trainer(config(**kw))

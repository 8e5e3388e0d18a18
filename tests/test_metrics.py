"""Epoch-level metrics (jaxlight.metrics) equal scikit-learn's on the whole split, whatever the
batch size, steps per call, strategy and device count; the Trainer logs them as train_/val_/
test_<name> and its callbacks monitor that value."""

import csv

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

import jaxlight
from jaxlight import loop, metrics, parallel
from jaxlight.callbacks import Callback, EarlyStopping, ModelCheckpoint
from jaxlight.data import ArrayDataset
from jaxlight.loggers import CSVLogger
from jaxlight.step import BatchError
from jaxlight.trainer import Trainer, TrainerConfig

C = 4
N = 203  # divides by none of the batch sizes below


class Linear(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(6, C, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def loss_fn(model, batch):
    logits = model(batch["x"])
    pred, y = logits.argmax(-1), batch["y"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses, {
        "accuracy": (pred == y).astype(jnp.float32),
        "f1": metrics.F1(pred, y, num_classes=C),
        "f1_micro": metrics.F1(logits, y, num_classes=C, average="micro"),  # (scores: their argmax)
        "f1_weighted": metrics.F1(pred, y, num_classes=C, average="weighted"),
        "precision": metrics.Precision(pred, y, num_classes=C),
        "recall": metrics.Recall(pred, y, num_classes=C),
        "cm": metrics.ConfusionMatrix(pred, y, num_classes=C),
    }


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    # Labels a linear model gets about 70% right, and no example of class 3 (macro-F1 then
    # averages over the classes that occur, as scikit-learn does).
    y = (np.argmax(x[:, :3] + 0.8 * rng.normal(size=(n, 3)), axis=1)).astype(np.int32)
    return ArrayDataset({"x": x, "y": y})


def _state(tx=None, seed=0):
    return jaxlight.create_train_state(Linear(nnx.Rngs(seed)), tx or optax.sgd(0.0), loss_fn, seed=0)


def _weights(state):
    fc = jaxlight.parallel.to_host_state(state).params["fc"]
    return np.array(fc["kernel"][...]), np.array(fc["bias"][...])


def _predictions(state_or_weights, data):
    """The model's predictions written out in numpy: argmax(x @ kernel + bias)."""
    kernel, bias = state_or_weights if isinstance(state_or_weights, tuple) else _weights(state_or_weights)
    return (np.asarray(data.data["x"]) @ kernel + bias).argmax(-1)


def sklearn_metrics(y, pred):
    return {
        "f1": f1_score(y, pred, average="macro", zero_division=0),
        "f1_micro": f1_score(y, pred, average="micro", zero_division=0),
        "f1_weighted": f1_score(y, pred, average="weighted", zero_division=0),
        "precision": precision_score(y, pred, average="macro", zero_division=0),
        "recall": recall_score(y, pred, average="macro", zero_division=0),
        "accuracy": float(np.mean(y == pred)),
    }


def assert_sklearn(result, data, pred, prefix=""):
    y = np.asarray(data.data["y"])
    for name, expected in sklearn_metrics(y, pred).items():
        assert result[prefix + name] == pytest.approx(expected, abs=1e-12 if name != "accuracy" else 1e-6), name
    np.testing.assert_array_equal(result[prefix + "cm"], confusion_matrix(y, pred, labels=range(C)))


@pytest.fixture(scope="module")
def data():
    return _data()


def test_the_split_is_a_real_check(data):
    """The reference is not trivial: the mean of per-batch macro-F1 differs from the split's."""
    state = _state()
    y, pred = np.asarray(data.data["y"]), _predictions(state, data)
    per_batch = np.mean([f1_score(y[i:i + 16], pred[i:i + 16], average="macro") for i in range(0, N, 16)])
    assert abs(per_batch - f1_score(y, pred, average="macro")) > 1e-3
    assert 3 not in set(y) and 0.3 < np.mean(y == pred) < 0.95


@pytest.mark.parametrize("batch_size, k", [(16, 1), (16, 5), (16, None), (64, None), (203, 1), (500, None)])
def test_evaluate_equals_sklearn_for_every_batch_size_and_k(data, batch_size, k):
    state = _state()
    result = loop.evaluate(state, data.to_device(), batch_size=batch_size, steps_per_call=k)
    assert_sklearn(result, data, _predictions(state, data))
    assert result["count"] == N and result["cm"].dtype == np.int64


def test_an_iterable_of_batches_gives_the_same(data):
    state = _state()
    x, y = np.asarray(data.data["x"]), np.asarray(data.data["y"])
    batches = [{"x": x[i:i + 50], "y": y[i:i + 50]} for i in range(0, N, 50)]  # the last has 3 rows: padded
    assert_sklearn(loop.evaluate(state, batches), data, _predictions(state, data))


@pytest.mark.parametrize("name, devices", [
    ("sharded", 8), ("pmap", 8), ("fsdp", 4),
    pytest.param("pmap", 2, marks=pytest.mark.slow), pytest.param("sharded", 2, marks=pytest.mark.slow),
])
def test_every_strategy_and_device_count_gives_the_split_value(data, name, devices):
    state = _state()
    strategy = parallel.make_strategy(name, devices)
    fused = loop.evaluate(state, data.to_device(), batch_size=24, steps_per_call=3, strategy=strategy)
    assert_sklearn(fused, data, _predictions(state, data))
    streamed = loop.evaluate(state, data, batch_size=32, strategy=strategy)  # host memory: one batch per call
    assert_sklearn(streamed, data, _predictions(state, data))


class RecordParams(Callback):
    """The state each validation scored, to compute the reference from."""

    def __init__(self):
        self.states = []

    def on_validation_end(self, trainer, state, metrics):
        self.states.append((trainer.global_step, _weights(state), dict(metrics)))


@pytest.mark.parametrize("strategy, k, accumulate", [
    ("single", None, 1), ("pmap", None, 2),  # (2 micro-batches an update)
    pytest.param("single", 2, 1, marks=pytest.mark.slow), pytest.param("sharded", 1, 1, marks=pytest.mark.slow),
])
def test_the_trainer_logs_train_val_and_test_values_of_the_whole_split(tmp_path, data, strategy, k, accumulate):
    train, val = _data(150, seed=1), data
    recorder = RecordParams()
    trainer = Trainer(TrainerConfig(max_epochs=2, batch_size=32, eval_batch_size=48, steps_per_execution=k, accumulate_grad_batches=accumulate,
                                    parallel={"strategy": strategy, "devices": None if strategy == "single" else 8},
                                    logging={"enable_progress_bar": False}),
                      callbacks=[recorder], loggers=[CSVLogger(tmp_path)])
    # lr 0: the parameters stay put, so the epoch's training predictions are those of the
    # initial model, which numpy computes
    state = trainer.fit(_state(), train, val)
    y_train = np.asarray(train.data["y"])
    train_f1 = f1_score(y_train, _predictions(state, train), average="macro", zero_division=0)
    assert trainer.callback_metrics["train_f1"] == pytest.approx(train_f1, abs=1e-12)
    assert [r.metrics["f1"] for r in trainer.history] == pytest.approx([train_f1] * 2, abs=1e-12)
    for step, scored, logged in recorder.states:
        assert_sklearn(logged, val, _predictions(scored, val), prefix="val_")
    test = trainer.test(state, val)
    assert_sklearn(test, val, _predictions(state, val), prefix="test_")
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    columns = set(rows[0])
    assert {"train_f1", "val_f1", "test_f1", "val_precision", "train_loss_step"} <= columns
    assert not columns & {"train_f1_step", "train_f1_epoch"}  # the epoch's value, not per-step batch values
    assert not any("cm" in c for c in columns)  # a matrix is no number for a logger
    logged_val = [float(r["val_f1"]) for r in rows if r.get("val_f1")]
    assert logged_val == pytest.approx([m["val_f1"] for _, _, m in recorder.states], abs=1e-12)


def f1_loss(model, batch):
    logits = model(batch["x"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return losses, {"f1": metrics.F1(logits.argmax(-1), batch["y"], num_classes=C)}


def test_callbacks_monitor_the_split_value(tmp_path):
    """ModelCheckpoint(monitor="val_f1") keeps the epoch whose model scores the best F1 on the
    whole validation split by scikit-learn, and EarlyStopping counts on the same values."""
    train, val = _data(300, seed=2), _data(N, seed=3)
    recorder = RecordParams()
    best = ModelCheckpoint(tmp_path, monitor="val_f1", mode="max")
    stopper = EarlyStopping("val_f1", mode="max", patience=10)
    trainer = Trainer(TrainerConfig(max_epochs=4, batch_size=16, eval_batch_size=40,
                                    logging={"enable_progress_bar": False}),
                      callbacks=[recorder, best, stopper])
    state = jaxlight.create_train_state(Linear(nnx.Rngs(5)), optax.sgd(0.05), f1_loss, seed=0)
    trainer.fit(state, train, val)
    y = np.asarray(val.data["y"])
    scores = {step: f1_score(y, _predictions(s, val), average="macro", zero_division=0)
              for step, s, _ in recorder.states}
    assert len(set(np.round(list(scores.values()), 6))) > 1  # the choice is not trivial
    assert best.best_model_path.name == f"step_{max(scores, key=scores.get):09d}"
    assert stopper.best == pytest.approx(max(scores.values()), abs=1e-12)


def test_a_resumed_epoch_keeps_its_statistics(tmp_path):
    """Saved inside an epoch, the steps run so far keep their F1 statistics: the resumed
    run's epoch value is the uninterrupted run's, bit for bit."""
    train = _data(160, seed=4)
    config = dict(batch_size=16, logging={"enable_progress_bar": False}, steps_per_execution=1)

    def fit(max_epochs, ckpt_path=None, **kw):
        trainer = Trainer(TrainerConfig(max_epochs=max_epochs, **config, **kw),
                          callbacks=[ModelCheckpoint(tmp_path, every_n_steps=4, every_n_epochs=None)])
        state = jaxlight.create_train_state(Linear(nnx.Rngs(1)), optax.sgd(0.05), f1_loss, seed=0)
        trainer.fit(state, train, ckpt_path=ckpt_path)
        return trainer

    whole = Trainer(TrainerConfig(max_epochs=2, **config))
    whole.fit(jaxlight.create_train_state(Linear(nnx.Rngs(1)), optax.sgd(0.05), f1_loss, seed=0), train)
    fit(2, max_steps=14)  # stops in the second epoch (10 steps each); saved at step 12 and 14
    resumed = fit(2, ckpt_path=tmp_path / "step_000000012")
    assert [r.metrics["f1"] for r in resumed.history] == [r.metrics["f1"] for r in whole.history]
    assert resumed.callback_metrics["train_f1"] == whole.callback_metrics["train_f1"]


class MeanAbsoluteError(metrics.Metric):
    """A user's metric: summed errors over summed counts."""

    def __init__(self, pred, target, scale=1.0):
        self.scale = scale
        super().__init__(error=jnp.abs(pred - target), count=jnp.ones(target.shape, jnp.int32))

    def compute(self, totals):
        return self.scale * totals["error"] / totals["count"]


def test_a_users_own_metric(data):
    def reg_loss(model, batch):
        out = model(batch["x"])[:, 0]
        target = batch["x"][:, 1]
        return (out - target) ** 2, {"mae": MeanAbsoluteError(out, target, scale=2.0)}

    state = jaxlight.create_train_state(Linear(nnx.Rngs(0)), optax.sgd(0.0), reg_loss)
    fc = state.params["fc"]
    x = np.asarray(data.data["x"], np.float64)
    out = x @ np.asarray(fc["kernel"][...], np.float64)[:, 0] + float(fc["bias"][...][0])
    expected = 2.0 * np.mean(np.abs(out - x[:, 1]))
    for batch_size in (16, 203):
        result = loop.evaluate(state, data, batch_size=batch_size)
        assert result["mae"] == pytest.approx(expected, rel=1e-5)


def test_bad_metric_inputs_are_named():
    with pytest.raises(ValueError, match=r"pred must be \(B,\) class indices.*threshold it"):
        metrics.F1(jnp.zeros((4,), jnp.float32), jnp.zeros((4,), jnp.int32), num_classes=2)
    with pytest.raises(ValueError, match="average must be one of"):
        metrics.F1(jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.int32), num_classes=2, average="samples")

    class Scalar(metrics.Metric):
        def __init__(self, x):
            super().__init__(total=jnp.sum(x))

        def compute(self, totals):
            return totals["total"]

    def bad_loss(model, batch):
        out = model(batch["x"])
        return jnp.sum(out ** 2, axis=1), {"s": Scalar(out)}

    state = jaxlight.create_train_state(Linear(nnx.Rngs(0)), optax.sgd(0.0), bad_loss)
    with pytest.raises(BatchError, match=r"metric 's' \(Scalar\) statistic 'total' has shape \(\); "
                                         r"expected \(8, \.\.\.\)"):
        loop.evaluate(state, _data(16), batch_size=8)

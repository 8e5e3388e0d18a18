"""The learning rate logged is the one each optimizer update applied, read from the optimizer
itself (jaxlight.optim.learning_rate) for any optax transformation, checked against the
schedule written out by hand; where it cannot be read, one warning and no column."""

import csv
import math
import warnings

import jax
import optax
import pytest

import jaxlight
from jaxlight import build_model, create_train_state, tasks
from jaxlight.callbacks import LearningRateMonitor
from jaxlight.loggers import CSVLogger
from jaxlight.trainer import Trainer, TrainerConfig

PEAK, WARMUP, DECAY, END = 3e-3, 3, 10, 1e-5


def by_hand(t: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, PEAK, WARMUP, DECAY, END) at update count t:
    linear from 0 to PEAK over WARMUP updates, then half a cosine down to END at DECAY."""
    if t < WARMUP:
        return PEAK * t / WARMUP
    frac = min(t - WARMUP, DECAY - WARMUP) / (DECAY - WARMUP)
    return END + (PEAK - END) * 0.5 * (1 + math.cos(math.pi * frac))


def schedule():
    return optax.warmup_cosine_decay_schedule(0.0, PEAK, WARMUP, DECAY, END)


def users_optimizer(peak_lr=PEAK, total=DECAY):
    """A user's own optimizer function: its own warmup + cosine, clipping, weight decay; the
    rate is under neither of the names 'learning_rate' or 'lr'."""
    sched = optax.warmup_cosine_decay_schedule(0.0, peak_lr, WARMUP, total, END)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))


OPTIMIZERS = {
    "adam(schedule)": lambda: optax.adam(schedule()),
    "a user's function": users_optimizer,
    "inject_hyperparams(adam)(schedule)": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=schedule()),
    "freeze(sgd(schedule))": lambda: jaxlight.freeze(optax.sgd(schedule(), momentum=0.9), ["linear.bias"]),
}


def _fit(tmp_path, tx, k=None, **config):
    monitor = LearningRateMonitor()
    trainer = Trainer(TrainerConfig(max_epochs=2, batch_size=64, steps_per_execution=k, **config,
                                    logging={"enable_progress_bar": False}), callbacks=[monitor], loggers=[CSVLogger(tmp_path)])
    trainer.fit(create_train_state(build_model("softmax", 0), tx, tasks.multiclass(), seed=0), _fit.train)
    return monitor, list(csv.DictReader(open(tmp_path / "metrics.csv")))


@pytest.fixture(autouse=True)
def train(small_mnist):
    _fit.train = small_mnist[0]  # 320 examples: 5 updates an epoch


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("k", [None, 1])  # the whole epoch in one compiled call, and one step per call
def test_the_rate_logged_is_the_rate_each_update_applied(tmp_path, name, k):
    if k == 1 and name != "a user's function":
        pytest.skip("(one step per call: one optimizer is enough)")
    monitor, rows = _fit(tmp_path, OPTIMIZERS[name](), k)
    # Update s (logged at step s) applies the rate at count s - 1.
    assert [s for s, _ in monitor.history] == list(range(1, 11))
    expected = [by_hand(s - 1) for s in range(1, 11)]
    assert [lr for _, lr in monitor.history] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    logged = {int(r["step"]): float(r["lr"]) for r in rows if r.get("lr")}
    assert logged == pytest.approx({s: by_hand(s - 1) for s in range(1, 11)}, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("tx, rate", [
    (optax.adam(2e-3), 2e-3), (optax.inject_hyperparams(optax.sgd)(learning_rate=0.05), 0.05),
    (jaxlight.optim.adamw(1e-3), 1e-3),
])
def test_a_constant_rate_is_read_from_the_optimizer(tmp_path, tx, rate):
    monitor, _ = _fit(tmp_path, tx)
    assert monitor.history == [(s, pytest.approx(rate)) for s in range(1, 11)]


def test_clipping_and_nan_skipping_wrappers_keep_the_rate_readable(tmp_path):
    monitor, _ = _fit(tmp_path, optax.adam(schedule()), numerics={"gradient_clip_norm": 0.5, "nan_policy": "skip"})
    assert [lr for _, lr in monitor.history] == pytest.approx([by_hand(s - 1) for s in range(1, 11)], rel=1e-5)


def test_an_unreadable_rate_warns_once_and_logs_no_column(tmp_path):
    """One rate per parameter group: no single rate is the one applied, so none is logged."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "k" if "kernel" in jax.tree_util.keystr(path)
                                                else "b", params)

    tx = optax.multi_transform({"k": optax.adam(1e-3), "b": optax.sgd(1e-2)}, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor, rows = _fit(tmp_path, tx)
    ours = [w for w in caught if "LearningRateMonitor" in str(w.message)]
    assert len(ours) == 1 and "scales its updates in 2 places" in str(ours[0].message)
    assert "no lr column is logged" in str(ours[0].message)
    assert monitor.history == [] and "lr" not in rows[0]

"""Cheap sweeps: a new Trainer per trial. An injectable optimizer (optax.inject_hyperparams)
compiles the train and eval programs once for a whole sweep of learning rates and other float
hyperparameters; a plain optax.adam(lr) compiles its train program once per rate and shares
the evaluation programs; memory stays flat (bounded program cache); results stay bitwise
deterministic and resumable."""

import ctypes
import gc

import jax
import numpy as np
import optax
import pytest

from jaxlight import build_model, create_train_state, step, tasks
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.checkpoint import CheckpointWarning
from jaxlight.data import ArrayDataset
from jaxlight.loggers import CSVLogger
from jaxlight.runconfig import ConfigMismatchError
from jaxlight.trainer import Trainer, TrainerConfig
from _support import count_compilations

RATES = [1e-3, 3e-3, 1e-2, 3e-2]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (190, 28, 28), dtype=np.uint8), rng.integers(0, 10, 190).astype(np.int32)
    return ArrayDataset(x[:150], y[:150]), ArrayDataset(x[150:], y[150:])


def injectable(lr, b1=0.9):
    return optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=b1)


def trial(data, tx, folder=None, strategy="single", epochs=2, **config):
    """One trial as a sweep runs it: a new state, a new Trainer (with a checkpoint and a CSV
    logger when ``folder`` is given), fit, test, predict."""
    state = create_train_state(build_model("softmax", 0), tx, tasks.multiclass(), seed=0)
    callbacks, loggers = ([ModelCheckpoint(folder / "ckpt")], [CSVLogger(folder / "logs")]) if folder else ([], [])
    trainer = Trainer(TrainerConfig(max_epochs=epochs, batch_size=32, eval_batch_size=40, **config,
                                    logging={"enable_progress_bar": False},
                                    parallel={"strategy": strategy, "devices": None if strategy == "single" else 8}),
                      callbacks=callbacks, loggers=loggers)
    state = trainer.fit(state, *data)
    trainer.test(state, data[1])
    trainer.predict(state, data[1])
    return state, trainer


def _initial_rate(state) -> float:
    """The learning rate ``state.tx.init`` puts in a fresh optimizer state."""
    fresh = state.tx.init(state.params)
    injected = [s for s in jax.tree.leaves(fresh, is_leaf=lambda x: hasattr(x, "hyperparams"))
                if hasattr(s, "hyperparams")]
    return float(injected[0].hyperparams["learning_rate"])


def _params(state):
    return [np.array(a) for a in jax.tree.leaves(jax.device_get(state.params))]


@pytest.mark.parametrize("strategy, config", [
    # (the bare injectable optimizer: the slow tier; the fast tier runs it inside jaxlight's own
    # wrappers, the case below, and bare under the sharded strategy)
    pytest.param("single", {}, marks=pytest.mark.slow),
    ("single", {"numerics": {"gradient_clip_norm": 1.0, "nan_policy": "skip"}}),  # jaxlight's own optimizer wrappers
    ("sharded", {}),
])
def test_an_injectable_optimizer_compiles_once_for_a_whole_sweep(data, tmp_path, strategy, config):
    trial(data, injectable(RATES[0]), tmp_path / "warm", strategy, **config)  # compiles what the sweep needs
    results = {}
    with count_compilations() as compiled:
        for i, (lr, b1) in enumerate(zip(RATES, (0.9, 0.8, 0.9, 0.8))):
            state, trainer = trial(data, injectable(lr, b1), tmp_path / str(i), strategy, **config)
            results[lr, b1] = _params(state)
            # The returned state's optimizer is this trial's (its init sets this trial's rate), not the
            # equal one of the trial that compiled the programs.
            assert _initial_rate(state) == pytest.approx(lr)
    assert len(compiled) == 0
    first = results[RATES[0], 0.9]
    assert all(any(np.abs(a - b).max() > 1e-6 for a, b in zip(first, other))  # (and they differ: no false sharing)
               for key, other in results.items() if key != (RATES[0], 0.9))
    assert len(results) == 4


def test_a_plain_optimizer_compiles_only_its_train_program_per_rate(data):
    trial(data, optax.adam(RATES[0]))
    per_trial = []
    for lr in RATES[1:]:
        with count_compilations() as compiled:
            trial(data, optax.adam(lr))
        per_trial.append(len(compiled))
    assert per_trial == [1] * 3  # the train chunk; evaluation and prediction programs are shared
    with count_compilations() as compiled:
        trial(data, optax.adam(RATES[1]))  # a new object with a rate seen before: nothing to compile
    assert len(compiled) == 0


def test_the_shared_program_computes_what_a_dedicated_one_does(data):
    """Bitwise: a trial run inside a sweep (on programs another rate compiled) equals the same
    trial with every program compiled for it alone, and the sweep's order does not matter."""
    swept = [_params(trial(data, injectable(lr))[0]) for lr in (RATES[0], RATES[2], RATES[0])]
    assert [a.tobytes() for a in swept[0]] == [a.tobytes() for a in swept[2]]
    jax.clear_caches()
    step.set_program_cache_size(1)
    try:
        trial(data, optax.adam(1e-3))  # (evicts every cached configuration)
        alone = _params(trial(data, injectable(RATES[2]))[0])
    finally:
        step.set_program_cache_size(8)
    assert [a.tobytes() for a in alone] == [a.tobytes() for a in swept[1]]


def test_a_trial_resumes_exactly_and_the_optimizer_check_holds(data, tmp_path):
    """A trial's checkpoint, resumed after other trials ran on the same programs, continues
    bit for bit; resuming it with another optimizer is refused as ever."""
    whole, _ = trial(data, injectable(RATES[1]))
    cut = Trainer(TrainerConfig(max_epochs=2, max_steps=7, batch_size=32, logging={"enable_progress_bar": False}),
                  callbacks=[ModelCheckpoint(tmp_path / "a")])
    cut.fit(create_train_state(build_model("softmax", 0), injectable(RATES[1]), tasks.multiclass(), seed=0), *data)
    trial(data, injectable(RATES[3]))  # another trial in between
    resumed = Trainer(TrainerConfig(max_epochs=2, batch_size=32, eval_batch_size=40,
                                    logging={"enable_progress_bar": False}),
                      callbacks=[ModelCheckpoint(tmp_path / "a")])
    state = resumed.fit(create_train_state(build_model("softmax", 0), injectable(RATES[1]), tasks.multiclass(),
                                           seed=0), *data, ckpt_path="last")
    assert resumed.restored_from.name == "step_000000007"
    assert [a.tobytes() for a in _params(state)] == [a.tobytes() for a in _params(whole)]
    with pytest.raises(ConfigMismatchError, match="saved with optimizer"), pytest.warns(CheckpointWarning):
        Trainer(TrainerConfig(max_epochs=2, batch_size=32, logging={"enable_progress_bar": False}),
                callbacks=[ModelCheckpoint(tmp_path / "a")]).fit(
            create_train_state(build_model("softmax", 0), optax.adam(RATES[1]), tasks.multiclass(), seed=0), *data,
            ckpt_path="last")


def rss_mb() -> float:
    """Resident memory, after a collection and after returning the allocator's free pages
    (glibc keeps freed memory: without the trim, fragmentation reads as growth)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _growth_per_fit(data, tmp_path, make_tx, warmup, fits):
    for i in range(warmup):
        trial(data, make_tx(i), tmp_path / f"w{i}", epochs=1)
    start = rss_mb()
    for i in range(fits):
        trial(data, make_tx(warmup + i), tmp_path / f"t{i}", epochs=1)
    return (rss_mb() - start) / fits


@pytest.mark.slow  # (fast: test_reliability_trust's ..._leaves_no_object_behind)
def test_memory_stays_flat_over_a_sweep(data, tmp_path):
    """Injectable optimizer, a new rate and a new Trainer with a ModelCheckpoint and a
    CSVLogger per fit: at most 1 MB per fit (the slow tier runs 100 fits)."""
    growth = _growth_per_fit(data, tmp_path, lambda i: injectable(1e-3 * (1 + i / 50)), warmup=6, fits=20)
    print(f"{growth:.3f} MB per fit")
    assert growth <= 1.0, f"{growth:.2f} MB per fit"


@pytest.mark.slow
@pytest.mark.parametrize("kind, fits", [("injectable", 100), ("plain", 60)])
def test_memory_stays_flat_over_long_sweeps(data, tmp_path, kind, fits):
    """A plain optax.adam(lr) compiles a train program per rate; the program cache keeps 8
    configurations' programs, so after it fills memory stays flat too."""
    make = (lambda i: injectable(1e-3 * (1 + i / fits))) if kind == "injectable" else (
        lambda i: optax.adam(1e-3 * (1 + i / fits)))
    growth = _growth_per_fit(data, tmp_path, make, warmup=12, fits=fits)
    print(f"{growth:.3f} MB per fit")
    assert growth <= 1.0, f"{growth:.2f} MB per fit"

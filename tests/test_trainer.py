"""The Trainer: same numbers as the bare compiled loop for every K, limits, Optax wrappers,
precision, NaN handling, smoke modes, SIGTERM."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlight import build_model, create_train_state, optim, tasks
from jaxlight.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from jaxlight.checkpoint import list_checkpoints
from jaxlight.data import ArrayDataset, batch_indices, num_batches
from jaxlight.loggers import CSVLogger
from jaxlight.step import train_chunk
from jaxlight.trainer import NonFiniteLossError, Trainer, TrainerConfig

B = 64
# One optimizer object per kind for the whole module: the optimizer is a static field of the
# state, so every new object would compile the steps again.
ADAM = optim.adam(1e-2)
SGD = optim.sgd(1.0)
SCHEDULE = optax.linear_schedule(1e-2, 0.0, transition_steps=10)
ADAM_SCHEDULED = optim.adam(SCHEDULE)


@pytest.fixture(scope="module")
def small(mnist):
    """320 training images (5 batches of 64) and 200 validation images."""
    train, test = mnist
    return ArrayDataset(train.images[:320], train.labels[:320]), ArrayDataset(test.images[:200], test.labels[:200])


def _state(model="softmax", tx=None):
    return create_train_state(build_model(model, 0), tx or ADAM, tasks.multiclass(), seed=0)


def _config(**kw):
    return TrainerConfig(**{"batch_size": B, "logging": {"enable_progress_bar": False}, **kw})


def hand_loop(state, data, epochs):
    """What a user writes by hand: one fused train_chunk per epoch over the device data."""
    d = data.to_device()
    nb = num_batches(len(data), B)
    for epoch in range(epochs):
        idx, mask = batch_indices(jax.random.fold_in(state.rng, epoch), len(data), B, True)
        state, _ = train_chunk(state, d.data, idx, mask, nb, 0)
    return state


def reference_fit(state, data, epochs, tx):
    """An independent reference for the softmax model: its forward pass (``x / 255`` flattened,
    ``x @ kernel + bias``), the mean cross-entropy of each batch, ``jax.grad`` and the Optax
    transformation ``tx``, written out here, over the batches ``batch_indices`` orders (the
    data order is tested in tests/data/test_arrays.py). Returns the final parameters as numpy."""
    linear = state.params["linear"]
    params = {"kernel": jnp.asarray(linear["kernel"][...]), "bias": jnp.asarray(linear["bias"][...])}
    x = jnp.asarray(np.asarray(data.x).reshape(len(data), -1), jnp.float32) / 255.0
    y = jnp.asarray(np.asarray(data.y), jnp.int32)

    def loss(p, rows):
        logits = x[rows] @ p["kernel"] + p["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[rows]).mean()

    grad = jax.jit(jax.grad(loss))
    opt_state = tx.init(params)
    for epoch in range(epochs):
        idx, mask = batch_indices(jax.random.fold_in(state.rng, epoch), len(data), B, True)
        assert float(mask.min()) == 1.0  # whole batches: the mean over the batch is the masked mean
        for rows in idx:
            updates, opt_state = tx.update(grad(params, rows), opt_state, params)
            params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in params.items()}


def assert_matches_reference(state, reference):
    linear = state.params["linear"]
    np.testing.assert_allclose(np.asarray(linear["kernel"][...]), reference["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(linear["bias"][...]), reference["bias"], rtol=1e-5, atol=1e-6)


def _bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_chunk_end(self, trainer, state, metrics):
        self.events.append(("chunk", trainer.global_step, len(metrics["loss"])))

    def on_validation_end(self, trainer, state, metrics):
        self.events.append(("val", trainer.global_step, sorted(metrics)))

    def on_epoch_end(self, trainer, state, metrics):
        self.events.append(("epoch", trainer.epoch, trainer.global_step))

    def of(self, kind):
        return [e[1] for e in self.events if e[0] == kind]


@pytest.mark.parametrize("model, k, extra", [
    pytest.param("softmax", None, {}, marks=pytest.mark.slow),  # K = the epoch: one compiled call per epoch
    pytest.param("softmax", 1, {}, marks=pytest.mark.slow),     # step by step, at top level (no scan)
    ("softmax", 2, {}),                          # chunks of 2, the last one short
    ("softmax", None, {"val_every_n_steps": 3}),  # chunks cut on the validation steps
    pytest.param("mlp", 1, {}, marks=pytest.mark.slow),
    pytest.param("mlp", None, {}, marks=pytest.mark.slow),
])
def test_fit_is_bitwise_the_hand_written_loop_for_every_k(small, model, k, extra):
    train, val = small
    expected = hand_loop(_state(model), train, 2)
    state = Trainer(_config(max_epochs=2, steps_per_execution=k, **extra)).fit(_state(model), train, val)
    assert int(state.step) == 10
    assert _bytes(state.params) == _bytes(expected.params)
    assert _bytes(state.opt_state) == _bytes(expected.opt_state)


def test_data_too_big_for_the_device_streams_through_train_step(small, monkeypatch):
    train, val = small
    expected = hand_loop(_state(tx=SGD), train, 2)
    monkeypatch.setattr(ArrayDataset, "fits_on_device", lambda self, *a, **k: False)
    trainer = Trainer(_config(max_epochs=2, steps_per_execution=2))
    state = trainer.fit(_state(tx=SGD), train, val)
    assert not isinstance(trainer._train.data.x, jax.Array)  # really stayed on the host
    assert _bytes(state.params) == _bytes(expected.params)  # the streamed path is the fused one, bit for bit
    assert_matches_reference(state, reference_fit(_state(tx=SGD), train, 2, optax.sgd(1.0)))


@pytest.mark.slow
def test_conv_chunks_are_bitwise_the_single_steps(small):
    """XLA:CPU compiles a convolution's weight gradient differently inside a while loop (another
    layout, another summation order: ~1e-6 relative differences per step); the Trainer unrolls
    conv chunks on the CPU, which gives back the single-step program's bits."""
    train = small[0].take(192)
    one = Trainer(_config(max_epochs=1, steps_per_execution=1)).fit(_state("cnn"), train)
    fused = Trainer(_config(max_epochs=1, steps_per_execution=3)).fit(_state("cnn"), train)
    assert _bytes(fused.params) == _bytes(one.params)


@pytest.mark.parametrize("kw, final_step, val_steps, epochs_done", [
    ({"max_epochs": 2}, 10, [5, 10], 2),
    ({"max_epochs": 3, "max_steps": 7}, 7, [5], 1),
    ({"max_epochs": 2, "val_every_n_steps": 3}, 10, [3, 5, 6, 9, 10], 2),
    ({"max_epochs": 4, "val_every_n_epochs": 2}, 20, [10, 20], 4),
    ({"max_epochs": 2, "val_every_n_epochs": None}, 10, [], 2),
])
def test_limits_and_validation_schedule(small, kw, final_step, val_steps, epochs_done):
    rec = Recorder()
    trainer = Trainer(_config(**kw), callbacks=[rec])
    state = trainer.fit(_state(), *small)
    assert int(state.step) == trainer.global_step == final_step
    assert rec.of("val") == val_steps
    assert len(trainer.history) == epochs_done
    assert all(n >= 1 for _, _, n in [e for e in rec.events if e[0] == "chunk"])


@pytest.mark.parametrize("kw", [
    {"numerics": {"gradient_clip_norm": 0.05}},
    pytest.param({"numerics": {"nan_policy": "skip"}}, marks=pytest.mark.slow),  # fast counterpart: test_nan_skip_policy_drops_those_updates_and_carries_on
])
def test_optax_wrappers_are_the_same_chain_as_by_hand(small, kw):
    train, _ = small
    config = _config(max_epochs=2, **kw)
    state = Trainer(config).fit(_state(tx=SGD), train)
    by_hand = {  # the chain the config stands for, written out with Optax
        "gradient_clip_norm": optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(1.0)),
        "nan_policy": optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=10),  # (finite data: a no-op)
    }[next(iter(kw["numerics"]))]
    assert_matches_reference(state, reference_fit(_state(tx=SGD), train, 2, by_hand))
    if "gradient_clip_norm" in kw["numerics"]:  # the clipping did bind: unclipped SGD ends elsewhere
        unclipped = reference_fit(_state(tx=SGD), train, 2, optax.sgd(1.0))
        assert np.abs(unclipped["kernel"] - np.asarray(state.params["linear"]["kernel"][...])).max() > 1e-3


def test_clipping_bounds_the_update(small):
    train, _ = small
    start = _state(tx=SGD)
    before = [np.asarray(x) for x in jax.tree.leaves(start.params)]
    clipped = Trainer(_config(max_steps=1, numerics={"gradient_clip_norm": 1e-3})).fit(_state(tx=SGD), train)
    delta = np.sqrt(sum(((np.asarray(a) - b) ** 2).sum() for a, b in zip(jax.tree.leaves(clipped.params), before)))
    assert 0 < delta <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("accumulate", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_lr_schedule_is_followed_and_logged(small, accumulate):
    train, _ = small
    schedule = SCHEDULE
    monitor = LearningRateMonitor(schedule)
    Trainer(_config(max_epochs=2, max_steps=5, steps_per_execution=1, accumulate_grad_batches=accumulate),
            callbacks=[monitor]).fit(_state(tx=ADAM_SCHEDULED), train)
    # A step is an optimizer update (a window of `accumulate` batches); step s applies the
    # rate of update s - 1 and is logged at s.
    assert monitor.history == [(s, pytest.approx(float(schedule(s - 1)))) for s in range(1, 6)]


def test_bf16_computes_in_bf16_and_keeps_float32_params(small):
    train, val = small
    f32 = Trainer(_config(max_epochs=2)).fit(_state("mlp"), train, val)
    t16 = Trainer(_config(max_epochs=2, numerics={"precision": "bf16"}))
    b16 = t16.fit(_state("mlp"), train, val)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(b16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(b16.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert _bytes(b16.params) != _bytes(f32.params)  # bf16 really was used
    t32 = Trainer(_config(max_epochs=2))
    t32.fit(_state("mlp"), train, val)
    for a, b in zip(t16.history, t32.history):  # ... and trains as well, to bf16 accuracy
        assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], rel=0.03)
        assert a.metrics["val_loss"] == pytest.approx(b.metrics["val_loss"], rel=0.03)


def _with_nan(train, example):
    x = np.asarray(train.x, np.float32) / 255.0
    x[example, 3, 3] = np.nan
    return ArrayDataset(x, train.y)


def test_nan_loss_names_the_step_and_writes_no_checkpoint(small, tmp_path):
    # overfit_batches keeps the stored order: example 130 lies in batch 3 (examples 128-191).
    data = _with_nan(small[0], 130)
    ckpt = ModelCheckpoint(tmp_path, every_n_steps=5, every_n_epochs=None)
    trainer = Trainer(_config(max_epochs=2, overfit_batches=5, steps_per_execution=5,
                              numerics={"check_finite": False}), callbacks=[ckpt])
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3 \(epoch 1, batch 3\)"):
        trainer.fit(_state(), data)
    assert list_checkpoints(tmp_path) == []  # the chunk of steps 1-5 held the NaN: step 5 not saved


def test_nan_loss_names_the_step_in_a_later_chunk(small, tmp_path):
    data = _with_nan(small[0], 130)
    ckpt = ModelCheckpoint(tmp_path, every_n_steps=1, every_n_epochs=None, keep_last=5)
    trainer = Trainer(_config(max_epochs=2, overfit_batches=5, steps_per_execution=1,
                              numerics={"check_finite": False}), callbacks=[ckpt])
    with pytest.raises(NonFiniteLossError, match="at step 3 "):
        trainer.fit(_state(), data)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000001", "step_000000002"]


def test_nan_skip_policy_drops_those_updates_and_carries_on(small):
    data = _with_nan(small[0], 130)
    trainer = Trainer(_config(max_epochs=2, overfit_batches=5, numerics={"nan_policy": "skip", "check_finite": False}))
    state = trainer.fit(_state(), data)
    assert trainer.skipped_steps == [3, 8]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert all(np.isfinite(r.metrics["loss"]) for r in trainer.history)


def test_fast_dev_run_runs_n_batches_and_writes_nothing(small, tmp_path):
    trainer = Trainer(_config(max_epochs=5, fast_dev_run=2),
                      callbacks=[ModelCheckpoint(tmp_path / "ckpt", every_n_steps=1)],
                      loggers=[CSVLogger(tmp_path / "logs")])
    state = trainer.fit(_state(), *small)
    assert int(state.step) == 2
    assert "val_loss" in trainer.callback_metrics
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_overfit_batches_memorises_them(small):
    trainer = Trainer(_config(max_epochs=40, overfit_batches=2, val_every_n_epochs=40))
    trainer.fit(_state(), *small)
    assert trainer.num_batches == 2
    assert trainer.history[-1].metrics["val_accuracy"] == 1.0  # validated on the same 128 images


def test_early_stopping_stops_fit(small):
    # "max" on a falling loss: the second validation is no improvement, patience 1 stops there.
    stopper = EarlyStopping("val_loss", mode="max", patience=1)
    trainer = Trainer(_config(max_epochs=10), callbacks=[stopper])
    trainer.fit(_state(), *small)
    assert len(trainer.history) == 2 and stopper.stopped_step == 10


def test_sigterm_saves_at_the_next_chunk_boundary_and_returns(small, tmp_path):
    class SendSigterm(Callback):
        def on_train_chunk_end(self, trainer, state, metrics):
            if trainer.global_step == 7:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    ckpt = ModelCheckpoint(tmp_path, every_n_epochs=None)
    trainer = Trainer(_config(max_epochs=3, steps_per_execution=1), callbacks=[ckpt, SendSigterm()])
    state = trainer.fit(_state(), *small)
    assert trainer.interrupted and int(state.step) == 7
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000007"]
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    resumed = Trainer(_config(max_epochs=3), callbacks=[ModelCheckpoint(tmp_path, every_n_epochs=None)])
    final = resumed.fit(_state(), *small, ckpt_path="last")
    assert _bytes(final.params) == _bytes(hand_loop(_state(), small[0], 3).params)


def test_a_signal_while_the_processes_agree_on_stopping_is_not_lost(small, monkeypatch):
    """SIGTERM handled in the middle of the chunk-end agreement (after the flag was read, before
    the answer is back) still stops the fit at that chunk end."""
    from jaxlight import parallel

    agree, calls = parallel.any_process, []

    def signal_while_agreeing(flag):
        answer = agree(flag)  # (the flag as it was read: False)
        if not calls:
            signal.raise_signal(signal.SIGTERM)  # the handler runs now, before the answer returns
        calls.append(flag)
        return answer

    monkeypatch.setattr(parallel, "any_process", signal_while_agreeing)
    trainer = Trainer(_config(max_epochs=3, steps_per_execution=1))
    with pytest.warns(RuntimeWarning, match="SIGTERM at step 1: stopping without a checkpoint"):
        state = trainer.fit(_state(), *small)
    assert trainer.interrupted and trainer.stop_signal == signal.SIGTERM and int(state.step) == 1
    assert calls == [False]


def test_one_compilation_for_a_whole_run(mnist):
    train = ArrayDataset(mnist[0].images[:333], mnist[0].labels[:333])  # a size no other test uses
    before = train_chunk._cache_size()
    Trainer(_config(max_epochs=3)).fit(_state(), train)
    assert train_chunk._cache_size() - before == 1


def test_predict_and_test(small):
    train, val = small
    trainer = Trainer(_config(max_epochs=1, eval_batch_size=64))
    state = trainer.fit(_state(), train)
    out = trainer.predict(state, val.x[:150])  # not a multiple of the batch: padded inside
    expected = state.model(jnp.asarray(val.x[:150], jnp.float32) / 255.0)
    assert out.shape == (150, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-5, atol=1e-5)
    metrics = trainer.test(state, val)
    assert set(metrics) == {"test_loss", "test_accuracy"}
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(trainer.predict(state, val.x).argmax(-1) == val.y)))


def test_wrap_state_clips_as_the_formula_says_and_never_wraps_twice():
    state = _state(tx=optim.sgd(1.0))
    config = TrainerConfig(numerics={"gradient_clip_norm": 0.5})
    wrapped, pair = optim.wrap_state(state, config)
    again, same_pair = optim.wrap_state(wrapped, config, pair)
    assert again is wrapped and same_pair is pair  # a state already wrapped is left as it is
    grads = jax.tree.map(lambda p: np.full(p.shape, 3.0, np.float32), wrapped.params)
    updates, _ = wrapped.tx.update(grads, wrapped.opt_state, wrapped.params)
    norm = 3.0 * np.sqrt(sum(np.size(p) for p in jax.tree.leaves(wrapped.params)))
    for u in jax.tree.leaves(updates):  # sgd(1.0) after clip_by_global_norm(0.5): -g * 0.5 / ||g||
        np.testing.assert_allclose(np.asarray(u), -3.0 * 0.5 / norm, rtol=1e-6)
    unchanged, no_pair = optim.wrap_state(state, TrainerConfig())
    assert unchanged is state and no_pair is None  # nothing to wrap
    with pytest.raises(ValueError, match="has taken 3 steps"):
        optim.wrap_state(state.replace(step=jnp.asarray(3)), config)
    # Freezing wraps the optimizer too, and the refusal names it.
    with pytest.raises(ValueError, match=r"^freeze / numerics\.gradient_clip_norm .* has taken 3 steps"):
        optim.wrap_state(state.replace(step=jnp.asarray(3)), TrainerConfig(freeze=["*"]))


def test_wrapping_the_optimizer_of_a_trained_state_is_refused(small):
    trained = Trainer(_config(max_steps=2)).fit(_state(), small[0])
    with pytest.raises(ValueError, match="has taken 2 steps"):
        Trainer(_config(max_steps=4, numerics={"gradient_clip_norm": 1.0})).fit(trained, small[0])


@pytest.mark.parametrize("kw, match", [
    ({"max_epochs": 0}, "max_epochs"),
    ({"batch_size": -1}, "batch_size"),
    ({"max_steps": 0}, "max_steps"),
    ({"steps_per_execution": 0}, "steps_per_execution"),
    ({"val_every_n_steps": 1.5}, "val_every_n_steps"),
    ({"numerics": {"gradient_clip_norm": 0.0}}, "numerics.gradient_clip_norm"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
    ({"numerics": {"precision": "fp16"}}, "numerics.precision"),
    ({"numerics": {"nan_policy": "ignore"}}, "numerics.nan_policy"),
    ({"fast_dev_run": -1}, "fast_dev_run"),
])
def test_bad_config_names_the_field(kw, match):
    with pytest.raises(ValueError, match=f"^trainer.{match}: "):
        TrainerConfig(**kw)


def test_resume_with_another_batch_size_is_refused(small, tmp_path):
    Trainer(_config(max_steps=3), callbacks=[ModelCheckpoint(tmp_path, every_n_steps=3)]).fit(_state(), small[0])
    with pytest.raises(Exception, match="batch_size 64 .* batch_size 32"):
        Trainer(TrainerConfig(batch_size=32,
                              logging={"enable_progress_bar": False})).fit(_state(), small[0], ckpt_path=tmp_path)

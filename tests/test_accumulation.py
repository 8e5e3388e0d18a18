"""Gradient accumulation: batch 16 x 4 is batch 64, against a hand-written Optax loop.

The reference below knows nothing of jaxlight's step: it permutes the examples as the data
contract says (``permutation(fold_in(data_key, epoch), N)``), cuts the permutation into batches
of 64 (the last one short), and takes one plain ``jax.grad`` + ``tx.update`` of the mean loss
per batch. Accumulating four micro-batches of 16 must give the same parameters (to float32
rounding of the summation order) and the same number of updates, for N that divides into whole
windows (2048), leaves a last window of one full micro-batch (2000), and leaves a last window
whose last micro-batch is half padding (2040).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlight import loop
from jaxlight.callbacks import Callback, ModelCheckpoint
from jaxlight.data import ArrayDataset, batch_indices, windows
from jaxlight.state import create_train_state, data_key
from jaxlight.step import apply_accumulated_step, apply_train_step
from jaxlight.trainer import Trainer, TrainerConfig

SEED, FEATURES, CLASSES = 3, 8, 3
SGD = optax.sgd(0.1)
ADAM = optax.adam(1e-3)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(FEATURES, 32, rngs=rngs), nnx.Linear(32, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


class BNNet(MLP):
    def __init__(self, rngs):
        super().__init__(rngs)
        self.bn = nnx.BatchNorm(32, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.bn(self.fc1(x))))


def loss_fn(model, batch):
    logits = model(batch["x"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return losses, {"accuracy": (logits.argmax(-1) == batch["y"]).astype(jnp.float32)}


def dataset(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    return ArrayDataset(x, y)


def new_state(tx, model=MLP):
    return create_train_state(model(nnx.Rngs(0)), tx, loss_fn, seed=SEED)


def as_dict(state):
    m = state.module()
    return {name: np.asarray(getattr(getattr(m, layer), p)[...])
            for name, (layer, p) in {"w1": ("fc1", "kernel"), "b1": ("fc1", "bias"),
                                     "w2": ("fc2", "kernel"), "b2": ("fc2", "bias")}.items()}


def _mean_loss(p, x, y):
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def reference(tx, data, epochs, batch=64, skip=()):
    """Plain Optax on batches of 64 in the contract's order: (params, number of updates). The
    batches that hold an example in ``skip`` make no update."""
    params = as_dict(new_state(tx))
    opt_state, updates, n = tx.init(params), 0, len(data)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(_mean_loss)(params, x, y)
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state

    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(data_key(SEED), epoch), n))
        for s in range(0, n, batch):
            rows = order[s:s + batch]
            updates += 1
            if not set(rows.tolist()) & set(skip):
                params, opt_state = step(params, opt_state, data.x[rows], data.y[rows])
    return params, updates


def assert_close(state, expected, atol=1e-5):
    got = as_dict(state)
    for k in expected:
        np.testing.assert_allclose(got[k], np.asarray(expected[k]), atol=atol, rtol=0, err_msg=k)


def same_bits(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(a) == len(b) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b))


def quiet(**kw):
    return TrainerConfig(**{"batch_size": 16, "logging": {"enable_progress_bar": False}, "val_every_n_epochs": None, **kw})


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("tx, n", [
    pytest.param(SGD, 2000, marks=_SLOW, id="sgd-2000"), pytest.param(SGD, 2040, marks=_SLOW, id="sgd-2040"),
    pytest.param(SGD, 2048, marks=_SLOW, id="sgd-2048"), pytest.param(ADAM, 2000, id="adam-2000"),
    pytest.param(ADAM, 2040, marks=_SLOW, id="adam-2040"), pytest.param(ADAM, 2048, marks=_SLOW, id="adam-2048"),
])
def test_16_by_4_is_batch_64_fused(tx, n):
    data = dataset(n)
    expected, updates = reference(tx, data, epochs=2)
    trainer = Trainer(quiet(max_epochs=2, accumulate_grad_batches=4))
    state = trainer.fit(new_state(tx), data)
    assert int(state.step) == trainer.global_step == updates == 2 * -(-n // 64)
    assert_close(state, expected)
    # jaxlight's own batch-64 run takes the same updates.
    big = Trainer(quiet(max_epochs=2, batch_size=64)).fit(new_state(tx), data)
    assert int(big.step) == updates
    assert_close(state, as_dict(big))


@pytest.mark.parametrize("n", [pytest.param(2000, marks=_SLOW), 2040])
def test_16_by_4_is_batch_64_streamed(n):
    """A re-iterable of batches (host-streamed, windows built on the host) and host arrays."""
    data = dataset(n)
    expected, updates = reference(ADAM, data, epochs=2)

    def batches(epoch):
        idx, mask = batch_indices(jax.random.fold_in(data_key(SEED), epoch), n, 16, True)
        return [{"x": data.x[i[m > 0]], "y": data.y[i[m > 0]]} for i, m in zip(np.asarray(idx), np.asarray(mask))]

    epochs = itertools.count()
    state, history = loop.fit(new_state(ADAM), lambda: iter(batches(next(epochs))), epochs=2, batch_size=16,
                              accumulate=4)
    assert int(state.step) == updates
    assert_close(state, expected)
    host, _ = loop.fit(new_state(ADAM), data, epochs=2, batch_size=16, accumulate=4, on_device=False)
    assert int(host.step) == updates
    assert_close(host, expected)
    assert history[-1].metrics["count"] == n


def test_accumulated_epochs_compile_once():
    """The fused epoch with its padded last window is one program; the streamed windows, the
    last one padded with an all-padding micro-batch, one more."""
    from jaxlight.step import accumulated_chunk, accumulated_step

    data, tx = dataset(2040), optax.sgd(0.05)  # an optimizer of its own: no other test compiled for it
    chunks, steps = accumulated_chunk._cache_size(), accumulated_step._cache_size()
    state, _ = loop.fit(new_state(tx), data, epochs=3, batch_size=16, accumulate=4)
    assert accumulated_chunk._cache_size() == chunks + 1 and int(state.step) == 3 * 32
    state, _ = loop.fit(new_state(tx), data, epochs=2, batch_size=16, accumulate=4, on_device=False)
    assert accumulated_step._cache_size() == steps + 1 and int(state.step) == 2 * 32


def test_epoch_metrics_and_logged_steps_count_updates():
    """Per-update metrics are the window's example-weighted means; steps count updates."""
    data = dataset(2040)

    class Steps(Callback):
        def __init__(self):
            self.chunks = []

        def on_train_chunk_end(self, trainer, state, metrics):
            self.chunks.append((trainer.global_step, metrics["count"].tolist()))

    rec = Steps()
    trainer = Trainer(quiet(max_epochs=1, accumulate_grad_batches=4, steps_per_execution=8), callbacks=[rec])
    trainer.fit(new_state(SGD), data)
    assert trainer.num_batches == 32 and trainer.global_step == 32
    assert [s for s, _ in rec.chunks] == [8, 16, 24, 32]
    counts = sum((c for _, c in rec.chunks), [])
    assert counts == [64.0] * 31 + [56.0]
    assert trainer.history[0].metrics["count"] == 2040
    # max_steps counts updates.
    assert int(Trainer(quiet(max_steps=5, accumulate_grad_batches=4)).fit(new_state(SGD), data).step) == 5


def test_a_non_finite_micro_batch_skips_its_window():
    """nan_policy='skip': a NaN in one example makes its window's gradient non-finite, and that
    window makes no update; the others are the batch-64 updates."""
    clean = dataset(2040)
    x = np.array(clean.x)
    x[100, 2] = np.nan
    data = ArrayDataset(x, clean.y)
    expected, _ = reference(ADAM, clean, epochs=2, skip=[100])
    trainer = Trainer(quiet(max_epochs=2, accumulate_grad_batches=4,
                            numerics={"nan_policy": "skip", "check_finite": False}))
    state = trainer.fit(new_state(ADAM), data)
    windows_with_100 = [int(np.flatnonzero(np.asarray(jax.random.permutation(
        jax.random.fold_in(data_key(SEED), e), 2040)) == 100)[0]) // 64 for e in (0, 1)]
    assert trainer.skipped_steps == [windows_with_100[0] + 1, 32 + windows_with_100[1] + 1]
    assert int(state.step) == 64
    assert_close(state, expected)


def test_an_all_padding_micro_batch_changes_nothing():
    """The pure step: a window [b0, b1] equals the window [b0, b1, padding] bit for bit,
    BatchNorm statistics included."""
    data = dataset(64)
    idx, mask = batch_indices(jax.random.key(0), 64, 16, False)
    idx, mask = windows(np.asarray(idx)[:2], np.asarray(mask)[:2], 3)
    assert mask[0].sum(axis=1).tolist() == [16.0, 16.0, 0.0]
    batches = {"x": data.x[idx[0]], "y": data.y[idx[0]]}
    step = jax.jit(apply_accumulated_step)
    three, m3 = step(new_state(SGD, BNNet), batches, mask[0])
    two, m2 = step(new_state(SGD, BNNet), jax.tree.map(lambda a: a[:2], batches), mask[0][:2])
    assert same_bits((three.params, three.model_state), (two.params, two.model_state))
    assert {k: float(v) for k, v in m3.items()} == {k: float(v) for k, v in m2.items()}
    assert float(m3["count"]) == 32.0


def test_batchnorm_statistics_are_per_micro_batch():
    """Each micro-batch normalises with its own statistics and updates the running averages
    in turn: the window's running mean is two momentum updates, one per micro-batch (numpy)."""
    data = dataset(32)
    state = new_state(SGD, BNNet)
    m = state.module()
    h = [np.asarray(data.x[i:i + 16] @ np.asarray(m.fc1.kernel[...]) + np.asarray(m.fc1.bias[...])) for i in (0, 16)]
    momentum = m.bn.momentum
    expected = np.zeros(32, np.float32)
    for part in h:
        expected = momentum * expected + (1 - momentum) * part.mean(0)
    batches = jax.tree.map(lambda a: np.asarray(a).reshape(2, 16, *a.shape[1:]), data.data)
    new, _ = jax.jit(apply_accumulated_step)(state, batches, np.ones((2, 16), np.float32))
    np.testing.assert_allclose(np.asarray(new.module().bn.mean[...]), expected, rtol=1e-5, atol=1e-6)


def test_one_micro_batch_window_is_the_plain_step():
    """A window of one micro-batch is ``apply_train_step`` to rounding (no dropout here)."""
    data = dataset(16)
    mask = np.ones((16,), np.float32)
    one, m1 = jax.jit(apply_train_step)(new_state(ADAM), data.data, mask)
    acc, ma = jax.jit(apply_accumulated_step)(new_state(ADAM), jax.tree.map(lambda a: a[None], data.data), mask[None])
    assert_close(acc, as_dict(one), atol=1e-7)
    assert float(ma["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_chunk_end(self, trainer, state, metrics):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_resume_mid_epoch_is_bitwise(tmp_path):
    data = dataset(2040)
    full = Trainer(quiet(max_epochs=2, accumulate_grad_batches=4, steps_per_execution=5)).fit(new_state(ADAM), data)
    first = Trainer(quiet(max_epochs=2, accumulate_grad_batches=4, steps_per_execution=5),
                    callbacks=[ModelCheckpoint(tmp_path, every_n_steps=10, every_n_epochs=None), StopAt(40)])
    first.fit(new_state(ADAM), data)
    resumed = Trainer(quiet(max_epochs=2, accumulate_grad_batches=4, steps_per_execution=5),
                      callbacks=[ModelCheckpoint(tmp_path, every_n_steps=10, every_n_epochs=None)])
    state = resumed.fit(new_state(ADAM), data, ckpt_path="last")
    assert resumed.restored_from.name.endswith("40") and int(state.step) == 64
    assert same_bits(state.params, full.params)
    with pytest.raises(Exception, match="accumulate_grad_batches 4; this fit has 2"):
        Trainer(quiet(max_epochs=2, accumulate_grad_batches=2),
                callbacks=[ModelCheckpoint(tmp_path, every_n_epochs=None)]).fit(new_state(ADAM), data, ckpt_path="last")


@pytest.mark.parametrize("accumulate", [0, 1.5, True])
def test_bad_accumulate_is_refused(accumulate):
    with pytest.raises(ValueError, match="accumulate"):
        loop.fit(new_state(SGD), dataset(64), epochs=1, batch_size=16, accumulate=accumulate)

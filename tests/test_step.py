"""The pure steps: they compile once, they are deterministic, the fused and per-step paths
agree, the CNN takes the fast path on the CPU, and bad batches are stopped before XLA."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlight import create_train_state, optim, tasks
from jaxlight.data import ArrayDataset
from jaxlight.loop import evaluate, fit, train_epoch
from jaxlight.models import build_model
from jaxlight.step import (
    BatchError,
    eval_chunk,
    train_chunk,
    train_step,
)


# One optimizer object for the module: the optimizer is a static field of the state, so a new
# object compiles the steps again (the compile-once tests pass their own, to start afresh).
ADAM = optim.adam(1e-3)


def mlp_state(seed=0, tx=None):
    return create_train_state(build_model("mlp", seed), tx or ADAM, tasks.multiclass(), seed)


@pytest.fixture(scope="module")
def small(mnist):
    train, test = mnist
    # 1000 is not a multiple of 64: the last batch (40) is padded, exercising the mask.
    return ArrayDataset(train.images[:1000], train.labels[:1000]), ArrayDataset(test.images[:500], test.labels[:500])


def params_of(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_train_step_compiles_once_across_steps_epochs_and_the_partial_batch(small):
    train, _ = small
    state = mlp_state(tx=optim.adam(1e-3))
    from jaxlight.step import _train_step_jit

    before = _train_step_jit._cache_size()
    x, y = np.asarray(train.x), np.asarray(train.y)
    after_first = None
    for epoch in range(2):
        for start in range(0, 1000, 64):  # last batch has 40 rows, padded below to 64
            xb, yb = x[start:start + 64], y[start:start + 64]
            mask = np.zeros(64, np.float32)
            mask[:len(yb)] = 1
            pad = 64 - len(yb)
            state, _ = train_step(state, {"x": np.pad(xb, ((0, pad), (0, 0), (0, 0))),
                                          "y": np.pad(yb, (0, pad)), "mask": mask})
            after_first = after_first or _train_step_jit._cache_size()
    # (at most one program: another test in this process may have compiled the same one already)
    assert after_first <= before + 1 and _train_step_jit._cache_size() == after_first
    assert int(state.step) == 2 * 16


def test_fused_epochs_compile_once(small):
    train, _ = small
    before = train_chunk._cache_size()
    state, results = fit(mlp_state(seed=3, tx=optim.adam(1e-3)), train, epochs=3, batch_size=64)
    assert train_chunk._cache_size() == before + 1
    assert int(state.step) == 3 * 16 and [r.metrics["count"] for r in results] == [1000] * 3


def test_deterministic_bit_for_bit(small):
    train, _ = small
    a, ra = fit(mlp_state(seed=1), train, epochs=2, batch_size=64)
    b, rb = fit(mlp_state(seed=1), train, epochs=2, batch_size=64)
    for x, y in zip(params_of(a), params_of(b)):
        np.testing.assert_array_equal(x, y)
    assert ra[-1].metrics == rb[-1].metrics
    c, _ = fit(mlp_state(seed=2), train, epochs=2, batch_size=64)
    assert any(not np.array_equal(x, y) for x, y in zip(params_of(a), params_of(c)))


# (fast: 1, per step, and 16, the whole epoch in one call; 5 leaves a shorter last chunk)
@pytest.mark.parametrize("steps_per_call", [1, pytest.param(5, marks=pytest.mark.slow), 16])
def test_fused_and_per_step_paths_agree(small, steps_per_call):
    train, _ = small
    fused, rf = fit(mlp_state(), train, epochs=1, batch_size=64)  # default: whole epoch in one call
    other, ro = fit(mlp_state(), train, epochs=1, batch_size=64, steps_per_call=steps_per_call)
    for x, y in zip(params_of(fused), params_of(other)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert rf[0].metrics["accuracy"] == pytest.approx(ro[0].metrics["accuracy"], abs=1e-6)


def test_host_streaming_matches_the_device_path(small):
    train, _ = small
    device, _ = fit(mlp_state(), train, epochs=1, batch_size=64, on_device=True)
    host, _ = fit(mlp_state(), train, epochs=1, batch_size=64, on_device=False)
    for x, y in zip(params_of(device), params_of(host)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_padded_batch_is_exactly_the_mean_over_real_examples(small):
    train, _ = small
    x, y = np.asarray(train.x[:10]), np.asarray(train.y[:10])
    a, ma = train_step(mlp_state(), {"x": x, "y": y})
    padded = {"x": np.concatenate([x, x[:6]]), "y": np.concatenate([y, (y[:6] + 1) % 10]),
              "mask": np.array([1] * 10 + [0] * 6, np.float32)}
    b, mb = train_step(mlp_state(), padded)
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    assert float(mb["count"]) == 10
    for p, q in zip(params_of(a), params_of(b)):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-7)


def test_evaluate_counts_every_example_once(small):
    _, test = small
    state = mlp_state()
    metrics = evaluate(state, test.to_device(), batch_size=64)
    assert metrics["count"] == 500
    assert metrics == pytest.approx(evaluate(state, test, batch_size=500), rel=1e-5)


class PlainConvNet(nnx.Module):
    """A user's CNN with a stock ``nnx.Conv`` (autodiff's conv gradient)."""

    def __init__(self):
        self.input_shape = (28, 28)
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
        self.fc = nnx.Linear(28 * 28 * 4, 10, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.fc(jax.nn.relu(self.conv(x[..., None])).reshape(x.shape[0], -1))


@pytest.mark.parametrize("model, chunks_on_cpu", [
    (PlainConvNet, [1, 1, 1]),  # slow inside lax.scan on XLA:CPU: one step per call, at top level
    (lambda: build_model("cnn"), [3]),  # conv2d_nhwc's gradient is fast in a scan: fused
])
def test_cnn_epoch_on_cpu_does_not_take_the_slow_path(small, monkeypatch, model, chunks_on_cpu):
    """XLA:CPU runs autodiff's convolution gradient inside lax.scan 15-40x slower than at top
    level: a model with such a convolution must run one step per call on the CPU. Elsewhere
    (GPU, TPU) every model fuses the whole epoch into one call."""
    train, _ = small
    state = create_train_state(model(), optim.adam(1e-3), tasks.multiclass())
    sub = train.take(130).to_device()  # 3 batches of 64, the last one padded
    seen = []
    import jaxlight.step as step

    real = step.train_chunk

    def spy(state, data, idx, mask, steps, start=0, unroll=False):
        seen.append(steps)
        return real(state, data, idx, mask, steps, start, unroll=unroll)

    monkeypatch.setattr(step, "train_chunk", spy)  # what the single-device strategy calls
    after, metrics = train_epoch(state, sub, 64, epoch=0)
    assert seen == (chunks_on_cpu if jax.default_backend() == "cpu" else [3])
    assert int(after.step) == 3 and float(np.sum(metrics["count"])) == 130  # every example, once


def test_eval_chunk_does_not_update_anything(small):
    _, test = small
    state = mlp_state()
    before = params_of(state)
    data = test.to_device()
    from jaxlight.data import batch_indices

    idx, mask = batch_indices(jax.random.key(0), 500, 100, False)
    eval_chunk(state, data.data, idx, mask, 5)
    for p, q in zip(before, params_of(state)):
        np.testing.assert_array_equal(p, q)


# --- bad batches: a clear error before XLA --------------------------------------------------

@pytest.mark.parametrize(
    "batch, message",
    [
        ({"x": np.zeros((4, 28, 27), np.uint8), "y": np.zeros(4, np.int32)}, r"shape \(4, 28, 27\); the model takes \(batch, 28, 28\)"),
        ({"x": np.zeros((4, 784), np.float32), "y": np.zeros(4, np.int32)}, r"the model takes \(batch, 28, 28\)"),
        ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.zeros(3, np.int32)}, "first .batch. dimensions must match"),
        ({"x": np.zeros((4, 28, 28), np.int64), "y": np.zeros(4, np.int32)}, "dtype int64; expected uint8 images or floats"),
        ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.zeros(4, np.float32)}, "dtype float32 .* integer labels"),
        ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.array([1, 2, 10, 3])}, r"batch\['y'\]\[2\] = 10 is outside \[0, 10\)"),
        ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.array([1, -1, 0, 3])}, r"batch\['y'\]\[1\] = -1"),
        ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.zeros(4, np.int32), "mask": np.ones(3)}, r"mask'\] has shape \(3,\)"),
        ({"image": np.zeros((4, 28, 28))}, "keys 'x' and 'y'"),
        ({"x": [[0.0]], "y": np.zeros(1)}, "must be an array"),
    ],
    ids=["image-shape", "flat-images", "batch-mismatch", "x-dtype", "y-dtype", "label-high",
         "label-negative", "mask-shape", "wrong-keys", "not-array"],
)
def test_bad_batches_are_named(batch, message):
    with pytest.raises(BatchError, match=message):
        train_step(mlp_state(), batch)


def test_bad_dataset_is_named_before_training():
    labels = np.zeros(100, np.int32)
    labels[42] = 11
    with pytest.raises(BatchError, match=r"training set: y\[42\] = 11 is outside \[0, 10\)"):
        fit(mlp_state(), ArrayDataset(np.zeros((100, 28, 28), np.uint8), labels), 1, 64)
    with pytest.raises(BatchError, match=r"training set: x has shape \(100, 784\)"):
        fit(mlp_state(), ArrayDataset(np.zeros((100, 784), np.float32), np.zeros(100, np.int32)), 1, 64)


def test_the_loss_check_traces_one_state_and_batch_shape_once():
    """``check_loss`` traces the loss in train and eval mode. A second check of a state and
    batch of the same structure and types (another fit of the same model, a resume) reuses that
    trace; a new batch shape is traced; a batch that does not fit is refused every time."""
    import jax.numpy as jnp

    from jaxlight.step import check_loss

    shapes = []

    def loss(model, batch):
        shapes.append(batch["x"].shape)
        return jnp.sum((model(batch["x"]) - batch["y"]) ** 2, axis=-1), {}

    state = create_train_state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), optim.sgd(0.1), loss)

    def batch(rows, features=3):
        return {"x": np.ones((rows, features), np.float32), "y": np.zeros((rows, 2), np.float32)}, np.ones(rows, np.float32)

    check_loss(state, *batch(4))
    first = len(shapes)
    assert first >= 2 and set(shapes) == {(4, 3)}  # train and eval mode
    check_loss(state, *batch(4))
    assert len(shapes) == first
    check_loss(state, *batch(8))
    assert len(shapes) == 2 * first and shapes[-1] == (8, 3)
    for _ in range(2):
        with pytest.raises(BatchError, match=r"batch\['x'\] \(4, 5\) float32 does not fit the model"):
            check_loss(state, *batch(4, features=5))

"""BatchNorm and Dropout as the step runs them (``jaxlight.layers``), against Flax's own layers
and a numpy reference; and the step never touches Flax itself."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx.nn import normalization, stochastic

import jaxlight
from jaxlight.step import BatchError, apply_train_step, check_loss


class Norm(nnx.Module):
    def __init__(self, features=4, rngs=None, **kw):
        self.bn = nnx.BatchNorm(features, rngs=rngs or nnx.Rngs(0), **kw)

    def __call__(self, x):
        return self.bn(x)


def square_loss(model, batch):
    y = model(batch["x"])
    return jnp.sum(jnp.square(y), axis=tuple(range(1, y.ndim))), {}


def one_step(model, x, mask=None):
    """The state after one jaxlight train step (SGD lr 0: only the statistics move)."""
    state = jaxlight.create_train_state(model, optax.sgd(0.0), square_loss)
    mask = np.ones((x.shape[0],), np.float32) if mask is None else mask
    new, _ = jax.jit(apply_train_step)(state, {"x": x}, jnp.asarray(mask))
    return new


SETTINGS = [
    {},
    {"use_fast_variance": False},
    {"momentum": 0.9, "epsilon": 1e-3},
    {"use_bias": False, "use_scale": False},
    {"axis": 1},
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("mean", [0.0, 1e3, 1e4])
def test_batchnorm_equals_flax_in_train_mode(kw, mean):
    """Statistics and running averages bitwise Flax's own on unpadded batches (1e-6 relative
    where the masked sum may add in another order), outputs within 1e-6, for every setting; at
    large feature means too, where the fast variance is as wrong as Flax's own and no more."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 4, 3)) + mean).astype(np.float32)
    x = x if kw.get("axis") == 1 else x[:, :, 0]
    state = one_step(Norm(rngs=nnx.Rngs(0), **kw), x)
    ours = {k: np.asarray(state.model_state["bn"][k][...]) for k in ("mean", "var")}
    ref = Norm(rngs=nnx.Rngs(0), **kw)
    ref.train()
    expected_out = np.asarray(ref(jnp.asarray(x)))
    for k in ("mean", "var"):
        theirs = np.asarray(getattr(ref.bn, k)[...])
        if x.ndim == 2:  # one reduction axis: the masked sum adds in Flax's order
            np.testing.assert_array_equal(ours[k], theirs, err_msg=k)
        elif k == "var" and kw.get("use_fast_variance", True) and mean:
            # Several reduction axes: XLA may order the masked sum differently, and the fast
            # formula E[x²] - E[x]² turns that into its own cancellation error, eps * E[x²].
            bound = 8 * np.finfo(np.float32).eps * (mean**2 + 1) * 0.01  # (1 - momentum) of it
            assert np.max(np.abs(ours[k] - theirs)) <= bound, k
        else:  # several reduction axes: XLA may order the masked sum differently
            np.testing.assert_allclose(ours[k], theirs, rtol=1e-6, atol=1e-12, err_msg=k)
    out = jaxlight.step.apply_predict(state, {"x": x}, train=True,
                                      predict_fn=lambda m, b: m(b["x"]))
    if x.ndim == 2 or not mean or not kw.get("use_fast_variance", True):
        np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-5, atol=1e-5)


def test_the_two_variance_formulas_differ_at_large_means():
    """A control: at mean 1e4 the fast formula loses the variance to cancellation and the
    two-pass one keeps it, so the setting really reaches the statistics."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 4)) + 1e4).astype(np.float32)
    truth = x.astype(np.float64).var(axis=0)
    fast = np.asarray(one_step(Norm(), x).model_state["bn"]["var"][...])
    exact = np.asarray(one_step(Norm(use_fast_variance=False), x).model_state["bn"]["var"][...])
    running = lambda v: 0.99 * 1.0 + 0.01 * v  # noqa: E731  (the running average after one step)
    np.testing.assert_allclose(exact, running(truth), rtol=1e-5)
    assert np.max(np.abs(fast - running(truth))) > 1e-3


@pytest.mark.parametrize("shape", [(16, 4), (16, 5, 6, 4), (16, 7, 4)], ids=["BC", "BHWC", "BTC"])
def test_padding_rows_never_enter_the_statistics(shape):
    """Mean and (biased) variance of the real rows only, against numpy in float64."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 5
    real = 11
    x[real:] = x[0]  # padding copies a real row, as jaxlight pads
    mask = (np.arange(shape[0]) < real).astype(np.float32)
    state = one_step(Norm(), x, mask)
    rows = x[:real].reshape(-1, shape[-1]).astype(np.float64)
    np.testing.assert_allclose(np.asarray(state.model_state["bn"]["mean"][...]), 0.01 * rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.model_state["bn"]["var"][...]), 0.99 + 0.01 * rows.var(0), rtol=1e-5)


class Tokens(nnx.Module):
    """A BatchNorm over flattened (B*T, C) tokens: the batch axis is gone."""

    def __init__(self, rngs):
        self.embed = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        return self.norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)


def test_a_batchnorm_that_loses_the_batch_axis_is_named_before_the_first_step():
    state = jaxlight.create_train_state(Tokens(nnx.Rngs(0)), optax.sgd(0.1), square_loss)
    x = np.ones((8, 5, 3), np.float32)
    with pytest.raises(BatchError, match=r"BatchNorm 'norm' normalises an input of shape \(40, 4\).*8 rows"):
        check_loss(state, {"x": x}, np.ones((8,), np.float32))
    with pytest.raises(BatchError, match="BatchNorm 'norm'"):
        jaxlight.loop.fit(state, jaxlight.ArrayDataset({"x": x}), epochs=1, batch_size=4)


def test_a_users_own_mask_is_combined_with_the_padding_mask():
    class Masked(nnx.Module):
        def __init__(self, rngs):
            self.bn = nnx.BatchNorm(2, rngs=rngs)

        def __call__(self, x, valid):
            return self.bn(x, mask=valid[..., None] > 0)

    def loss(model, batch):
        y = model(batch["x"], batch["valid"])
        return jnp.sum(y**2, axis=(1, 2)), {}

    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3, 2)).astype(np.float32)
    valid = (rng.random((6, 3)) > 0.3).astype(np.float32)
    mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
    state = jaxlight.create_train_state(Masked(nnx.Rngs(0)), optax.sgd(0.0), loss)
    new, _ = jax.jit(apply_train_step)(state, {"x": x, "valid": valid}, jnp.asarray(mask))
    keep = (valid > 0) & (mask[:, None] > 0)
    rows = x[keep].astype(np.float64)
    np.testing.assert_allclose(np.asarray(new.model_state["bn"]["mean"][...]), 0.01 * rows.mean(0), rtol=1e-5)


def test_the_step_leaves_flax_untouched():
    """No attribute of Flax's modules is replaced while a step is traced."""
    before = (normalization._compute_stats, stochastic.random, nnx.BatchNorm.__call__, nnx.Dropout.__call__)
    seen = []

    def loss(model, batch):
        seen.append((normalization._compute_stats, stochastic.random, nnx.BatchNorm.__call__, nnx.Dropout.__call__))
        return square_loss(model, batch)

    state = jaxlight.create_train_state(Norm(), optax.sgd(0.1), loss)
    jax.jit(apply_train_step)(state, {"x": np.ones((4, 4), np.float32)}, jnp.ones((4,)))
    assert seen and all(s == before for s in seen)


class DropNorm(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(6, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.fc(x)))))


def _classifier_loss(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), {}


def _train(seed, data):
    state = jaxlight.create_train_state(DropNorm(nnx.Rngs(seed)), optax.adam(1e-2), _classifier_loss, seed=seed)
    state, _ = jaxlight.loop.fit(state, data, epochs=2, batch_size=24, on_device=False)
    return [np.asarray(a) for a in jax.tree.leaves((state.params, state.model_state))]


def test_two_threads_training_at_once_equal_one_at_a_time():
    rng = np.random.default_rng(5)
    data = jaxlight.ArrayDataset({"x": rng.standard_normal((100, 6)).astype(np.float32),
                                  "y": rng.integers(0, 3, 100).astype(np.int32)})
    alone = [_train(seed, data) for seed in (0, 1)]
    together = [None, None]

    def run(i):
        together[i] = _train(i, data)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)

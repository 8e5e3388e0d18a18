"""A user's own model, batch and loss: Dropout and BatchNorm, dict batches, iterables of batches,
modes, reproducible dropout, padding kept out of batch statistics, predict, and the errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _support import assert_params_close
from jaxlight import ArrayDataset, Trainer, TrainerConfig, create_train_state, loop, tasks
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.data import epoch_order
from jaxlight.step import BatchError, DonatedStateError, eval_step, train_step

N, D, B = 200, 16, 32  # 200 = 6 * 32 + 8: the last batch has 8 real rows and 24 of padding
# One optimizer object for the module: the optimizer is a static field of the state, so a new
# object per state would compile every step again.
ADAM = optax.adam(1e-2)


class Net(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear, the way users write it."""

    def __init__(self, rngs, dropout=0.3, din=D):
        self.fc1, self.bn = nnx.Linear(din, 32, use_bias=False, rngs=rngs), nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.drop, self.fc2 = nnx.Dropout(dropout, rngs=rngs), nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def loss_fn(model, batch):
    logits = model(batch["feats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, {"acc": (logits.argmax(-1) == batch["label"]).astype(jnp.float32)}


def blobs(n=N, seed=0, din=D):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n).astype(np.int32)
    centers = rng.normal(0, 3, (3, din)).astype(np.float32)
    feats = (centers[label] + rng.normal(0, 1, (n, din))).astype(np.float32)
    return {"feats": feats, "label": label}


@pytest.fixture(scope="module")
def data():
    both = blobs(N + 120)
    return (ArrayDataset({k: v[:N] for k, v in both.items()}),
            ArrayDataset({k: v[N:] for k, v in both.items()}))


def new_state(dropout=0.3, seed=0, model_seed=0, tx=None):
    return create_train_state(Net(nnx.Rngs(model_seed), dropout), tx or ADAM, loss_fn, seed=seed)


def leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def assert_same(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def quiet(**kw):
    return TrainerConfig(batch_size=B, **kw, logging={"enable_progress_bar": False})


# --- training, modes, randomness ------------------------------------------------------------

def test_a_dropout_batchnorm_model_trains_and_evaluates_in_eval_mode(data):
    train, val = data
    trainer = Trainer(quiet(max_epochs=4, eval_batch_size=50))
    state = trainer.fit(new_state(), train, val)
    metrics = trainer.test(state, val)
    assert metrics["test_acc"] > 0.9 and set(metrics) == {"test_loss", "test_acc"}
    # The eval-mode model by hand: running statistics, no dropout.
    logits = state.model(jnp.asarray(val.data["feats"]))
    assert metrics["test_acc"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == val.data["label"])), abs=1e-6)
    assert loop.evaluate(state, val, batch_size=7)["acc"] == pytest.approx(metrics["test_acc"], abs=1e-6)


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 3, pytest.param(None, marks=pytest.mark.slow)])
def test_dropout_is_reproducible_and_the_same_for_every_k(data, k):
    train, _ = data
    fused, _ = loop.fit(new_state(), train, epochs=2, batch_size=B)
    other, _ = loop.fit(new_state(), train, epochs=2, batch_size=B, steps_per_call=k)
    assert_same(fused.params, other.params)
    assert_same(fused.model_state, other.model_state)


def test_dropout_depends_on_the_seed_and_is_really_on(data):
    train, _ = data
    a, _ = loop.fit(new_state(seed=0), train, epochs=1, batch_size=B)
    b, _ = loop.fit(new_state(seed=1), train, epochs=1, batch_size=B, on_device=True)
    c, _ = loop.fit(new_state(dropout=0.0, seed=0), train, epochs=1, batch_size=B)
    d, _ = loop.fit(new_state(dropout=0.0, seed=1), train, epochs=1, batch_size=B, on_device=False)
    # Seeds 0/1 shuffle differently too; without dropout only the order differs.
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(c.params)))
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(b.params)))
    assert all(np.isfinite(x).all() for x in leaves(d.params))


class Revealing(nnx.Module):
    """``dropout(x) * w``: with x = 1, one example a batch, the loss ``sum(out)`` and SGD at lr 1,
    each step lowers ``w_j`` by ``mask_j / keep``, so the parameters show every mask drawn."""

    def __init__(self, rngs, width=256, rate=0.5):
        self.w = nnx.Param(jnp.ones(width))
        self.drop = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x):
        return self.drop(x) * self.w


def _sum_loss(model, batch):
    return model(batch["x"]).sum(-1), {}


def test_the_dropout_mask_of_each_step_is_the_documented_key_derivation():
    """docs/models.md: before each training step every RNG stream's key is set to
    ``fold_in(fold_in(model_key(seed), step), i)`` (i: the key's position among the leaves of
    ``state.rng_state``) and its count to 0; ``nnx.Dropout`` then draws
    ``bernoulli(fold_in(key, count), keep)``. Written out here with jax.random alone, step by
    step, through ``train_step`` and through a fused run of 3 steps per call. A step that is not
    folded into the key (the same mask every step) fails it."""
    seed, width, keep, steps = 3, 256, 0.5, 6
    tx = optax.sgd(1.0)
    state = create_train_state(Revealing(nnx.Rngs(0), width), tx, _sum_loss, seed=seed)
    leaves_ = jax.tree.leaves(state.rng_state)
    i = next(n for n, a in enumerate(leaves_) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key))
    model_key = jax.random.fold_in(jax.random.key(seed), 2)  # (jaxlight.state's model stream)

    def by_hand(step):
        key = jax.random.fold_in(jax.random.fold_in(model_key, step), i)
        return np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), keep, (1, width)))[0]

    masks = [by_hand(step) for step in range(steps)]
    assert len({m.tobytes() for m in masks}) == steps and all(0.3 < m.mean() < 0.7 for m in masks)
    batch = {"x": np.ones((1, width), np.float32)}
    w = np.ones(width, np.float32)
    for step in range(steps):
        state, _ = train_step(state, batch)
        got = np.asarray(state.params["w"][...])
        np.testing.assert_array_equal((w - got) * keep, masks[step].astype(np.float32), err_msg=f"step {step}")
        w = got
    fused = create_train_state(Revealing(nnx.Rngs(0), width), tx, _sum_loss, seed=seed)
    fused, _ = loop.fit(fused, ArrayDataset({"x": np.ones((steps, width), np.float32)}), 1, 1, steps_per_call=3)
    expected = 1.0 - np.sum(masks, axis=0) / keep
    np.testing.assert_array_equal(np.asarray(fused.params["w"][...]), expected.astype(np.float32))


def test_resume_is_bit_identical_with_dropout_and_batchnorm(data, tmp_path):
    train, val = data
    full = Trainer(quiet(max_epochs=2)).fit(new_state(), train, val)
    first = Trainer(quiet(max_epochs=2, max_steps=5), callbacks=[ModelCheckpoint(tmp_path, every_n_steps=5)])
    first.fit(new_state(), train, val)
    second = Trainer(quiet(max_epochs=2), callbacks=[ModelCheckpoint(tmp_path, every_n_steps=5)])
    resumed = second.fit(new_state(), train, val, ckpt_path="last")
    assert second.restored_from is not None
    assert_same(full.params, resumed.params)
    assert_same(full.model_state, resumed.model_state)


def test_batchnorm_statistics_move_only_in_training(data):
    train, val = data
    trainer = Trainer(quiet(max_epochs=1))
    state = trainer.fit(new_state(), train)
    stats = leaves(state.model_state)
    trainer.validate(state, val)
    trainer.test(state, val)
    trainer.predict(state, val)
    loop.evaluate(state, val)
    eval_step(state, {"feats": val.data["feats"][:10], "label": val.data["label"][:10]})
    for before, after in zip(stats, leaves(state.model_state)):
        np.testing.assert_array_equal(before, after)
    assert not np.allclose(stats[0], 0.0)  # ...and training did move them (mean starts at 0)
    moved, _ = train_step(state, {"feats": val.data["feats"][:10], "label": val.data["label"][:10]})
    assert any(not np.array_equal(a, b) for a, b in zip(stats, leaves(moved.model_state)))


def test_padding_never_enters_batch_statistics_or_the_loss(data):
    train, _ = data
    real = {k: v[:10] for k, v in train.data.items()}
    junk = {"feats": np.full((6, D), 1e4, np.float32), "label": np.zeros(6, np.int32)}
    padded = {k: np.concatenate([real[k], junk[k]]) for k in real}
    mask = np.array([1] * 10 + [0] * 6, np.float32)
    # SGD: fc1's bias has a zero gradient up to rounding (BatchNorm removes the mean), which
    # Adam's first step would blow up to +-lr.
    a, ma = train_step(new_state(dropout=0.0, tx=optax.sgd(0.1)), real)
    b, mb = train_step(new_state(dropout=0.0, tx=optax.sgd(0.1)), padded, mask)
    assert float(mb["count"]) == 10 and float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    for x, y in zip(leaves((a.params, a.model_state)), leaves((b.params, b.model_state))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [pytest.param(1, marks=pytest.mark.slow), 7, pytest.param(64, marks=pytest.mark.slow),
                                        1000])
def test_predict_does_not_depend_on_the_batch_size(data, batch_size):
    train, val = data
    trainer = Trainer(quiet(max_epochs=1))
    state = trainer.fit(new_state(), train)
    every = trainer.predict(state, val, batch_size=batch_size)
    assert every.shape == (120, 3)
    for n in (1, 5, 33):
        np.testing.assert_allclose(trainer.predict(state, val.take(n), batch_size=batch_size), every[:n],
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(every, np.asarray(state.model(jnp.asarray(val.data["feats"]))), rtol=1e-5, atol=1e-5)


def test_a_trained_state_evaluates_under_a_trainer_that_wraps_the_optimizer(data):
    train, val = data
    state = Trainer(quiet(max_epochs=1)).fit(new_state(), train)
    wrapping = Trainer(quiet(accumulate_grad_batches=2, numerics={"gradient_clip_norm": 1.0}))
    assert wrapping.test(state, val) == pytest.approx(Trainer(quiet()).test(state, val))
    assert wrapping.validate(state, val)["val_acc"] == pytest.approx(Trainer(quiet()).test(state, val)["test_acc"])
    np.testing.assert_array_equal(wrapping.predict(state, val), Trainer(quiet()).predict(state, val))


def test_predict_returns_any_pytree_and_takes_predict_fn(data):
    train, val = data
    state = new_state()
    out = Trainer(quiet()).predict(state, val.data, predict_fn=lambda m, b: {"logits": m(b["feats"]),
                                                                             "twice": (m(b["feats"]), b["label"])})
    assert out["logits"].shape == (120, 3) and out["twice"][1].tolist() == val.data["label"].tolist()
    feats_only = Trainer(quiet()).predict(state, {"feats": val.data["feats"]}, predict_fn=lambda m, b: m(b["feats"]))
    np.testing.assert_allclose(feats_only, out["logits"], rtol=1e-6)


# --- data: pytrees, iterables -----------------------------------------------------------------

def epoch_batches(data, seed, epoch):
    """The batches the ArrayDataset path trains on in ``epoch``, as a user's loader would yield
    them: the last one shorter, no padding."""
    idx, mask = epoch_order(seed, epoch, len(data), B)
    return [{k: v[i[m > 0]] for k, v in data.data.items()} for i, m in zip(idx, mask)]


def generator_factory(data, seed):
    epochs = itertools.count()

    def batches():
        yield from epoch_batches(data, seed, next(epochs))

    return batches


def torch_loader(data, seed):
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Rows(Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {k: torch.as_tensor(v[i]) for k, v in data.data.items()}

    class EpochOrder:  # a batch sampler that follows jaxlight's order, epoch after epoch
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return -(-len(data) // B)

        def __iter__(self):
            idx, mask = epoch_order(seed, self.epoch, len(data), B)
            self.epoch += 1
            return iter([i[m > 0].tolist() for i, m in zip(idx, mask)])

    return DataLoader(Rows(), batch_sampler=EpochOrder())


def grain_loader(data, seed):
    import grain

    batches = epoch_batches(data, seed, 0)
    return grain.MapDataset.range(len(batches)).map(lambda i: batches[i])


@pytest.mark.parametrize("make, epochs", [(generator_factory, 2), (torch_loader, 2),
                                          pytest.param(grain_loader, 1, marks=pytest.mark.slow)],
                         ids=["generator", "torch-dataloader", "grain"])
def test_iterables_of_batches_train_like_the_array_dataset(data, make, epochs):
    train, val = data
    expected = Trainer(quiet(max_epochs=epochs)).fit(new_state(), train)
    trainer = Trainer(quiet(max_epochs=epochs))
    got = trainer.fit(new_state(), make(train, 0), make(val, 0) if make is not grain_loader else val)
    assert trainer.global_step == epochs * 7 and len(trainer.history) == epochs
    assert_params_close(got, expected)
    for a, b in zip(leaves(got.model_state), leaves(expected.model_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert trainer.history[-1].metrics["count"] == N
    assert trainer.test(got, make(val, 0)) == pytest.approx(trainer.test(got, val), abs=1e-5)


def test_loop_fit_and_evaluate_take_a_generator_factory(data):
    train, val = data
    state, history = loop.fit(new_state(), generator_factory(train, 0), epochs=2, batch_size=B)
    assert [r.metrics["count"] for r in history] == [N, N] and int(state.step) == 14
    assert loop.evaluate(state, generator_factory(val, 0))["count"] == 120


def test_tuple_batches_and_nested_pytrees():
    def tuple_loss(model, batch):
        (x, extra), y = batch
        logits = model(x + extra["shift"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y), {}

    d = blobs()
    train = ArrayDataset(((d["feats"], {"shift": np.zeros_like(d["feats"])}), d["label"]))
    state = create_train_state(Net(nnx.Rngs(0)), optax.adam(1e-2), tuple_loss)
    state, history = loop.fit(state, train, epochs=1, batch_size=B)
    assert history[0].metrics["count"] == N and set(history[0].metrics) == {"loss", "count"}


def test_a_loss_that_handles_padding_itself_may_return_a_scalar(data):
    train, _ = data

    def contrastive(model, batch, mask):
        z = model(batch["feats"])
        z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
        sim = z @ z.T
        same = (batch["label"][:, None] == batch["label"][None, :]) & (mask[:, None] * mask[None, :] > 0)
        loss = -jnp.sum(jnp.where(same, sim, 0.0)) / jnp.maximum(jnp.sum(same), 1)
        return loss, {"pairs": jnp.sum(same).astype(jnp.float32)}

    state = create_train_state(Net(nnx.Rngs(0), dropout=0.0), optax.adam(1e-2), contrastive)
    first = {k: v[:10] for k, v in train.data.items()}
    _, metrics = train_step(state, first, np.ones(10, np.float32))
    z = np.asarray(create_train_state(Net(nnx.Rngs(0), dropout=0.0), optax.adam(1e-2), contrastive)
                   .module(train=True)(jnp.asarray(first["feats"])))
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    same = first["label"][:, None] == first["label"][None, :]
    assert float(metrics["loss"]) == pytest.approx(-(z @ z.T)[same].sum() / same.sum(), rel=1e-5)
    state, history = loop.fit(create_train_state(Net(nnx.Rngs(0)), optax.adam(1e-2), contrastive), train, 2, B)
    assert history[1].metrics["loss"] < history[0].metrics["loss"]


@pytest.mark.slow  # fast counterpart: test_trainer.py::test_bf16_computes_in_bf16_and_keeps_float32_params
def test_bf16_with_a_users_loss(data):
    train, val = data
    trainer = Trainer(quiet(max_epochs=2, numerics={"precision": "bf16"}))
    state = trainer.fit(new_state(), train, val)
    assert trainer.callback_metrics["val_acc"] > 0.8
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.params))


# --- errors: one line naming the culprit ------------------------------------------------------

def test_a_batch_that_does_not_fit_the_model_names_the_leaf_and_the_complaint():
    d = blobs(din=D + 1)
    with pytest.raises(BatchError) as info:
        loop.fit(new_state(), ArrayDataset(d), 1, B)
    message = str(info.value)
    assert "training set" in message and "['feats'] (32, 17) float32" in message
    assert "17" in message and "16" in message and "\n" not in message
    assert "Traceback" not in message


def test_a_missing_key_names_the_key():
    d = blobs()
    with pytest.raises(BatchError, match=r"KeyError: 'label'"):
        Trainer(quiet()).fit(new_state(), ArrayDataset({"feats": d["feats"], "target": d["label"]}))


def test_a_nan_in_the_inputs_names_the_leaf_and_row():
    d = blobs()
    d["feats"][17, 3] = np.nan
    with pytest.raises(BatchError, match=r"training set: data\['feats'\]\[17\] holds a NaN"):
        Trainer(quiet()).fit(new_state(), ArrayDataset(d))


def test_labels_out_of_range_for_a_builtin_task_name_the_row(mnist):
    from jaxlight import build_model, optim

    labels = np.array(mnist[0].labels[:100], np.int32)
    labels[42] = 10
    state = create_train_state(build_model("mlp"), optim.adam(1e-3), tasks.multiclass())
    with pytest.raises(BatchError, match=r"training set: y\[42\] = 10 is outside \[0, 10\)"):
        Trainer(quiet()).fit(state, ArrayDataset(mnist[0].images[:100], labels))


def test_a_donated_state_says_so(data):
    train, _ = data
    state = new_state()
    loop.fit(state, train, 1, B)
    for use in (lambda: loop.fit(state, train, 1, B), lambda: train_step(state, train.take(4).data),
                lambda: Trainer(quiet()).predict(state, train), lambda: loop.evaluate(state, train)):
        with pytest.raises(DonatedStateError, match="donated"):
            use()


@pytest.mark.parametrize("bad, message", [
    (lambda m, b: (jnp.mean(m(b["feats"])), {}), r"losses of shape \(\); expected \(32,\)"),
    (lambda m, b: (jnp.zeros(len(b["label"])), {"acc": jnp.zeros(3)}), r"metric 'acc' of shape \(3,\)"),
    (lambda m, b: (jnp.zeros(len(b["label"])), {"loss": jnp.zeros(len(b["label"]))}), "metric named 'loss'"),
    (lambda m, b: jnp.zeros(len(b["label"])), "must return .losses, metrics."),
])
def test_a_loss_that_breaks_the_contract_is_named(data, bad, message):
    train, _ = data
    state = create_train_state(Net(nnx.Rngs(0)), optax.adam(1e-3), bad)
    with pytest.raises(BatchError, match=message):
        loop.fit(state, train, 1, B)


def test_iterables_are_checked_for_structure(data):
    train, _ = data
    good = epoch_batches(train, 0, 0)
    with pytest.raises(BatchError, match=r"batch 2: batch\['feats'\] is \(B, 3\) float32, the first batch's was \(B, 16\)"):
        loop.fit(new_state(), [*good[:2], {"feats": np.zeros((B, 3), np.float32), "label": good[0]["label"]}], 1, B)
    with pytest.raises(BatchError, match="batch 1 has 64 rows, more than the first batch's 32"):
        loop.fit(new_state(), [good[0], {k: np.concatenate([v, v]) for k, v in good[0].items()}], 1, B)
    with pytest.raises(TypeError, match="can be iterated only once"):
        loop.fit(new_state(), (b for b in good), 1, B)


# --- strategies: BatchNorm sees the global batch, dropout follows the step ---------------------

# The fast tier runs a point or two of each strategy sweep; the whole sweeps are in the slow tier.
def _sweep(devices, fast):
    return pytest.mark.parametrize(("strategy", "devices"), [
        pytest.param(s, d, id=f"{s}-{d}", marks=() if (s, d) in fast else pytest.mark.slow)
        for d in devices for s in ["pmap", "sharded"]])


@_sweep([1, 2, 4, 8], fast={("pmap", 8)})
def test_batchnorm_under_every_strategy_equals_one_device(data, strategy, devices):
    from jaxlight import parallel

    train, val = data
    # 8 devices x 4 rows: the padded last batch (8 real rows) leaves devices 2-7 with padding only.
    expected, ref = loop.fit(new_state(dropout=0.0), train, 1, B)
    got, hist = loop.fit(new_state(dropout=0.0), train, 1, B, strategy=parallel.make_strategy(strategy, devices))
    assert_params_close(got, expected)
    for a, b in zip(leaves(got.model_state), leaves(expected.model_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert hist[0].metrics == pytest.approx(ref[0].metrics, rel=1e-5)
    strategy_ = parallel.make_strategy(strategy, devices)
    assert loop.evaluate(got, val, 40, strategy=strategy_) == pytest.approx(loop.evaluate(expected, val, 40), rel=1e-5)


@_sweep([2, 8], fast=set())  # (fast counterparts: the BatchNorm sweep's pmap-8 and the dropout tests above)
def test_dropout_under_every_strategy_equals_one_device(data, strategy, devices):
    from jaxlight import parallel

    train, _ = data
    expected, _ = loop.fit(new_state(dropout=0.5), train, 1, B)
    got, _ = loop.fit(new_state(dropout=0.5), train, 1, B, strategy=parallel.make_strategy(strategy, devices))
    assert_params_close(got, expected)


@pytest.mark.parametrize("strategy, devices", [("pmap", 8), ("sharded", 2), pytest.param("pmap", 2, marks=pytest.mark.slow),
                                               pytest.param("sharded", 8, marks=pytest.mark.slow)])
def test_predict_under_every_strategy_equals_one_device(data, strategy, devices):
    """Trainer.predict splits the batch over the devices and gives one device's outputs, in
    order and without padding (120 rows in batches of 48: a padded last batch)."""
    train, val = data
    state, _ = loop.fit(new_state(), train, 1, B)
    host = jax.device_get(state)
    expected = Trainer(quiet(eval_batch_size=48)).predict(state, val.data)
    got = Trainer(quiet(eval_batch_size=48,
                        parallel={"strategy": strategy, "devices": devices})).predict(host, val.data)
    assert got.shape == (len(val), 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # An independent reference: the eval-mode model on all rows at once.
    model = state.model
    np.testing.assert_allclose(expected, np.asarray(model(val.data["feats"])), rtol=1e-5, atol=1e-5)

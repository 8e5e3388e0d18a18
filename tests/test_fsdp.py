"""jaxlight.parallel's ``fsdp``: parameters, optimizer state and model state split over 1, 2, 4
and 8 fake CPU devices, with the numbers of one device.

Tolerance: that of ``tests/test_parallel.py`` (``1e-5 + 1e-5 * |p|`` on every parameter).
Splitting the batch reorders the float32 sums of the gradient as under ``sharded``; splitting a
parameter along a dimension that a matmul contracts adds partial products across devices, which
reorders the forward sums too. The layout itself is checked against the rule written out here
(largest dimension divisible by the device count, the earliest of equal ones), shard by shard.
"""


import jax
import numpy as np
import optax
import pytest
from flax import nnx

from _support import assert_params_close, count_compilations
from jaxlight import build_model, checkpoint, create_train_state, loop, optim, parallel, tasks
from jaxlight.callbacks import ModelCheckpoint
from jaxlight.data import ArrayDataset
from jaxlight.data.synthetic import make_regression
from jaxlight.trainer import Trainer, TrainerConfig

BATCH = 32
DEVICE_COUNTS = [1, 2, 4, 8]
TX = optim.adam(1e-3)  # one object: the optimizer is a static field of the state
# Each model's task and training examples: 200 in batches of 32 is 7 steps, the last with 8
# real rows (with 8 devices, six hold only padding); 80 is 3 steps, the last half padding.
MODELS = {
    "linear": (tasks.regression(), 200),
    "logistic": (tasks.binary(), 200),
    "softmax": (tasks.multiclass(), 200),
    "mlp": (tasks.multiclass(), 200),
    "cnn": (tasks.multiclass(), 80),
    "lstm": (tasks.multiclass(), 80),
}


def new_state(model: str):
    return create_train_state(build_model(model, 0), TX, MODELS[model][0], seed=0)


@pytest.fixture(scope="module")
def subsets(mnist):
    train, test = mnist
    regression = make_regression(n_train=200, n_test=99, seed=0)
    out = {"linear": (regression.train, regression.test)}
    for model in ("logistic", "softmax", "mlp", "cnn", "lstm"):
        n = MODELS[model][1]
        y_train, y_test = train.labels[:n].astype(np.int32), test.labels[:99].astype(np.int32)
        if model == "logistic":  # the binary task: is it a zero
            y_train, y_test = (y_train == 0).astype(np.int32), (y_test == 0).astype(np.int32)
        out[model] = (ArrayDataset(train.images[:n], y_train), ArrayDataset(test.images[:99], y_test))
    return out


class _Runs(dict):
    """``runs[(name, devices, model)]``: one epoch under a strategy, computed on first use:
    ``(state, epoch metrics, test metrics)`` (test metrics except for the slow-compiling cnn)."""

    def __init__(self, subsets):
        super().__init__()
        self.subsets = subsets

    def __missing__(self, key):
        name, devices, model = key
        train, test = self.subsets[model]
        strategy = parallel.make_strategy(name, devices)
        state, history = loop.fit(new_state(model), train, 1, BATCH, strategy=strategy)
        evaluation = None if model == "cnn" else loop.evaluate(state, test.to_device(), 50, strategy=strategy)
        self[key] = (state, history[0].metrics, evaluation)
        return self[key]


@pytest.fixture(scope="module")
def runs(subsets):
    return _Runs(subsets)


def host(state) -> list:
    """Every leaf of a state in any layout as numpy (PRNG keys as their key data)."""
    is_key = lambda a: jax.numpy.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
    return [np.asarray(jax.random.key_data(a) if is_key(a) else a) for a in jax.tree.leaves(parallel.to_host_state(state))]


def assert_trees_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def assert_bitwise_equal(actual, expected):
    for a, e in zip(host(actual), host(expected), strict=True):
        np.testing.assert_array_equal(a, e)


# --- the same numbers as single and sharded -------------------------------------------------

# The fast tier: mlp on 8 devices (the BatchNorm user model on 4 below); the whole sweep is in
# the slow tier.
FAST_SWEEP = {(8, "mlp")}


@pytest.mark.parametrize(("devices", "model"), [
    pytest.param(d, m, id=f"{d}-{m}", marks=() if (d, m) in FAST_SWEEP else pytest.mark.slow)
    for d in DEVICE_COUNTS for m in MODELS])
def test_fsdp_matches_single_device_and_sharded(model, devices, runs):
    state, metrics, evaluation = runs["fsdp", devices, model]
    single, single_metrics, single_eval = runs["single", None, model]

    split = any(not a.is_fully_replicated for a in jax.tree.leaves(state.params))
    assert parallel.layout_of(state) == ("single" if devices == 1 else "fsdp" if split else "replicated")
    assert int(state.step) == -(-MODELS[model][1] // BATCH)
    assert_params_close(state, single)
    assert_trees_close(parallel.to_host_state(state).opt_state, single.opt_state)
    assert metrics["count"] == single_metrics["count"] == MODELS[model][1]
    assert set(metrics) == set(single_metrics)
    for key in metrics:
        assert metrics[key] == pytest.approx(single_metrics[key], abs=1e-5), key
    if evaluation is not None:  # a batch of 50: rounded up to the device count, padding masked
        assert evaluation["count"] == 99
        for key in evaluation:
            assert evaluation[key] == pytest.approx(single_eval[key], abs=1e-5), key
    if devices > 1:
        assert_params_close(state, runs["sharded", devices, model][0])


# --- a user model with BatchNorm: its statistics are split too ----------------------------

class BNNet(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Linear: BatchNorm's mean and var (64,) are split."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 64, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def bn_loss(model, batch):
    logits = model(batch["feats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, {"acc": (logits.argmax(-1) == batch["label"]).astype(np.float32)}


BN_TX = optax.adam(1e-2)


def bn_state():
    return create_train_state(BNNet(nnx.Rngs(0)), BN_TX, bn_loss, seed=0)


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, 320).astype(np.int32)
    feats = (rng.normal(0, 3, (3, 16))[label] + rng.normal(0, 1, (320, 16))).astype(np.float32)
    return (ArrayDataset({"feats": feats[:200], "label": label[:200]}),
            ArrayDataset({"feats": feats[200:], "label": label[200:]}))


@pytest.mark.parametrize("devices", [pytest.param(d, marks=() if d == 4 else pytest.mark.slow) for d in DEVICE_COUNTS])
def test_batchnorm_user_model_under_fsdp_equals_one_device(devices, blobs):
    train, val = blobs
    expected, ref = loop.fit(bn_state(), train, 2, BATCH)
    strategy = parallel.make_strategy("fsdp", devices)
    got, hist = loop.fit(bn_state(), train, 2, BATCH, strategy=strategy)
    if devices > 1:
        assert not got.model_state["bn"]["mean"][...].is_fully_replicated  # the statistics are split
    assert_params_close(got, expected)
    assert_trees_close(parallel.to_host_state(got).model_state, expected.model_state)
    for a, b in zip(hist, ref, strict=True):
        assert a.metrics == pytest.approx(b.metrics, rel=1e-5, abs=1e-6)
    assert loop.evaluate(got, val, 40, strategy=strategy) == pytest.approx(loop.evaluate(expected, val, 40), rel=1e-5)


# --- the layout, checked shard by shard ------------------------------------------------------

def expected_axis(shape, n):
    """The rule, written out: of the dimensions whose size n divides, the largest (the earliest
    of equal ones); None when there is none."""
    fits = [(size, -axis) for axis, size in enumerate(shape) if size % n == 0 and size > 0]
    return -max(fits)[1] if fits else None


def assert_fsdp_layout(tree, n):
    """Every leaf of ``tree`` is split along ``expected_axis`` into ``n`` blocks of whole rows,
    block d on device d, holding those rows of the array."""
    devices = jax.devices()[:n]
    for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        axis = None if jax.numpy.issubdtype(a.dtype, jax.dtypes.prng_key) else expected_axis(a.shape, n)
        spec = tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
        assert spec == tuple("data" if i == axis else None for i in range(a.ndim)), (name, spec)
        shards = sorted(a.addressable_shards, key=lambda s: devices.index(s.device))
        assert [s.device for s in shards] == list(devices), name
        if jax.numpy.issubdtype(a.dtype, jax.dtypes.prng_key):
            continue
        whole = np.asarray(a)
        for d, shard in enumerate(shards):
            rows = [slice(None)] * a.ndim
            if axis is not None:
                size = a.shape[axis] // n
                rows[axis] = slice(d * size, (d + 1) * size)
            expected_shape = tuple(s // n if i == axis else s for i, s in enumerate(a.shape))
            assert shard.data.shape == expected_shape, (name, d)
            np.testing.assert_array_equal(np.asarray(shard.data), whole[tuple(rows)])


# The mlp's layout on 8 devices, by hand: 784 > 256 splits rows, 10 does not divide by 8.
MLP_SPECS_8 = {"fc1.kernel": ("data", None), "fc1.bias": ("data",), "fc2.kernel": ("data", None),
               "fc2.bias": (None,)}


@pytest.mark.parametrize("devices", [pytest.param(2, marks=pytest.mark.slow), 8])  # (the rule is the same for 2)
def test_fsdp_layout_follows_the_rule_before_and_after_training(devices, subsets, blobs):
    strategy = parallel.make_strategy("fsdp", devices)
    state = strategy.prepare_state(new_state("mlp"))
    assert parallel.layout_of(state) == "fsdp"
    assert_fsdp_layout(state, devices)
    if devices == 8:
        for layer, leaf in [("fc1", "kernel"), ("fc1", "bias"), ("fc2", "kernel"), ("fc2", "bias")]:
            for tree in (state.params, state.opt_state[0].mu, state.opt_state[0].nu):
                a = tree[layer][leaf][...]
                assert tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec)) == MLP_SPECS_8[f"{layer}.{leaf}"]
    for shardings, leaf in zip(jax.tree.leaves(strategy.state_shardings(state)), jax.tree.leaves(state), strict=True):
        assert leaf.sharding.is_equivalent_to(shardings, leaf.ndim)
    # After training, each step's new state is pinned to the same layout.
    trained, _ = loop.fit(state, subsets["mlp"][0], 1, BATCH, strategy=strategy)
    assert_fsdp_layout(trained, devices)
    bn, _ = loop.fit(bn_state(), blobs[0], 1, BATCH, strategy=strategy)
    assert_fsdp_layout(bn, devices)


def test_fsdp_state_shardings_work_on_abstract_states():
    """What a checkpoint restore asks for, from shapes alone."""
    strategy = parallel.make_strategy("fsdp", 4)
    abstract = jax.eval_shape(lambda: new_state("mlp"))
    shardings = strategy.state_shardings(abstract)
    by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    kernel = by_path[".params['fc1']['kernel'].value"]
    assert tuple(kernel.spec) == ("data",) and kernel.mesh.devices.size == 4
    assert tuple(by_path[".params['fc2']['bias'].value"].spec) == ()
    assert tuple(shardings.step.spec) == () and tuple(shardings.rng.spec) == ()


# --- memory per device -----------------------------------------------------------------------

def bytes_on(device, tree) -> int:
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards if s.device == device)


@pytest.mark.parametrize("devices", [pytest.param(d, marks=pytest.mark.slow) for d in (2, 4)] + [8])
def test_parameters_and_optimizer_state_take_one_nth_per_device(devices, subsets):
    single = new_state("mlp")
    whole = sum(np.asarray(a).nbytes for a in jax.tree.leaves((single.params, single.opt_state)))
    # The arrays no dimension of which divides (fc2's bias of 10 and its Adam moments, Adam's
    # count) stay whole on every device.
    kept = sum(np.asarray(a).nbytes for a in jax.tree.leaves((single.params, single.opt_state))
               if expected_axis(np.shape(a), devices) is None)
    assert kept < whole / 1000
    strategy = parallel.make_strategy("fsdp", devices)
    state = strategy.prepare_state(new_state("mlp"))
    for device in strategy.devices:
        assert bytes_on(device, (state.params, state.opt_state)) == (whole - kept) // devices + kept
    sharded = parallel.make_strategy("sharded", devices).prepare_state(new_state("mlp"))
    assert bytes_on(jax.devices()[0], (sharded.params, sharded.opt_state)) == whole

    # The compiled step's own accounting: its arguments (state + this batch) per device.
    batch = {"x": np.asarray(subsets["mlp"][0].x[:BATCH]), "y": np.asarray(subsets["mlp"][0].y[:BATCH])}
    analysis = strategy.lower_train_step(state, batch).compile().memory_analysis()
    reference = parallel.make_strategy("single").lower_train_step(new_state("mlp"), batch).compile().memory_analysis()
    if analysis is None or reference is None:
        pytest.skip("this backend gives no memory analysis")
    batch_bytes = sum(np.asarray(v).nbytes for v in batch.values()) + 4 * BATCH  # + the mask
    assert reference.argument_size_in_bytes >= whole
    assert analysis.argument_size_in_bytes <= (whole - kept) / devices + kept + batch_bytes + 256
    assert analysis.output_size_in_bytes <= reference.output_size_in_bytes / devices * 1.01 + 1024


# --- compile once ----------------------------------------------------------------------------



@pytest.mark.parametrize("devices", [pytest.param(1, marks=pytest.mark.slow), 8])
def test_fsdp_epochs_compile_once(devices, subsets):
    """The state comes out of each chunk in the layout it went in: the second epoch reuses the
    first one's programs."""
    train, _ = subsets["mlp"]
    strategy = parallel.make_strategy("fsdp", devices)
    # An optimizer no other test uses: its programs are compiled here, not reused.
    state = create_train_state(build_model("mlp", 0), optim.adam(0.00123 * devices), tasks.multiclass(), seed=0)
    after_epoch = []
    with count_compilations() as compiled:
        state, _ = loop.fit(state, train, 3, BATCH, steps_per_call=7, strategy=strategy,
                            on_epoch=lambda r: after_epoch.append(len(compiled)))
    assert int(state.step) == 21
    assert after_epoch[0] > 0
    assert after_epoch[0] == after_epoch[1] == after_epoch[2]


# --- moving a state through checkpoints and layouts -----------------------------------------

@pytest.mark.slow  # fast counterpart: test_checkpoint.py's layout moves to and from fsdp, one save each
def test_state_moves_through_checkpoints_between_single_fsdp_and_sharded(subsets, tmp_path):
    """single -> fsdp(8) -> sharded(4) -> fsdp(2) -> single, one epoch each, through
    ``save_checkpoint`` / ``restore_checkpoint`` and ``prepare_state`` as the Trainer restores.
    Each restore lands bit for bit on the saved arrays; the end is five single-device epochs to
    the parallel tolerance (each layout sums in its own order)."""
    train, _ = subsets["mlp"]
    expected, _ = loop.fit(new_state("mlp"), train, 5, BATCH)
    chain = [("single", None), ("fsdp", 8), ("sharded", 4), ("fsdp", 2), ("single", None)]
    state = new_state("mlp")
    for i, (name, devices) in enumerate(chain):
        strategy = parallel.make_strategy(name, devices)
        if i:
            restored, _ = checkpoint.restore_checkpoint(path, new_state("mlp"))
            state = strategy.prepare_state(restored)
            assert_bitwise_equal(state, saved)
            assert parallel.layout_of(state) == {"single": "single", "fsdp": "fsdp", "sharded": "replicated"}[name]
        state, _ = loop.fit(state, train, 1, BATCH, strategy=strategy)
        saved = parallel.to_host_state(state)
        path = checkpoint.save_checkpoint(tmp_path, state)
    assert int(state.step) == 35
    assert_params_close(state, expected)


def test_fsdp_resume_is_bitwise_the_uninterrupted_run(subsets, tmp_path):
    """Stopped and restored from a checkpoint under the same fsdp layout, a run goes on with
    the same bits as one never stopped (the same programs on the same shards)."""
    train, _ = subsets["mlp"]
    strategy = parallel.make_strategy("fsdp", 4)
    uninterrupted, _ = loop.fit(new_state("mlp"), train, 2, BATCH, strategy=strategy)
    first, _ = loop.fit(new_state("mlp"), train, 1, BATCH, strategy=strategy)
    path = checkpoint.save_checkpoint(tmp_path, first)
    restored, _ = checkpoint.restore_checkpoint(path, new_state("mlp"))
    resumed, _ = loop.fit(strategy.prepare_state(restored), train, 1, BATCH, strategy=strategy)
    assert_bitwise_equal(resumed, uninterrupted)


class BiasBeforeNorm(nnx.Module):
    """Linear (with a bias) -> BatchNorm -> ReLU -> Dropout -> Linear: BatchNorm subtracts the
    batch mean, so the first bias changes no training output and its exact gradient is 0."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.backbone = nnx.Linear(8, 64, rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.bn(self.backbone(x)))))


@pytest.mark.slow  # 160 steps on 8, 4 and 1 devices; fast counterpart: test_checkpoint.py's layout moves to
# and from fsdp (each restore bit for bit on the saved arrays)
def test_an_fsdp_run_resumed_on_another_device_count_parts_only_where_rounding_is_amplified(tmp_path):
    """Stopped on 8 devices and resumed on 4 and on 1, against the run never stopped on 8. The
    checkpoint adds nothing: the resumed run is bitwise the state moved in memory and trained on.
    The data order and the dropout masks carry over: every parameter with a real gradient stays
    within the parallel tolerance, through BatchNorm and active dropout. One leaf parts: the bias
    before BatchNorm. Its exact gradient is 0, so its float32 gradient is rounding noise (about
    1e-9, its sign set by the summation order of the layout), and Adam divides that by
    sqrt(v) + eps with eps = 1e-8. So each step moves it by up to about lr, in a direction the
    layout picks. It changes no training output; in eval mode BatchNorm's running mean lags it,
    so predictions part too, but by less than lr * steps (docs/parallel.md)."""
    from userpkg.data import blobs
    from userpkg.nets import loss_fn

    lr, epochs = 0.01, 2
    train, val, test = blobs(n_train=512, n_val=128, n_test=256)

    def new():
        return create_train_state(BiasBeforeNorm(rngs=nnx.Rngs(0)), optim.adam(lr), loss_fn, seed=0)

    def config(**kw):
        return TrainerConfig(batch_size=64, **kw, logging={"enable_progress_bar": False})

    never_stopped = Trainer(config(max_epochs=2 * epochs, parallel={"strategy": "fsdp", "devices": 8}))
    reference = never_stopped.fit(new(), train, val)
    first = Trainer(config(max_epochs=epochs,
                           parallel={"strategy": "fsdp", "devices": 8}), callbacks=[ModelCheckpoint(tmp_path)])
    moved = parallel.to_host_state(first.fit(new(), train, val))
    steps_after = epochs * 8
    for strategy, devices in [("fsdp", 4), ("single", None)]:
        trainer = Trainer(config(max_epochs=2 * epochs, parallel={"strategy": strategy, "devices": devices}))
        resumed = trainer.fit(new(), train, val, ckpt_path=tmp_path)
        copy = jax.tree.map(lambda x: jax.numpy.copy(x) if isinstance(x, jax.Array) else x, moved)  # (fit donates)
        in_memory = loop.fit(parallel.shard_state(copy, strategy, devices), train, epochs, 64,
                             strategy=parallel.make_strategy(strategy, devices))[0]
        assert_bitwise_equal(resumed.params, in_memory.params)
        got, want = (jax.tree_util.tree_flatten_with_path(parallel.to_host_state(s).params)[0]
                     for s in (resumed, reference))
        for (path, a), (_, b) in zip(got, want, strict=True):
            name = jax.tree_util.keystr(path)
            if name.startswith("['backbone']['bias']"):
                assert np.abs(np.asarray(a) - np.asarray(b)).max() <= lr * steps_after
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
        gap = np.abs(trainer.predict(resumed, test) - never_stopped.predict(reference, test)).max()
        assert gap <= lr * steps_after


def trainer_config(**kw):
    return TrainerConfig(**{"batch_size": BATCH, "max_epochs": 2, "logging": {"enable_progress_bar": False}, **kw})


@pytest.mark.slow  # fast counterpart: test_cli_trains_under_fsdp_and_resumes_under_other_layouts (the Trainer through main)
def test_trainer_resumes_an_fsdp_checkpoint_under_other_layouts(subsets, tmp_path):
    """``strategy="fsdp"`` in the Trainer: stopped at step 10 on 8 devices, resumed on 8
    (bitwise the uninterrupted fsdp run), on 2 and on one device (to the tolerance)."""
    train, _ = subsets["mlp"]
    full = Trainer(trainer_config(parallel={"strategy": "fsdp", "devices": 8})).fit(new_state("mlp"), train)
    single = Trainer(trainer_config()).fit(new_state("mlp"), train)
    Trainer(trainer_config(max_steps=10, parallel={"strategy": "fsdp", "devices": 8}),
            callbacks=[ModelCheckpoint(tmp_path, every_n_epochs=None)]).fit(new_state("mlp"), train)
    for strategy, devices in [("fsdp", 8), ("fsdp", 2), ("single", None)]:
        resumed = Trainer(trainer_config(parallel={"strategy": strategy, "devices": devices}))
        state = resumed.fit(new_state("mlp"), train, ckpt_path=tmp_path / "step_000000010")
        assert resumed.restored_from.name == "step_000000010" and int(state.step) == 14
        assert parallel.layout_of(state) == ("fsdp" if strategy == "fsdp" else "single")
        if devices == 8:
            assert_bitwise_equal(state, full)
        assert_params_close(state, single)


# --- names and the command line ---------------------------------------------------------------

def test_fsdp_is_a_strategy_name_everywhere():
    assert "fsdp" in parallel.STRATEGIES
    assert isinstance(parallel.make_strategy("fsdp", 2), parallel.Fsdp)
    assert parallel.make_strategy("fsdp").num_devices == 8
    assert Trainer(trainer_config(parallel={"strategy": "fsdp", "devices": 4})).strategy.name == "fsdp"
    with pytest.raises(parallel.ParallelError, match="global batch size 30 does not divide over 4 devices"):
        Trainer(trainer_config(batch_size=30, parallel={"strategy": "fsdp", "devices": 4}))


@pytest.mark.slow  # fast counterparts: test_fsdp_resume_is_bitwise_the_uninterrupted_run (Trainer) and
# test_cli_trainer.py (the strategy flags and --resume across layouts)
def test_cli_trains_under_fsdp_and_resumes_under_other_layouts(cli_main, tmp_path):
    """``jaxlight train --strategy fsdp``: checkpoint on 4 devices, ``--resume`` on 2; the
    same run as one device all along, to float32 rounding."""
    import json

    common = ["train", "--model", "linear", "--val-split", "0.1"]
    full = cli_main("jaxlight", *common, "--epochs", "3", "--out", str(tmp_path / "full"))
    first = cli_main("jaxlight", *common, "--epochs", "2", "--out", str(tmp_path / "first"), "--strategy", "fsdp",
                     "--devices", "4", "--ckpt-dir", str(tmp_path / "ckpt"))
    resumed = cli_main("jaxlight", *common, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--strategy",
                       "fsdp", "--devices", "2", "--ckpt-dir", str(tmp_path / "ckpt"), "--resume")
    for result in (full, first, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp on 4 device(s)" in first.stdout and "fsdp on 2 device(s)" in resumed.stdout
    assert "resumed from" in resumed.stdout
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("full", "resumed"))
    assert (b["strategy"], b["devices"]) == ("fsdp", 2)
    for ea, eb in zip(a["history"], b["history"], strict=True):
        for key in ea:
            assert eb[key] == pytest.approx(ea[key], rel=1e-4, abs=1e-6), key
    for key in ("test_mse", "weight_error", "bias_error"):
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key

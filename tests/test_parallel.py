"""jaxlight.parallel: pmap and sharded on 1, 2, 4, 8 fake CPU devices compute what one device does.

The float32 tolerance: parameters after training agree with the single-device run to
``PARALLEL_ATOL + PARALLEL_RTOL * |p|`` (1e-5 each, in ``_support``). Splitting the batch
changes only the order in which the per-example gradients are summed (per device, then across
devices), so each step differs by a few ulps; Adam's normalisation amplifies that for
near-zero gradients. Measured on this CPU:
max |difference| 3e-7 (mlp, 7 steps) and 4e-6 (cnn, 3 steps).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _support import assert_params_close, count_compilations
from jaxlight import build_model, create_train_state, loop, optim, parallel, tasks
from jaxlight.data import ArrayDataset
from jaxlight.parallel import ParallelError

# mlp: 200 examples in batches of 32 -> 7 steps; the last holds 8 real rows, so with 8 devices
# six of them hold only padding (count 0): the weighting of gradients and metrics must be right.
# cnn: 80 examples -> 3 steps, the last half padding (a CNN step compiles slowly on the CPU).
SIZES = {"mlp": 200, "cnn": 80}
BATCH = 32
DEVICE_COUNTS = [1, 2, 4, 8]
# One optimizer and task object for every run: they are static fields of the state, so
# sharing them lets runs on the same devices share compiled steps.
TX = optim.adam(1e-3)
TASK = tasks.multiclass()


def new_state(model: str):
    return create_train_state(build_model(model, 0), TX, TASK, seed=0)


@pytest.fixture(scope="module")
def subsets(mnist):
    train, test = mnist
    return {m: (ArrayDataset(train.images[:n], train.labels[:n].astype(np.int32)),
                ArrayDataset(test.images[:99], test.labels[:99].astype(np.int32)))
            for m, n in SIZES.items()}


class _References(dict):
    """The reference of each model, computed on first use: one epoch on one device, its epoch
    metrics and test metrics."""

    def __init__(self, subsets):
        super().__init__()
        self.subsets = subsets

    def __missing__(self, model):
        train, test = self.subsets[model]
        state, history = loop.fit(new_state(model), train, 1, BATCH)
        evaluation = loop.evaluate(state, test.to_device(), 50) if model == "mlp" else None
        self[model] = (state, history[0].metrics, evaluation)
        return self[model]


@pytest.fixture(scope="module")
def single_runs(subsets):
    return _References(subsets)


# The fast tier runs two points of the sweep (both strategies, 4 and 8 devices); the whole sweep,
# the CNN included, is in the slow tier.
FAST_SWEEP = {(8, "pmap", "mlp"), (4, "sharded", "mlp")}


@pytest.mark.parametrize(("devices", "name", "model"), [
    pytest.param(d, n, m, id=f"{d}-{n}-{m}", marks=() if (d, n, m) in FAST_SWEEP else pytest.mark.slow)
    for d in DEVICE_COUNTS for n in ["pmap", "sharded"] for m in ["mlp", "cnn"]])
def test_strategy_matches_single_device(model, name, devices, subsets, single_runs):
    train, test = subsets[model]
    strategy = parallel.make_strategy(name, devices)
    state, history = loop.fit(new_state(model), train, 1, BATCH, strategy=strategy)
    ref_state, ref_metrics, ref_eval = single_runs[model]

    assert parallel.layout_of(state) == ("single" if devices == 1 else "replicated")
    assert int(state.step) == -(-SIZES[model] // BATCH)
    assert_params_close(state, ref_state)
    # Metrics are example-weighted across devices: count is global, means match.
    assert history[0].metrics["count"] == ref_metrics["count"] == SIZES[model]
    for key in ("loss", "accuracy"):
        assert history[0].metrics[key] == pytest.approx(ref_metrics[key], abs=1e-5)
    if model == "cnn":
        return  # evaluation compiles another CNN program; the mlp rows cover its reduction
    # Evaluation with a batch (50) that does not divide by 4 or 8 rounds up, padding masked.
    metrics = loop.evaluate(state, test.to_device(), 50, strategy=strategy)
    assert metrics["count"] == 99
    assert metrics["accuracy"] == pytest.approx(ref_eval["accuracy"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(ref_eval["loss"], abs=1e-5)


@pytest.mark.parametrize("name", ["pmap", pytest.param("sharded", marks=pytest.mark.slow)])
def test_host_streamed_batches_match_fused_epoch(name, subsets, single_runs):
    """Data left on the host goes through ``train_step`` batch by batch: same result."""
    train, test = subsets["mlp"]
    strategy = parallel.make_strategy(name, 4)
    state, history = loop.fit(new_state("mlp"), train, 1, BATCH, on_device=False, strategy=strategy)
    assert_params_close(state, single_runs["mlp"][0])
    assert history[0].metrics["loss"] == pytest.approx(single_runs["mlp"][1]["loss"], abs=1e-5)
    metrics = loop.evaluate(state, test, 50, strategy=strategy)  # host data: eval_step path
    assert metrics["count"] == 99
    assert metrics["accuracy"] == pytest.approx(single_runs["mlp"][2]["accuracy"], abs=1e-6)




@pytest.mark.parametrize(("name", "devices"), [
    ("single", None), ("pmap", 2), ("sharded", 8),
    pytest.param("pmap", 1, marks=pytest.mark.slow), pytest.param("sharded", 1, marks=pytest.mark.slow),
])
def test_fused_epochs_compile_once(name, devices, subsets):
    """The second epoch reuses the first one's programs: the state's layout is stable from the
    first step on (a fresh state's uncommitted arrays would otherwise cost a second compile:
    on one GPU that made every pmap/sharded epoch after the first 15-40x slower than single)."""
    train, _ = subsets["mlp"]
    strategy = parallel.make_strategy(name, devices)
    after_epoch = []
    with count_compilations() as compiled:
        state, _ = loop.fit(new_state("mlp"), train, 3, BATCH, steps_per_call=7, strategy=strategy,
                            on_epoch=lambda r: after_epoch.append(len(compiled)))
    assert int(state.step) == 21
    assert after_epoch[0] == after_epoch[1] == after_epoch[2]


@pytest.mark.parametrize(
    ("name", "devices", "batch", "message"),
    [
        ("pmap", 4, 30, "global batch size 30 does not divide over 4 devices"),
        ("sharded", 8, 60, "global batch size 60 does not divide over 8 devices"),
    ],
)
def test_batch_not_divisible_by_devices_is_a_clear_error(name, devices, batch, message, subsets):
    train, _ = subsets["mlp"]
    with pytest.raises(ParallelError, match=message):
        loop.fit(new_state("mlp"), train, 1, batch, strategy=parallel.make_strategy(name, devices))


@pytest.mark.parametrize(
    ("name", "devices", "message"),
    [
        ("pmap", 16, "asked for 16 devices but only 8 cpu device"),
        ("sharded", 9, "xla_force_host_platform_device_count=9"),
        ("sharded", 0, "devices must be a positive integer, got 0"),
        ("single", 2, "the single strategy runs on 1 device"),
        ("ddp", 2, "unknown strategy 'ddp'"),
    ],
)
def test_impossible_device_requests_are_clear_errors(name, devices, message):
    with pytest.raises(ParallelError, match=message):
        parallel.make_strategy(name, devices)


def test_default_strategy_is_today_single_device_behaviour():
    assert parallel.get_strategy(None) is parallel.make_strategy("single")
    assert parallel.get_strategy(None).devices == (jax.devices()[0],)
    assert parallel.make_strategy("sharded").num_devices == 8


# --- State portability: what a checkpoint layer calls -------------------------------------


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (("pmap", 8), ("single", 1)),
        pytest.param(("pmap", 8), ("sharded", 2), marks=pytest.mark.slow),
        (("sharded", 8), ("pmap", 4)),
        pytest.param(("sharded", 2), ("sharded", 8), marks=pytest.mark.slow),
    ],
)
def test_state_moves_between_strategies_and_device_counts(first, then, subsets):
    """Train one epoch under ``first``, move the state, train one more under ``then``: the
    same parameters as two epochs on one device."""
    train, _ = subsets["mlp"]
    ref, _ = loop.fit(new_state("mlp"), train, 2, BATCH)

    state, _ = loop.fit(new_state("mlp"), train, 1, BATCH, strategy=parallel.make_strategy(*first))
    host = parallel.to_host_state(state)
    assert parallel.layout_of(host) == "single"
    assert {frozenset(leaf.sharding.device_set) for leaf in jax.tree.leaves(host)} == {frozenset({jax.devices()[0]})}
    moved = parallel.shard_state(host, then[0], then[1])
    expected_devices = parallel.make_strategy(*then).devices
    assert moved.params["fc1"]["kernel"][...].sharding.device_set == set(expected_devices)
    # fit resumes at epoch 1 from state.step, in the order fold_in(rng, 1).
    state, _ = loop.fit(moved, train, 1, BATCH, strategy=parallel.make_strategy(*then))
    assert int(state.step) == int(ref.step)
    assert_params_close(state, ref)


@pytest.mark.parametrize(("name", "devices"), [("single", None), ("pmap", 8), ("sharded", 4)])
def test_state_shardings_describe_the_prepared_layout(name, devices):
    """What a checkpoint restore asks for to land straight in this strategy's layout."""
    strategy = parallel.make_strategy(name, devices)
    state = strategy.prepare_state(new_state("mlp"))
    shardings = strategy.state_shardings(state)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert len(jax.tree.leaves(state)[0].sharding.device_set) == strategy.num_devices


def test_to_host_state_round_trips_through_numpy_arrays(subsets):
    """The replicated state's arrays, fetched to numpy and put back, are the same state."""
    train, _ = subsets["mlp"]
    state, _ = loop.fit(new_state("mlp"), train, 1, BATCH, strategy=parallel.make_strategy("pmap", 8))
    host = parallel.to_host_state(state)
    params = jax.device_get(host.params)
    back = parallel.shard_state(host.replace(params=jax.tree.map(jax.numpy.asarray, params)), "sharded", 4)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- Command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--strategy", "pmap", "--devices", "7"], "global batch size 64 does not divide over 7 devices"),
    (["--strategy", "sharded", "--devices", "16"], "asked for 16 devices but only 8 cpu device(s) exist"),
    (["--strategy", "single", "--devices", "2"], "the single strategy runs on 1 device"),
])
def test_cli_impossible_parallel_flags_exit_with_a_clear_error(args, message, capsys, tmp_path):
    from jaxlight.cli import main

    assert main(["train", "--model", "mlp", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pmap", "sharded"])
def test_cli_trains_on_8_fake_devices_to_single_device_accuracy(name, cli, data_dir, tmp_path):
    """``jaxlight train --strategy NAME --devices 8`` on full MNIST, one epoch of the mlp recipe.
    One device reaches 0.9535 with this recipe; float32 chaos over 938 steps moves a run by a
    few tenths of a percent (the README), so the bar is 0.945."""
    result = cli("jaxlight", "train", "--model", "mlp", "--epochs", "1", "--strategy", name,
                 "--devices", "8", "--data-dir", str(data_dir), "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert (summary["strategy"], summary["devices"], summary["processes"]) == (name, 8, 1)
    assert summary["test_accuracy"] > 0.945
    assert f"{name} on 8 device(s)" in result.stdout


@pytest.mark.parametrize(("name", "devices"), [("sharded", 8), ("pmap", 4)])
def test_evaluate_and_predict_pad_an_iterables_batch_that_does_not_divide(name, devices, subsets):
    """Batches of 30 and 13 rows on 8 (4) devices: padded as an ArrayDataset's last batch is
    (mask 0), so evaluation and prediction give one device's numbers; training still refuses."""
    _, test = subsets["mlp"]
    x, y = np.asarray(test.x[:73]), np.asarray(test.y[:73])
    batches = [{"x": x[i:i + 30], "y": y[i:i + 30]} for i in range(0, 73, 30)]  # 30, 30, 13 rows
    state = new_state("mlp")
    strategy = parallel.make_strategy(name, devices)
    expected = loop.evaluate(state, ArrayDataset(x, y), batch_size=73)
    got = loop.evaluate(state, batches, strategy=strategy)
    assert got["count"] == 73
    for k in ("loss", "accuracy"):
        assert got[k] == pytest.approx(expected[k], rel=1e-5)
    outputs = loop.predict(state, batches, strategy=strategy)
    np.testing.assert_allclose(outputs, np.asarray(state.model(jnp.asarray(x, jnp.float32) / 255.0)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ParallelError, match="global batch size 30 does not divide"):
        loop.fit(new_state("mlp"), batches, 1, 30, strategy=strategy)

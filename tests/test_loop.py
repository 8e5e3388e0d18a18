"""``loop.prepare_source``: the user's data goes to the runner once, and plain numbers come back."""

import jax
import numpy as np
import pytest

from jaxlight import build_model, create_train_state, optim, parallel, tasks
from jaxlight.data import ArrayDataset, Batches
from jaxlight.data.synthetic import make_regression
from jaxlight.loop import EpochRunner, Source, prepare_source
from jaxlight.step import BatchError

DATA = make_regression(n_train=130, n_test=20)  # 130 rows: batches of 64, 64 and 2 (padded)


def _state():
    return create_train_state(build_model("linear", 0), optim.sgd(0.05), tasks.regression(), seed=0)


def _batches(n_rows):
    return [{"x": DATA.train.x[i:i + 64], "y": DATA.train.y[i:i + 64]} for i in range(0, n_rows, 64)]


@pytest.mark.parametrize("on_device", [True, False])
def test_an_array_dataset_reports_its_numbers_and_placement(on_device):
    source = prepare_source(_state(), DATA.train, "training set", 64, on_device=on_device)
    assert (source.num_examples, source.num_batches) == (130, 3)  # ceil(130 / 64)
    assert [source.steps_per_epoch(a) for a in (1, 2, 3, 4)] == [3, 2, 1, 1]
    assert source.fused is on_device and source.arrays
    assert all(isinstance(a, jax.Array) is on_device for a in jax.tree.leaves(source.data.data))


def test_first_batches_keeps_the_stored_head():
    source = prepare_source(_state(), DATA.train, "training set", 48, first_batches=2)
    assert source.num_examples == 96
    np.testing.assert_array_equal(np.asarray(source.data.x), DATA.train.x[:96])


def test_an_iterable_streams_and_knows_its_length_when_it_has_one():
    listed = prepare_source(_state(), _batches(130), "training set", 64)
    assert isinstance(listed.data, Batches) and not listed.fused and not listed.arrays
    assert (listed.num_examples, listed.num_batches, listed.steps_per_epoch(2)) == (None, 3, 2)
    factory = prepare_source(_state(), lambda: iter(_batches(130)), "training set", 64, first_batches=2)
    assert factory.num_batches is None
    rows = [int(mask.sum()) for _, mask in factory.pairs(parallel.get_strategy(), None)]
    assert rows == [64, 64]  # cut to 2 batches, the last (2-row) one never read


def test_evaluation_and_prediction_round_the_batch_up_to_the_devices():
    sharded = parallel.make_strategy("sharded", 8)
    assert prepare_source(_state(), DATA.test, "test set", 30, sharded, mode="eval").batch_size == 32
    x = DATA.test.x
    source = prepare_source(_state(), x, "prediction data", 30, sharded, mode="predict")  # a bare x
    assert source.batch_size == 32 and not source.fused
    np.testing.assert_array_equal(source.data.data["x"], x)


def test_the_runner_reads_a_prepared_source_with_its_own_batch_size():
    source = prepare_source(_state(), DATA.train, "training set", 64, on_device=False)
    runner = EpochRunner(_state(), source, 0, 999, parallel.get_strategy())
    assert (runner.num_batches, runner.k) == (3, 1)  # host-streamed: one step per call
    counts = [float(np.sum(m["count"])) for _, m, _ in runner]
    assert sum(counts) == 130 and runner.finished


@pytest.mark.parametrize("data, error, message", [
    (DATA.train.x, TypeError, r"training set: got a bare array; wrap it as ArrayDataset"),
    (ArrayDataset(DATA.train.x[:0], DATA.train.y[:0]), BatchError, r"training set is empty \(0 examples\)"),
    (iter(_batches(130)), TypeError, r"training set: a generator or iterator can be iterated only once"),
    (lambda: iter([]), BatchError, r"training set yielded no batches"),
    (ArrayDataset(DATA.train.x[:, :3], DATA.train.y), BatchError, r"training set: x has shape \(130, 3\)"),
])
def test_bad_data_is_named_before_any_step(data, error, message):
    with pytest.raises(error, match=message):
        prepare_source(_state(), data, "training set", 64)
    with pytest.raises(ValueError, match="mode must be"):
        prepare_source(_state(), DATA.train, "training set", 64, mode="fit")


def test_a_source_of_a_source_keeps_the_data_and_takes_the_new_name_and_batch():
    inner = Source(DATA.train, "training set", 64)
    outer = Source(inner, "validation set", 100)
    assert outer.data is inner.data and (outer.name, outer.num_batches) == ("validation set", 2)

"""Batching, the data-order contract, the seeded split and the synthetic regression data."""

import jax
import numpy as np
import pytest

from jaxlight.data import ArrayDataset, batch_indices, epoch_order, host_batch_indices, iterate_batches, make_regression


@pytest.mark.parametrize("n, batch", [(10, 4), (12, 4), (60000, 64), (1, 64), (0, 4)])
def test_every_example_once_last_batch_padded_and_masked(n, batch):
    idx, mask = batch_indices(jax.random.key(3), n, batch, True)
    idx, mask = np.asarray(idx), np.asarray(mask)
    assert idx.shape == mask.shape == (-(-n // batch), batch)
    real = idx[mask > 0]
    assert sorted(real.tolist()) == list(range(n))
    assert mask.sum() == n and (mask.reshape(-1)[:n] == 1).all()


@pytest.mark.parametrize("n, batch", [(10, 4), (12, 5)])
def test_the_order_is_the_keys_permutation_padded_with_the_last_batchs_first_row(n, batch):
    """The data-order contract, written out: ``jax.random.permutation(key, n)`` (or the stored
    order), cut into batches, the last one filled with copies of its first index, masked 0."""
    key = jax.random.key(11)
    for shuffle, order in ((True, np.asarray(jax.random.permutation(key, n))), (False, np.arange(n))):
        nb = -(-n // batch)
        want = np.full(nb * batch, order[(nb - 1) * batch])
        want[:n] = order
        idx, mask = batch_indices(key, n, batch, shuffle)
        assert isinstance(idx, jax.Array) and idx.dtype == np.int32 and mask.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(idx), want.reshape(nb, batch))
        np.testing.assert_array_equal(np.asarray(mask).reshape(-1), (np.arange(nb * batch) < n).astype(np.float32))
        host_idx, host_mask = host_batch_indices(key, n, batch, shuffle)
        assert isinstance(host_idx, np.ndarray)
        np.testing.assert_array_equal(host_idx, np.asarray(idx))
        np.testing.assert_array_equal(host_mask, np.asarray(mask))


def test_epoch_order_is_seeded_and_changes_per_epoch():
    a0, _ = epoch_order(seed=1, epoch=0, n=100, batch_size=10)
    assert np.array_equal(a0, epoch_order(seed=1, epoch=0, n=100, batch_size=10)[0])
    assert not np.array_equal(a0, epoch_order(seed=1, epoch=1, n=100, batch_size=10)[0])
    assert not np.array_equal(a0, epoch_order(seed=2, epoch=0, n=100, batch_size=10)[0])


def test_host_streaming_sees_the_device_order():
    data = ArrayDataset(np.arange(10, dtype=np.float32)[:, None], np.arange(10, dtype=np.int32))
    key = jax.random.key(5)
    idx, mask = batch_indices(key, 10, 4, True)
    batches = list(iterate_batches(data, 4, key))
    assert np.array_equal(np.stack([b["y"] for b in batches]), np.asarray(idx))
    assert np.array_equal(np.stack([b["mask"] for b in batches]), np.asarray(mask))


def test_split_is_seeded_disjoint_and_complete():
    data = ArrayDataset(np.arange(100, dtype=np.float32)[:, None], np.arange(100, dtype=np.int32))
    train, val = data.split(0.2, seed=7)
    assert len(train) == 80 and len(val) == 20
    assert sorted(np.concatenate([train.y, val.y]).tolist()) == list(range(100))
    assert np.array_equal(val.y, data.split(0.2, seed=7)[1].y)
    assert not np.array_equal(val.y, data.split(0.2, seed=8)[1].y)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split(1.5)


def test_dataset_length_mismatch_is_named():
    with pytest.raises(ValueError, match="x has 3 examples but y has 2"):
        ArrayDataset(np.zeros((3, 2)), np.zeros(2))


def test_synthetic_regression_is_seeded_with_known_parameters():
    data = make_regression(seed=0)
    again = make_regression(seed=0)
    assert np.array_equal(data.train.x, again.train.x) and np.array_equal(data.weight, again.weight)
    # Least squares on the training set recovers the true parameters closely.
    x1 = np.hstack([data.train.x, np.ones((len(data.train), 1), np.float32)])
    solution, *_ = np.linalg.lstsq(x1, data.train.y, rcond=None)
    assert np.abs(solution[:-1] - data.weight).max() < 0.01
    assert abs(solution[-1, 0] - data.bias[0]) < 0.01

"""A port trains under jaxlight's own engine: batch norm through the step's padded-batch
stand-in (one device and ``pmap``), dropout switched by the train/eval views, and torch's
running statistics (the unbiased variance) kept exactly."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch import nn
from torch.nn import functional as F

import jaxlight
from jaxlight import interop
from jaxlight.data import ArrayDataset
from jaxlight.bridge.porting import nn as pnn
from jaxlight.bridge.porting.translate import translate

torch.set_num_threads(1)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn2d = nn.BatchNorm2d(3, momentum=0.3)
        self.fc = nn.Linear(3 * 4 * 4, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        h = F.relu(self.bn2d(self.conv(x)))
        return self.bn1d(self.fc(h.flatten(1)))


def square_loss(model, batch):
    y = model(batch["x"])
    return jnp.sum(jnp.square(y), axis=1), {}


@pytest.mark.parametrize("strategy,devices", [("single", None), ("pmap", 2)])
def test_running_statistics_of_a_padded_batch_are_torchs_on_the_real_rows(strategy, devices):
    """One batch of 8 rows, 5 real: the running mean and (unbiased) running variance after one
    step equal torch's after a train-mode forward on the 5 real rows; under pmap the second
    device holds 1 real row and 3 padding rows."""
    torch.manual_seed(0)
    model = BNNet()
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 + 1
    t = translate(model, (x,))
    state = jaxlight.create_train_state(t.model, optax.sgd(0.0), square_loss)
    strat = jaxlight.parallel.make_strategy(strategy, devices) if devices else strategy
    state, _ = jaxlight.fit(state, ArrayDataset({"x": x.numpy()}), epochs=1, batch_size=8, strategy=strat)
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        ref(x)
    stats = interop.batch_stats_to_torch(jax.device_get(nnx.filter_state(state.model_state, nnx.BatchStat)),
                                         t.layout)
    for key in t.layout.stat_names:
        np.testing.assert_allclose(stats[key], ref.state_dict()[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_the_step_puts_its_padding_stand_in_in_place_of_a_ported_batch_norm():
    from jaxlight.layers import PaddedBatchNorm, stand_ins

    bn = pnn.BatchNorm1d(4, rngs=nnx.Rngs(0))

    class Holder(nnx.Module):
        def __init__(self):
            self.bn = bn

    holder = Holder()
    with stand_ins(holder, jnp.ones((3,))):
        assert isinstance(holder.bn, PaddedBatchNorm)
    assert holder.bn is bn


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        h = self.drop(self.fc(x))
        return F.dropout(h, 0.5, training=self.training)


def test_dropout_follows_train_and_eval_like_torch():
    """Eval mode: no dropout at all (the functional one included). Train mode: each dropout
    zeroes its fraction of units and scales the rest by 1/(1-p), as torch's does."""
    torch.manual_seed(0)
    model = DropNet()
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    t = translate(model, (x,))
    assert "nn.Dropout(0.5" in t.source  # F.dropout(training=self.training) became a switched layer
    m = nnx.clone(t.model)
    m.eval()
    with torch.no_grad():
        want = model.eval()(x).numpy()
    np.testing.assert_allclose(np.asarray(m(x.numpy())), want, rtol=1e-5, atol=1e-6)
    m.train()
    y = np.asarray(m(x.numpy()))
    h = np.asarray(t.model.fc(x.numpy()))
    kept = y != 0
    # Both dropouts: a unit survives with probability 0.75 * 0.5, scaled by 1/0.75/0.5.
    assert abs(kept.mean() - 0.375) < 0.02
    np.testing.assert_allclose(y[kept], h[kept] / 0.375, rtol=1e-5)
